"""Run the scenarios for every policy on the same seeds, and print medians with 95% intervals.

    python -m benchmarks.sim.run [--seeds 10] [--only NAME-PART] [--jobs 2]
        [--with-reports "default + reports"]

``--only "load reports"``: the load-report (ORCA) scenarios and their summary table.

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
from dataclasses import replace

from .engine import TICKS, Result, Scenario, percentile, simulate
from .policies import LARGE_POOL_POLICIES, POLICIES, REPORT_POLICIES, Factory
from .scenarios import REPORTS_K, all_scenarios


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


def policies_of(scenario: Scenario, with_reports: str | None = None) -> dict[str, Factory]:
    if with_reports:
        # Every scenario with load reports on, and the default mode scoring with them.
        policies = {**POLICIES, **LARGE_POOL_POLICIES} if scenario.large_pool else POLICIES
        return {**policies, "default": REPORT_POLICIES[with_reports]}
    if scenario.reports:
        # Traefik only for one balancer: with several it is not a contender (the large pool's
        # p50 at K = 8 is 22 s), and it is the slowest to simulate.
        traefik = {"traefik": POLICIES["traefik"]} if scenario.balancers == 1 else {}
        return {**REPORT_POLICIES, **traefik}
    return {**POLICIES, **LARGE_POOL_POLICIES} if scenario.large_pool else POLICIES


def one_run(job: tuple[int, str, int, str | None]) -> dict[str, float]:
    """One scenario (by its index in all_scenarios), one policy, one seed: in a worker process,
    since scenarios hold lambdas and do not pickle."""
    index, policy, seed, with_reports = job
    scenario = all_scenarios()[index]
    if with_reports:
        scenario = replace(scenario, reports=True)
    factory = policies_of(scenario, with_reports)[policy]
    return metrics_of(scenario, simulate(scenario, factory, seed))


def ratio(ours: float, theirs: float) -> float:
    if ours == theirs:  # both never answered (inf) or both 0
        return 1.0
    return ours / theirs


def tabulate(runs: dict[str, list[dict[str, float]]]) -> tuple[Table, Table]:
    """The table of medians, and the paired ratios default / rival of the latencies (the rivals
    of :data:`RIVALS` that ran, or the report policies against the blind default)."""
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
        if rival in runs
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
    if not paired:
        return
    print("\nSeed by seed, default / rival (below 1: default is faster):\n")
    print("| rival | " + " | ".join(PAIRED) + " |")
    print("|---|" + "---|" * len(PAIRED))
    for rival, values in paired.items():
        print(f"| {rival} | " + " | ".join(fmt(values[c]) for c in PAIRED) + " |")


def print_bar(results: list[tuple[Scenario, Table]]) -> None:
    """Every scenario's paired median ratios in one table, the ones above 1 in bold."""
    print("\n### The bar: default / rival, paired median ratio (above 1 in bold)\n")
    print(
        "(Scenarios with load shared between balancers, and with load reports, are left out:"
        " no such sharing ships; the load reports have their own table.)\n"
    )
    heads = [f"{k.split()[0]} / {rival}" for rival in RIVALS for k in PAIRED]
    print("| scenario | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for scenario, paired in results:
        if scenario.share_every or scenario.reports:
            continue
        cells = []
        for rival in RIVALS:
            for k in PAIRED:
                median = paired[rival][k][0]
                cells.append(f"**{median:.4f}**" if median > 1.0 else f"{median:.4f}")
        print(f"| {scenario.name} | " + " | ".join(cells) + " |")


def family_of(scenario: Scenario) -> str:
    return scenario.name.replace(f", K = {scenario.balancers}, load reports", "")


def print_reports(results: list[tuple[Scenario, dict[str, list[dict[str, float]]]]]) -> None:
    """The load-report scenarios side by side: each family for every K and report policy, its
    medians, the ratio of each median to one balancer's blind default (the goal: K = 8 within
    10 %), and the paired ratio seed by seed of the policy to the blind default at the same K
    (below 1: the reports help)."""
    by_family: dict[str, dict[int, dict[str, list[dict[str, float]]]]] = {}
    for scenario, runs in results:
        if scenario.reports:
            by_family.setdefault(family_of(scenario), {})[scenario.balancers] = runs
    if not by_family:
        return
    rng = random.Random(0)
    print("\n### Load reports: K balancers, blind / reports / reports + probes\n")
    print(
        "Medians over seeds; \"/ K=1\": the median over one balancer's blind default's;"
        ' "/ blind": paired seed by seed over the blind default at the same K.\n'
    )
    heads = [f"{k.split()[0]}" for k in PAIRED]
    heads += [f"{k.split()[0]} / K=1" for k in PAIRED]
    heads += [f"{k.split()[0]} / blind" for k in PAIRED]
    for family, per_k in by_family.items():
        print(f"\n#### {family}\n")
        print("| K | policy | " + " | ".join(heads) + " |")
        print("|---|---|" + "---|" * len(heads))
        one = per_k.get(1, {}).get("default")
        for k in REPORTS_K:
            if k not in per_k:
                continue
            runs = per_k[k]
            for policy in REPORT_POLICIES:
                per_seed = runs[policy]
                medians = [statistics.median(m[q] for m in per_seed) for q in PAIRED]
                cells = [f"{v:.1f}" for v in medians]
                for q, median in zip(PAIRED, medians, strict=True):
                    base = statistics.median(m[q] for m in one) if one else math.nan
                    cells.append(f"{median / base:.2f}")
                for q in PAIRED:
                    ratios = [
                        ratio(ours[q], blind[q])
                        for ours, blind in zip(per_seed, runs["default"], strict=True)
                    ]
                    cells.append(fmt(median_and_interval(ratios, rng)))
                print(f"| {k} | {policy} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--only", help="run scenarios whose name contains this")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--with-reports",
        choices=[p for p in REPORT_POLICIES if p != "default"],
        help="servers report their load on every answer, and the default mode is this policy"
        " (the scenarios made for load reports are left out)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    print("Medians over seeds, with 95% bootstrap intervals of the median, same seeds for all.")
    chosen = [
        (index, scenario)
        for index, scenario in enumerate(all_scenarios())
        if (not args.only or args.only in scenario.name)
        and not (args.with_reports and scenario.reports)
    ]
    if args.with_reports:
        print(f"Load reports on in every scenario; default: {args.with_reports}.")
    jobs = [
        (index, policy, seed, args.with_reports)
        for index, scenario in chosen
        for policy in policies_of(scenario, args.with_reports)
        for seed in range(1, args.seeds + 1)
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        metrics = iter(pool.map(one_run, jobs, chunksize=1))
    bar = []
    reports = []
    for _, scenario in chosen:
        runs = {
            policy: [next(metrics) for _ in range(args.seeds)]
            for policy in policies_of(scenario, args.with_reports)
        }
        table, paired = tabulate(runs)
        print_table(scenario, table, paired)
        bar.append((scenario, paired))
        reports.append((scenario, runs))
    print_bar(bar)
    print_reports(reports)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
