"""Cost of one pick, ours against a faithful port of Traefik's nextServer, in the same run.

    python benchmarks/pick.py

The baseline rebuilds the healthy list and the candidate list on every pick, as Traefik's Go code
does. Every server has samples and one request in flight, so each pick scores every server. Two
cases: distinct averages (the usual case with float seconds) and all averages equal (every pick is
an earliest-deadline tie-break, the worst case for both).
"""

from __future__ import annotations

import math
import timeit
from typing import Any

from asgi_leasttime import Balancer


class _NaiveServer:
    def __init__(self, name: str, average: float) -> None:
        self.name, self.weight, self.deadline = name, 1.0, 0.0
        self.average, self.inflight = average, 1


class NaiveTraefik:
    """Traefik's getHealthyServers + nextServer + selectWRR, line for line."""

    def __init__(self, n: int, tied: bool) -> None:
        self.handlers = [_NaiveServer(f"s{i}", average_ms(i, tied)) for i in range(n)]
        self.status = {h.name for h in self.handlers}
        self.fenced: set[str] = set()
        self.cur_deadline = 0.0

    def next_server(self) -> _NaiveServer:
        healthy = [h for h in self.handlers if h.name in self.status and h.name not in self.fenced]
        if len(healthy) == 1:
            return healthy[0]
        min_score = math.inf
        candidates: list[_NaiveServer] = []
        for h in healthy:
            score = h.average * (1 + h.inflight) / h.weight
            if score < min_score:
                min_score, candidates = score, [h]
            elif score == min_score:
                candidates.append(h)
        if len(candidates) == 1:
            return candidates[0]
        selected, min_deadline = candidates[0], math.inf
        for h in candidates:
            if h.deadline < min_deadline:
                min_deadline, selected = h.deadline, h
        selected.deadline = min_deadline + 1 / selected.weight
        self.cur_deadline = max(self.cur_deadline, selected.deadline)
        return selected


def average_ms(i: int, tied: bool) -> float:
    return 5.0 if tied else 5.0 + (i * 7 % 11) / 10


def ours(n: int, mode: str, tied: bool, **options: Any) -> Balancer:
    balancer = Balancer(mode=mode, **options)  # type: ignore[arg-type]
    for i in range(n):
        server = balancer.add(f"s{i}")
        assert server is not None
        balancer.record_ttfb(server, average_ms(i, tied) / 1000)
        balancer.track(server)
    return balancer


def per_pick_us(pick: object, number: int) -> float:
    best = min(timeit.repeat(pick, number=number, repeat=7))  # type: ignore[arg-type]
    return best / number * 1e6


def main() -> None:
    print(
        "microseconds per pick (best of 7); ratio = Traefik port / ours (default mode); the"
        " default mode scans pools of up to EXACT_UP_TO servers whole and samples larger ones;"
        " the last two columns force one way or the other"
    )
    columns = ("traefik port", "ours traefik", "ours default", "ratio", "exact scan", "sampled")
    print(f"{'case':>9} {'n':>5} " + " ".join(f"{c:>13}" for c in columns))
    for tied in (False, True):
        for n in (3, 10, 30, 64, 100, 300, 1000):
            number = max(200, 200_000 // n)
            baseline = per_pick_us(NaiveTraefik(n, tied).next_server, number)
            traefik = per_pick_us(ours(n, "traefik", tied).next_server, number)
            default = per_pick_us(ours(n, "leasttime", tied).next_server, number)
            exact = per_pick_us(ours(n, "leasttime", tied, exact_up_to=n).next_server, number)
            sampled = per_pick_us(ours(n, "leasttime", tied, exact_up_to=1).next_server, number)
            case = "tied" if tied else "distinct"
            figures = (baseline, traefik, default, baseline / default, exact, sampled)
            print(f"{case:>9} {n:>5} " + " ".join(f"{f:>13.3f}" for f in figures))


if __name__ == "__main__":
    main()
