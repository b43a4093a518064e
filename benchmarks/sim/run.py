"""Run the scenarios for every policy on the same seeds, and print medians with 95% intervals.

    python -m benchmarks.sim.run [--seeds 10] [--only NAME-PART]

From the repository's root. Each run drives the real Balancer (modes "leasttime" and "traefik");
round robin, P2C least-request and P2C + peak-EWMA are written in benchmarks/sim/policies.py.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from .engine import TICKS, Result, Scenario, percentile, simulate
from .policies import LARGE_POOL_POLICIES, POLICIES
from .scenarios import all_scenarios


def share_between(result: Result, name: str, start: float, end: float) -> float:
    ticks = range(int(start * TICKS), int(end * TICKS))
    sent = sum(result.per_tick.get(t, 0) for t in ticks)
    return sum(result.share.get(name, {}).get(t, 0) for t in ticks) / sent if sent else 0.0


def first_time(
    result: Result, name: str, start: float, end: float, test: Callable[[float], bool]
) -> float:
    """Seconds after ``start`` until the server's share over the next second passes ``test``."""
    t = start
    while t + 1.0 <= end:
        if test(share_between(result, name, t, t + 1.0)):
            return t - start
        t += 1 / TICKS
    return float("inf")


def metrics_of(scenario: Scenario, result: Result) -> dict[str, float]:
    values = {
        "p50 ms": percentile(result.latencies, 50) * 1000,
        "p99 ms": percentile(result.latencies, 99) * 1000,
        "p99.9 ms": percentile(result.latencies, 99.9) * 1000,
        "max queue": float(result.max_queue),
    }
    name, events = scenario.watch, scenario.events
    if name is None:
        return values
    fair = 1 / len(result.share)
    if "degrade" in events:
        values["react s"] = first_time(
            result, name, events["degrade"], events["recover"], lambda s: s < fair / 2
        )
    if "recover" in events:
        values["recover s"] = first_time(
            result, name, events["recover"], scenario.duration, lambda s: s >= fair / 2
        )
    if "fail" in events:
        values["fail react s"] = first_time(
            result, name, events["fail"], events["recover"], lambda s: s < 0.05
        )
        values["share failing"] = share_between(result, name, events["fail"] + 1, events["recover"])
    if "join" in events:
        values["sent before 1st answer"] = float(result.before_first_answer.get(name, 0))
    if "degrade" not in events and "fail" not in events and "join" not in events:
        values["share " + name] = share_between(result, name, 1, scenario.duration)
    return values


def median_and_interval(values: list[float], rng: random.Random) -> tuple[float, float, float]:
    """The median and a 95% bootstrap interval of the median."""
    finite = [v for v in values if v != float("inf")]
    if len(finite) < len(values) / 2:
        return float("inf"), float("inf"), float("inf")
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(1000))
    return statistics.median(values), medians[25], medians[974]


Table = dict[str, dict[str, tuple[float, float, float]]]
PAIRED = ("p99 ms", "p99.9 ms")  # compared seed by seed: default / each rival


def run_scenario(scenario: Scenario, seeds: int) -> tuple[Table, Table]:
    """The table of medians, and the paired ratios default / rival of the tail latencies."""
    rng = random.Random(0)
    table: Table = {}
    runs: dict[str, list[dict[str, float]]] = {}
    policies = {**POLICIES, **LARGE_POOL_POLICIES} if scenario.large_pool else POLICIES
    for policy, factory in policies.items():
        per_seed = [
            metrics_of(scenario, simulate(scenario, factory, seed)) for seed in range(1, seeds + 1)
        ]
        runs[policy] = per_seed
        table[policy] = {k: median_and_interval([m[k] for m in per_seed], rng) for k in per_seed[0]}
    # Seed by seed, both policies saw the same arrivals and service times: the ratio of the two
    # is a sharper test than two medians with wide intervals.
    paired: Table = {}
    for rival in ("traefik", "p2c-peak-ewma"):
        paired[rival] = {
            k: median_and_interval(
                [
                    ours[k] / theirs[k]
                    for ours, theirs in zip(runs["default"], runs[rival], strict=True)
                ],
                rng,
            )
            for k in PAIRED
        }
    return table, paired


def fmt(value: tuple[float, float, float]) -> str:
    median, low, high = value
    if median == float("inf"):
        return "never"
    return f"{median:.3g} [{low:.3g}, {high:.3g}]"


def print_table(scenario: Scenario, table: Table, paired: Table) -> None:
    columns = list(next(iter(table.values())))
    print(f"\n### {scenario.name}\n")
    print("| policy | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for policy, values in table.items():
        print(f"| {policy} | " + " | ".join(fmt(values[c]) for c in columns) + " |")
    print("\nSeed by seed, default / rival (below 1: default's tail is shorter):\n")
    print("| rival | " + " | ".join(PAIRED) + " |")
    print("|---|" + "---|" * len(PAIRED))
    for rival, values in paired.items():
        print(f"| {rival} | " + " | ".join(fmt(values[c]) for c in PAIRED) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--only", help="run scenarios whose name contains this")
    args = parser.parse_args()
    started = time.perf_counter()
    print("Medians over seeds, with 95% bootstrap intervals of the median, same seeds for all.")
    for scenario in all_scenarios():
        if args.only and args.only not in scenario.name:
            continue
        print_table(scenario, *run_scenario(scenario, args.seeds))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
