"""Run the scenarios for every policy on the same seeds, and print medians with 95% intervals.

    python -m benchmarks.sim.run [--seeds 10] [--only NAME-PART] [--jobs 2]

From the repository's root. Each run drives the real Balancer (modes "leasttime" and "traefik");
round robin, P2C least-request and P2C + peak-EWMA are written in benchmarks/sim/policies.py.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from .engine import TICKS, Result, Scenario, percentile, simulate
from .policies import LARGE_POOL_POLICIES, POLICIES, Factory
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
    # A request answered with a failure never got what it asked for: it counts as slower than
    # any answer, so a policy cannot improve its percentiles by failing requests.
    latencies = result.latencies + [math.inf] * result.failures
    values = {
        "p50 ms": percentile(latencies, 50) * 1000,
        "p99 ms": percentile(latencies, 99) * 1000,
        "p99.9 ms": percentile(latencies, 99.9) * 1000,
        "failed %": 100 * result.failures / len(latencies),
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
PAIRED = ("p50 ms", "p99 ms", "p99.9 ms")  # compared seed by seed: default / each rival
RIVALS = ("traefik", "p2c-peak-ewma")


def policies_of(scenario: Scenario) -> dict[str, Factory]:
    return {**POLICIES, **LARGE_POOL_POLICIES} if scenario.large_pool else POLICIES


def one_run(job: tuple[int, str, int]) -> dict[str, float]:
    """One scenario (by its index in all_scenarios), one policy, one seed: in a worker process,
    since scenarios hold lambdas and do not pickle."""
    index, policy, seed = job
    scenario = all_scenarios()[index]
    return metrics_of(scenario, simulate(scenario, policies_of(scenario)[policy], seed))


def ratio(ours: float, theirs: float) -> float:
    if ours == theirs:  # both never answered (inf) or both 0
        return 1.0
    return ours / theirs


def tabulate(runs: dict[str, list[dict[str, float]]]) -> tuple[Table, Table]:
    """The table of medians, and the paired ratios default / rival of the latencies."""
    rng = random.Random(0)
    table = {
        policy: {k: median_and_interval([m[k] for m in per_seed], rng) for k in per_seed[0]}
        for policy, per_seed in runs.items()
    }
    # Seed by seed, both policies saw the same arrivals and service times: the ratio of the two
    # is a sharper test than two medians with wide intervals.
    paired: Table = {
        rival: {
            k: median_and_interval(
                [
                    ratio(ours[k], theirs[k])
                    for ours, theirs in zip(runs["default"], runs[rival], strict=True)
                ],
                rng,
            )
            for k in PAIRED
        }
        for rival in RIVALS
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
    print("\nSeed by seed, default / rival (below 1: default is faster):\n")
    print("| rival | " + " | ".join(PAIRED) + " |")
    print("|---|" + "---|" * len(PAIRED))
    for rival, values in paired.items():
        print(f"| {rival} | " + " | ".join(fmt(values[c]) for c in PAIRED) + " |")


def print_bar(results: list[tuple[Scenario, Table]]) -> None:
    """Every scenario's paired median ratios in one table, the ones above 1 in bold."""
    print("\n### The bar: default / rival, paired median ratio (above 1 in bold)\n")
    print("(Scenarios with load shared between balancers are left out: no such sharing ships.)\n")
    heads = [f"{k.split()[0]} / {rival}" for rival in RIVALS for k in PAIRED]
    print("| scenario | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for scenario, paired in results:
        if scenario.share_every:
            continue
        cells = []
        for rival in RIVALS:
            for k in PAIRED:
                median = paired[rival][k][0]
                cells.append(f"**{median:.4f}**" if median > 1.0 else f"{median:.4f}")
        print(f"| {scenario.name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--only", help="run scenarios whose name contains this")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    args = parser.parse_args()
    started = time.perf_counter()
    print("Medians over seeds, with 95% bootstrap intervals of the median, same seeds for all.")
    chosen = [
        (index, scenario)
        for index, scenario in enumerate(all_scenarios())
        if not args.only or args.only in scenario.name
    ]
    jobs = [
        (index, policy, seed)
        for index, scenario in chosen
        for policy in policies_of(scenario)
        for seed in range(1, args.seeds + 1)
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        metrics = iter(pool.map(one_run, jobs, chunksize=1))
    bar = []
    for _, scenario in chosen:
        runs = {
            policy: [next(metrics) for _ in range(args.seeds)] for policy in policies_of(scenario)
        }
        table, paired = tabulate(runs)
        print_table(scenario, table, paired)
        bar.append((scenario, paired))
    print_bar(bar)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
