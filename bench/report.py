"""Run a suite, then judge it: the table, the ratios, BENCHMARKS.md's targets, the JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.measure import machine
from bench.scenarios import Run, Scenario, run_contender

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = (
    ("scenario", 8),
    ("contender", 10),
    ("done", 13),
    ("ok", 7),
    ("dup", 4),
    ("dlq", 4),
    ("jobs/s", 7),
    ("p50 ms", 7),
    ("p99 ms", 7),
    ("cpu s/1k", 8),
    ("driver", 6),
    ("emu", 5),
    ("rss MiB", 7),
    ("tokens", 6),
    ("admin", 5),
    ("busy %", 6),
    ("load", 5),
)
# Who is measured against whom in (a), beside the ceiling.
PEERS = ("ours", "ours-retry", "minimal", "naive", "celery")


def run_suite(
    cloud: Any,
    scenarios: list[Scenario],
    out_dir: Path = RESULTS_DIR,
    echo: Callable[[str], None] = print,
    emulator_pids: list[int] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Every scenario's contenders, one after another; returns the report and its JSON
    path (a PNG of each scenario's results per second is written beside it)."""
    report: dict[str, Any] = {"machine": machine(), "scenarios": [asdict(s) for s in scenarios]}
    runs: list[Run] = []
    for scenario in scenarios:
        for contender in scenario.contenders:
            echo(f"({scenario.name}) {scenario.title}: {contender} ...")
            runs.append(run_contender(cloud, scenario, contender, emulator_pids))
            echo("    " + row(runs[-1]))
    report["runs"] = [asdict(run) for run in runs]
    report["ratios"] = ratios(runs)
    report["targets"] = targets(runs, report["ratios"], {s.name: s for s in scenarios})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["plots"] = plot(report, path)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report, path


