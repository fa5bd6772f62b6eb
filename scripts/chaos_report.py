"""Run the chaos scenarios (real broker, InfluxDB, agent and simulator processes) and print the numbers.

    .venv/bin/python scripts/chaos_report.py [broker_kill|influxdb_stall_drop|agent_kill ...] [--repeat N]

The same scenarios as ``tests/integration/test_chaos.py``, plus the controls that show the verdict
failing; a table per scenario, as in ``docs/chaos.md`` (which says what each proves). Exits 1 when any
run lost or doubled something.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import chaos_support as chaos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ", ".join(chaos.SCENARIOS)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"default: all of {names}")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="work directory to keep (logs, spool, configs)")
    args = parser.parse_args()
    unknown = [s for s in args.scenarios if s not in chaos.SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(chaos.SCENARIOS)}")
    args.scenarios = args.scenarios or list(chaos.SCENARIOS)
    results: dict[str, list[chaos.ScenarioResult]] = {}
    ok = True
    for name in args.scenarios:
        for i in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="pdm-chaos-") as tmp:
                base = Path(args.keep) if args.keep else Path(tmp)
                result = chaos.run(name, base / f"{name}-{i + 1}")
            print(result.render(), flush=True)
            ok &= result.accounting.complete and result.stats["unacked"] == 0
            results.setdefault(name, []).append(result)
    for name, runs in results.items():
        print(f"\n{name}\n")
        print(table(runs))
    return 0 if ok else 1


def table(runs: list[chaos.ScenarioResult]) -> str:
    """One scenario's runs as a Markdown table; the fault's own numbers (``ScenarioResult.fault``) last."""
    extra = sorted({k for r in runs for k in r.fault})
    head = [
        "run",
        "messages published",
        "points expected",
        "points stored",
        "lost by the agent",
        "lost by the broker",
        "duplicates",
        "outage",
        "agent online",
        "first new point",
        "backlog stored",
        "wall",
        *extra,
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, result in enumerate(runs, 1):
        a, r = result.accounting, result.recovery
        cells = [
            str(i),
            f"{a.published:,}",
            f"{a.points_expected:,}",
            f"{a.points_stored:,}",
            str(a.lost - a.lost_by_broker),
            str(a.lost_by_broker),
            str(a.duplicates),
            fmt(result.outage_s),
            fmt(r.online_s),
            fmt(r.first_point_s),
            fmt(r.backlog_s),
            f"{result.wall_s:.0f} s",
            *(str(result.fault.get(k, "-")) for k in extra),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.1f} s"  # v != v: NaN, no outage to measure


if __name__ == "__main__":
    raise SystemExit(main())
