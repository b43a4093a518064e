"""The demo, shortened: it runs by itself to its summary, and the slow spell shows in it."""

from __future__ import annotations

import io
import re

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
