"""The demo, shortened: it runs by itself to its summary, and the slow spell shows in it."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys

from asgi_leasttime.demo import run_demo


def test_demo_runs_to_its_summary() -> None:
    out = io.StringIO()
    assert run_demo(seconds=4, out=out) == 0
    text = out.getvalue()
    assert "Where the requests went" in text
    rows = {
        match.group(1): [float(x) for x in match.group(2, 3, 4)]
        for match in re.finditer(
            r"^  (before|slow spell|after)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%", text, re.M
        )
    }
    assert set(rows) == {"before", "slow spell", "after"}
    assert rows["slow spell"][2] < rows["before"][2]  # flaky's share falls while it is slow


def test_ctrl_c_ends_the_demo_with_its_summary_and_no_traceback() -> None:
    command = [sys.executable, "-m", "asgi_leasttime.cli", "demo", "--seconds", "60"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.startswith("["):  # the first table: the run has begun
                break
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait(10)
    out = "".join(seen) + out
    assert "Ctrl-C stops it early" in out
    assert "Where the requests went" in out
    assert "(stopped after" in out
    assert "Traceback" not in err, err
    assert process.returncode == 0