def plot(report: dict[str, Any], path: Path) -> list[str]:
    """One PNG per scenario: each contender's results (the ceiling: acks) per second since
    its consumer was ready, so a stall shows at a glance. Needs matplotlib (the `bench`
    extra); without it, none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for scenario in report["scenarios"]:
        runs = [r for r in report["runs"] if r["scenario"] == scenario["name"] and r["per_second"]]
        if not runs:
            continue
        figure, axes = plt.subplots(figsize=(10, 4.5), dpi=100)
        for run in runs:
            done = f"{run['completed']:,}/{run['jobs']:,}"
            label = f"{run['contender']} ({run['jobs_per_s'] or 0:.0f}/s, {done})"
            axes.plot(range(len(run["per_second"])), run["per_second"], label=label, linewidth=1.2)
        axes.set_title(f"({scenario['name']}) {scenario['title']}: results per second")
        axes.set_xlabel("seconds since the consumer was ready")
        axes.set_ylabel("results (ceiling: acks) per second")
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        target = path.with_name(f"{path.stem}-{scenario['name']}.png")
        figure.savefig(target)
        plt.close(figure)
        written.append(str(target))
    return written


def _find(runs: list[Run], scenario: str, contender: str) -> Run | None:
    return next((r for r in runs if r.scenario == scenario and r.contender == contender), None)


def _ratio(top: Run | None, bottom: Run | None) -> float | None:
    if top is None or bottom is None or not top.jobs_per_s or not bottom.jobs_per_s:
        return None
    return round(top.jobs_per_s / bottom.jobs_per_s, 2)


def ratios(runs: list[Run]) -> dict[str, float | None]:
    ceiling = _find(runs, "a", "ceiling")
    found = {
        f"a_{peer.replace('-', '_')}_over_ceiling": _ratio(_find(runs, "a", peer), ceiling) for peer in PEERS
    }
    return {
        **found,
        "a_ours_over_minimal": _ratio(_find(runs, "a", "ours"), _find(runs, "a", "minimal")),
        "a_ours_over_celery": _ratio(_find(runs, "a", "ours"), _find(runs, "a", "celery")),
        "a_ours_over_naive": _ratio(_find(runs, "a", "ours"), _find(runs, "a", "naive")),
        "b_ours_over_naive": _ratio(_find(runs, "b", "ours"), _find(runs, "b", "naive")),
        "b_ours_over_ceiling": _ratio(_find(runs, "b", "ours"), _find(runs, "b", "ceiling")),
    }


def targets(
    runs: list[Run], ratio: dict[str, float | None], scenarios: dict[str, Scenario]
) -> list[dict[str, Any]]:
    """BENCHMARKS.md's targets that this run's scenarios can judge; `met` None when unmeasured."""
    found: list[dict[str, Any]] = []

    def add(name: str, goal: str, value: Any, met: bool | None) -> None:
        found.append({"target": name, "goal": goal, "value": value, "met": met})

    def at_least(value: float | None, bound: float) -> bool | None:
        return None if value is None else value >= bound

    def at_most(value: float | None, bound: float) -> bool | None:
        return None if value is None else value <= bound

    for peer in ("ours", "ours-retry"):
        key = f"a_{peer.replace('-', '_')}_over_ceiling"
        add(f"a: {peer} / ceiling", ">= 0.9", ratio[key], at_least(ratio[key], 0.9))
        run = _find(runs, "a", peer)
        if run is not None:
            lost = run.jobs - run.completed
            add(
                f"a: {peer} jobs without a result, dead-lettered",
                "0, 0",
                f"{lost}, {run.dead_lettered}",
                lost == 0 and run.dead_lettered == 0,
            )
    add("b: ours / naive", ">= 8", ratio["b_ours_over_naive"], at_least(ratio["b_ours_over_naive"], 8))
    ours_b, ceiling_b = _find(runs, "b", "ours"), _find(runs, "b", "ceiling")
    if ours_b is not None and "b" in scenarios:
        # MAX_IN_FLIGHT calls of latency_s each at once, unless the ceiling is lower.
        bound = scenarios["b"].max_in_flight / scenarios["b"].latency_s
        if ceiling_b is not None and ceiling_b.jobs_per_s:
            bound = min(bound, ceiling_b.jobs_per_s)
        add(
            "b: ours jobs/s",
            f">= 0.8 x {bound:.0f}",
            ours_b.jobs_per_s,
            at_least(ours_b.jobs_per_s, 0.8 * bound),
        )
    ours_c = _find(runs, "c", "ours")
    if ours_c is not None and "c" in scenarios:
        base = 1000 * scenarios["c"].latency_s
        add(
            "c: p50 ms",
            f"<= {base + 20:.0f}",
            ours_c.latency_ms["p50"],
            at_most(ours_c.latency_ms["p50"], base + 20),
        )
        add(
            "c: p99 ms",
            f"<= {base + 100:.0f}",
            ours_c.latency_ms["p99"],
            at_most(ours_c.latency_ms["p99"], base + 100),
        )
    ours = [r for r in runs if r.contender == "ours"]
    if ours:
        tokens = {r.scenario: r.id_tokens_for_service for r in ours}
        calls = {r.scenario: r.admin_api_calls_for_service for r in ours}
        add("ours: ID tokens per audience per run", "== 1", tokens, all(n == 1 for n in tokens.values()))
        add("ours: Admin API calls per service per TTL", "== 1", calls, all(n == 1 for n in calls.values()))
    ours_a, ours_d = _find(runs, "a", "ours"), _find(runs, "d", "ours")
    if ours_a is not None:
        add(
            "a: ours CPU s per 1,000 jobs",
            "<= 0.4",
            ours_a.cpu_s_per_1000,
            at_most(ours_a.cpu_s_per_1000, 0.4),
        )
    if ours_d is not None:
        add(
            f"d: ours peak RSS MiB, {ours_d.max_in_flight} in flight",
            "<= 200",
            ours_d.peak_rss_mib,
            at_most(ours_d.peak_rss_mib, 200),
        )
    return found


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return str(value)


def row(run: Run) -> str:
    done = f"{run.completed}/{run.jobs}" + ("*" if run.capped else "")
    cells = (
        run.scenario,
        run.contender,
        done,
        run.succeeded,
        run.duplicates,
        run.dead_lettered,
        run.jobs_per_s,
        run.latency_ms.get("p50"),
        run.latency_ms.get("p99"),
        run.cpu_s_per_1000,
        run.driver_cpu_s_per_1000,
        run.emulator_cpu_s_per_1000,
        run.peak_rss_mib,
        run.id_tokens_minted,
        run.admin_api_calls,
        run.machine_busy_pct,
        run.load_average[0] if run.load_average else None,
    )
    return " | ".join(_cell(c).rjust(width) for c, (_, width) in zip(cells, COLUMNS, strict=True))


def table(report: dict[str, Any]) -> str:
    header = " | ".join(name.rjust(width) for name, width in COLUMNS)
    lines = [header, "-|-".join("-" * width for _, width in COLUMNS)]
    lines += [row(Run(**run)) for run in report["runs"]]
    lines.append("* capped: stopped before the backlog was done; its rate is from what finished")
    lines.append(
        "dup: jobs with more than one result; dlq: dead-lettered; cpu s/1k: the contender's process;"
        " driver, emu: the local cloud + results subscriber, and the emulator, per 1,000 jobs;"
        " load: 1-min load average at its start"
    )
    lines.append("")
    lines += [f"{k}: {v}" for k, v in report["ratios"].items()]
    lines.append("")
    for target in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(f"{verdict:>12}  {target['target']} {target['goal']}: {target['value']}")
    return "\n".join(lines)
