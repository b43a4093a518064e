"""A newcomer's first hour (issue 28): README.md, then docs/quickstart.md, followed in order on a
fresh virtualenv holding what the quick start's ``pip install`` names (``asgi-leasttime[cli]``),
and nothing else.

Every command of their ``console`` blocks runs once, in the order read. A block whose lines start
with ``$ `` documents outputs: the lines after such a command are what it prints (stdout and
stderr as a terminal shows them), and the command must print exactly that. Any traceback, any
exit status but 0, any server that does not answer a request through it fails the test, and so
does a command this test does not know: a new one in the docs has to be taught here, so the docs
and the test cannot drift apart.

Where this differs from a newcomer at a terminal, and why:

- the docs' ports (8000, 9001, 9002, 9100) become free ones, in the commands and in the files
  they read: another test may hold the documented ones;
- the upstreams on 9001 and 9002 are two small stdlib servers this test starts;
- the working folder is a new one holding the repository's ``examples/lb.toml`` (the README reads
  it there), ``lb.toml`` (the quick start's: a copy of it, as the quick start suggests) and
  ``lb.py`` (the quick start's ``# lb.py`` block);
- ``make demo`` and ``make test`` are the repository's own set-up, which runs this test: skipped;
- ``asgi-leasttime demo`` runs for DEMO_SECONDS instead of 20, its dashboard fetched meanwhile;
- each server answers one request (and ``/metrics`` and ``/status`` with an ``[admin]`` table),
  then is stopped with SIGINT or SIGTERM in turn, both of which the quick start documents.

Marked ``install`` and ``newcomer`` (``pytest -m newcomer`` runs it alone): about 30 s.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, wait_for_port
from tests.test_install import fresh_venv

pytestmark = [pytest.mark.install, pytest.mark.newcomer]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/quickstart.md")
DOC_PORTS = (8000, 9001, 9002, 9100)  # the proxy, two upstreams, the admin app
UPSTREAMS = (9001, 9002)
DEMO_SECONDS = 6
WAIT = 30.0  # seconds: the bound of every wait


@dataclasses.dataclass
class Step:
    source: str  # "README.md:43"
    line: str
    output: list[str] | None = None  # what the docs say it prints, line by line

    def words(self) -> tuple[dict[str, str], list[str]]:
        """The environment assignments before the command, and the command."""
        words = shlex.split(self.line, comments=True)
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        return env, words


def console_steps(doc: str) -> list[Step]:
    """The commands of the ``console`` blocks of ``doc``, with their documented outputs."""
    steps: list[Step] = []
    block: list[tuple[int, str]] | None = None
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if block is None:
            block = [] if line.strip() == "```console" else None
        elif line.strip() == "```":
            prompted = any(text.startswith("$ ") for _, text in block)
            for at, text in block:
                if prompted and not text.startswith("$ "):
                    output = steps[-1].output if steps else None
                    assert output is not None, f"{doc}:{at}: the output of which command?"
                    output.append(text.rstrip())
                elif text.strip():
                    command = text.removeprefix("$ ") if prompted else text
                    steps.append(Step(f"{doc}:{at}", command, [] if prompted else None))
            block = None
        else:
            block.append((number, line))
    assert block is None, f"{doc}: a console block is not closed"
    return steps


def newcomer_steps() -> list[Step]:
    """README.md's steps, then the quick start's; a command met again is not run again, and an
    output documented for it anywhere is its output."""
    first: dict[str, Step] = {}
    for doc in DOCS:
        for step in console_steps(doc):
            seen = first.setdefault(repr(step.words()), step)
            if step.output is not None:
                assert seen.output in (None, step.output), f"{step.source}: another output"
                seen.output = step.output
    return list(first.values())


def python_files(doc: str) -> dict[str, str]:
    """The ``python`` blocks of ``doc`` that open with ``# NAME.py``, by name."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / doc).read_text(), re.M | re.S)
    return {m[1]: code for code in blocks if (m := re.match(r"# (\w+\.py)\n", code))}


UPSTREAM = """
import http.server, sys
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = sys.argv[2].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Answer).serve_forever()
"""


