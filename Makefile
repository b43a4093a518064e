# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint types pytest docs bench bench-proxy bench-streaming clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/asgi-leasttime demo

test: lint types pytest docs

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy asgi_leasttime

# The whole suite on the default (lean) upstream client, then the forwarding tests on httpx.
pytest: $(STAMP)
	$(BIN)/pytest
	ASGI_LEASTTIME_TEST_CLIENT=httpx $(BIN)/pytest tests/test_proxy.py tests/test_faults.py \
		tests/test_security.py tests/test_disconnects.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

bench: $(STAMP)
	$(BIN)/python benchmarks/pick.py

clean:
	rm -rf $(VENV) site .mypy_cache .pytest_cache .ruff_cache

# Load benchmarks: need nginx, wrk and curl (apt-get install nginx-light wrk curl).
bench-proxy: $(STAMP)
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	cd benchmarks && ../$(BIN)/python proxy.py

bench-streaming: $(STAMP)
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	cd benchmarks && ../$(BIN)/python streaming.py
