"""A scripted look at the least-time pick: three simulated servers, one of which slows down.

    python examples/balancer_demo.py

No network: each "request" picks through the Balancer, is answered after the server's current
TTFB on a simulated clock, and is recorded. Shows each server's share per phase, for the default
mode and for Traefik's, so the difference after recovery is visible.
"""

from __future__ import annotations

import heapq
from collections import Counter

from asgi_leasttime import Balancer, Lease

PHASES = [
    ("steady", {"fast": 0.005, "medium": 0.008, "flaky": 0.006}),
    ("flaky slows down", {"fast": 0.005, "medium": 0.008, "flaky": 0.200}),
    ("flaky recovers", {"fast": 0.005, "medium": 0.008, "flaky": 0.006}),
]
PHASE_SECONDS = 20.0
REQUESTS_PER_SECOND = 1000.0


class SimulatedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(mode: str) -> list[Counter[str]]:
    clock = SimulatedClock()
    balancer = Balancer(mode=mode, clock=clock)  # type: ignore[arg-type]
    for name in PHASES[0][1]:
        balancer.add(name)
    answers: list[tuple[float, int, Lease, float]] = []  # (done at, order, lease, ttfb)
    shares: list[Counter[str]] = []
    order = 0
    for index, (_, speeds) in enumerate(PHASES):
        served: Counter[str] = Counter()
        start = index * PHASE_SECONDS
        for n in range(int(PHASE_SECONDS * REQUESTS_PER_SECOND)):
            clock.now = start + n / REQUESTS_PER_SECOND
            while answers and answers[0][0] <= clock.now:
                _, _, lease, ttfb = heapq.heappop(answers)
                lease.answered(200, ttfb)  # the response head, ttfb seconds after the pick
                lease.release()  # and the end of its body
            lease = balancer.acquire()
            served[lease.server.name] += 1
            ttfb = speeds[lease.server.name]
            order += 1
            heapq.heappush(answers, (clock.now + ttfb, order, lease, ttfb))
        shares.append(served)
    return shares


def main() -> None:
    names = list(PHASES[0][1])
    for mode in ("leasttime", "traefik"):
        print(f"\nmode={mode!r}: share of requests per phase ({PHASE_SECONDS:.0f} s each)")
        print(f"  {'phase':<18}" + "".join(f"{name:>9}" for name in names))
        for (phase, _), served in zip(PHASES, run(mode), strict=True):
            total = sum(served.values())
            print(f"  {phase:<18}" + "".join(f"{served[n] / total:>9.1%}" for n in names))


if __name__ == "__main__":
    main()