class Newcomer:
    """Runs the docs' commands in a folder of their own, with the fresh virtualenv's ``scripts``."""

    def __init__(self, scripts: Path, home: Path, ports: dict[int, int], requirement: str) -> None:
        self.scripts, self.home, self.ports, self.requirement = scripts, home, ports, requirement
        self.signals = [signal.SIGINT, signal.SIGTERM]  # servers are stopped with each in turn
        self.stopped_with: list[signal.Signals] = []

    def localize(self, text: str) -> str:
        """The docs' ports replaced with this run's."""
        documented = "|".join(map(str, DOC_PORTS))
        return re.sub(rf"\b({documented})\b", lambda m: str(self.ports[int(m[1])]), text)

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        """A terminal with the fresh virtualenv activated; nothing of the test's own."""
        ours = {str(Path(sys.executable).parent), str(ROOT / ".venv" / "bin")}
        path = [p for p in os.environ["PATH"].split(os.pathsep) if p not in ours]
        return {
            "PATH": os.pathsep.join([str(self.scripts), *path]),
            "HOME": str(self.home),
            "VIRTUAL_ENV": str(self.scripts.parent),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",  # stdout and stderr interleaved as a terminal shows them
            **extra,
        }

    def run(self, step: Step) -> None:
        env, words = step.words()
        words = [self.localize(word) for word in words]
        match words:
            case ["make", *_]:
                return  # the repository's own set-up, whose make test runs this test
            case ["pip", "install", requirement]:
                assert requirement == self.requirement, step  # what the fixture installed
                self.command(step, env, ["python", "-m", "pip", "check"])
            case ["asgi-leasttime", "demo"]:
                self.demo(step, env, [*words, "--seconds", str(DEMO_SECONDS)])
            case ["asgi-leasttime", "serve", *_] | ["uvicorn", *_]:
                self.server(step, env, words)
            case ["asgi-leasttime", *_]:
                self.command(step, env, words)
            case _:
                pytest.fail(f"{step.source}: {step.line!r}: a command tests/test_newcomer.py "
                            "does not know: teach it")  # fmt: skip

    def command(self, step: Step, env: dict[str, str], words: list[str]) -> None:
        finished = subprocess.run(
            words,
            cwd=self.home,
            env=self.environment(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=WAIT,
            check=False,
        )
        said = f"{step.source}: {step.line}\n{finished.stdout}"
        assert "Traceback" not in finished.stdout, said
        assert finished.returncode == 0, said
        if step.output is not None:
            assert [line.rstrip() for line in finished.stdout.splitlines()] == step.output, said

    def demo(self, step: Step, env: dict[str, str], words: list[str]) -> None:
        assert step.output is None, f"{step.source}: compare the demo's documented output"
        process = subprocess.Popen(
            words,
            cwd=self.home,
            env=self.environment(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        seen: list[str] = []
        try:
            deadline = time.monotonic() + WAIT
            while not any(line.startswith("Dashboard: ") for line in seen):
                try:
                    seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
                except queue.Empty:
                    pytest.fail(f"{step.source}: no dashboard after {WAIT} s:\n{''.join(seen)}")
            dashboard = seen[-1].split()[1]  # up while the demo runs, says the demo
            answer = httpx.get(dashboard, timeout=5)
            assert (answer.status_code, answer.headers["content-type"][:9]) == (200, "text/html")
            process.wait(DEMO_SECONDS + WAIT)
        finally:
            process.kill()
            process.wait(WAIT)
        reader.join(WAIT)
        while not lines.empty():
            seen.append(lines.get())
        out = "".join(seen)
        said = f"{step.source}: {step.line}\n{out}"
        assert "Traceback" not in out, said
        assert process.returncode == 0, said
        assert "Where the requests went" in out, said
        for phase in ("before", "slow spell", "after"):
            assert re.search(rf"^  {phase} .*%", out, re.M), said

    def server(self, step: Step, env: dict[str, str], words: list[str]) -> None:
        assert step.output is None, f"{step.source}: compare the server's documented output"
        files = [self.home / word for word in words[2:] if word.endswith(".toml")]
        config = tomllib.loads(files[0].read_text()) if files else {}
        port = config.get("server", {}).get("port", self.ports[8000])
        if "--port" not in words and not files:  # where the docs' proxy listens by default
            words = [*words, "--port", str(self.ports[8000])]
        stop = self.signals[len(self.stopped_with) % 2]
        self.stopped_with.append(stop)
        log = self.home / f"server-{len(self.stopped_with)}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                words, cwd=self.home, env=self.environment(env), stdout=out, stderr=out
            )
        said = f"{step.source}: {step.line}"
        try:
            try:
                wait_for_port(port, process, WAIT)
            except AssertionError as exc:
                pytest.fail(f"{said}: {exc}\n{log.read_text()}")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                answer = client.get("/")
                assert answer.status_code == 200, said
                assert answer.text in {f"upstream {p}" for p in UPSTREAMS}, said
                # One Date and one Server, the proxy's server's (the upstream's are dropped).
                assert answer.headers.get_list("server") == ["uvicorn"], said
                assert len(answer.headers.get_list("date")) == 1, said
                if "sticky" in config:  # the cookie keeps a client on its upstream
                    assert config["sticky"]["name"] in answer.cookies, said
                    assert all(client.get("/").text == answer.text for _ in range(5)), said
            if "admin" in config:
                admin = f"http://127.0.0.1:{config['admin']['port']}"
                metrics = httpx.get(f"{admin}/metrics", timeout=10)
                assert metrics.status_code == 200, said
                assert "asgi_leasttime_service_requests_total{" in metrics.text, said
                status = httpx.get(f"{admin}/status", timeout=10)
                assert status.status_code == 200, said
                names = [u["name"] for u in status.json()["upstreams"]]
                assert names == [u["name"] for u in config["upstreams"]], said
            process.send_signal(stop)
            process.wait(WAIT)
        finally:
            process.kill()
            process.wait(WAIT)
        text = log.read_text()
        said = f"{said}\n{text}"
        assert "Traceback" not in text, said
        assert "Application shutdown complete." in text, said
        # Once shut down, uvicorn raises again the signal that stopped it: SIGTERM's default
        # action ends the process by it (status 143 in a shell); serve swallows SIGINT's.
        assert process.returncode == (-signal.SIGTERM if stop == signal.SIGTERM else 0), said


@pytest.fixture(scope="module")
def ports() -> dict[int, int]:
    return {port: free_port() for port in DOC_PORTS}


@pytest.fixture(scope="module")
def upstreams(ports: dict[int, int]) -> Iterator[None]:
    processes = [
        subprocess.Popen([sys.executable, "-c", UPSTREAM, str(ports[p]), f"upstream {p}"])
        for p in UPSTREAMS
    ]
    try:
        for p, process in zip(UPSTREAMS, processes, strict=True):
            wait_for_port(ports[p], process, WAIT)
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait(WAIT)


def test_the_readme_then_the_quickstart_in_order(
    tmp_path_factory: pytest.TempPathFactory, ports: dict[int, int], upstreams: None
) -> None:
    steps = newcomer_steps()
    installs = [s for s in steps if s.words()[1][:2] == ["pip", "install"]]
    assert len(installs) == 1, installs
    requirement = installs[0].words()[1][2]
    named = re.fullmatch(r"asgi-leasttime(\[[\w,]+\])?", requirement)
    assert named, requirement
    scripts = fresh_venv(tmp_path_factory.mktemp("newcomer"), named[1] or "")
    home = tmp_path_factory.mktemp("home")
    example = (ROOT / "examples" / "lb.toml").read_text()
    newcomer = Newcomer(scripts, home, ports, requirement)
    (home / "examples").mkdir()
    (home / "examples" / "lb.toml").write_text(newcomer.localize(example))
    (home / "lb.toml").write_text(newcomer.localize(example))
    for name, code in python_files("docs/quickstart.md").items():
        (home / name).write_text(newcomer.localize(code))
    assert (home / "lb.py").exists()  # for the quick start's uvicorn lb:proxy
    for step in steps:
        newcomer.run(step)
    commands = {s.words()[1][0] for s in steps}
    assert commands == {"make", "pip", "asgi-leasttime", "uvicorn"}, commands
    assert sum(s.output is not None for s in steps) >= 1  # check's, in the README
    assert set(newcomer.stopped_with) == {signal.SIGINT, signal.SIGTERM}
