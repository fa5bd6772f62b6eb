"""Run the chaos scenarios (real broker, InfluxDB, agent and simulator processes) and print the numbers.

    .venv/bin/python scripts/chaos_report.py [broker_kill|influxdb_stop|agent_kill ...] [--repeat N]

The same scenarios as ``tests/integration/test_chaos.py``; see ``docs/chaos.md`` for what they prove.
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
    rows = []
    ok = True
    for name in args.scenarios:
        for i in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="pdm-chaos-") as tmp:
                base = Path(args.keep) if args.keep else Path(tmp)
                result = chaos.run(name, base / f"{name}-{i + 1}")
            print(result.render(), flush=True)
            a, r = result.accounting, result.recovery
            ok &= a.complete and result.stats["unacked"] == 0
            rows.append(
                f"| {name} | {a.published} | {a.points_expected} | {a.points_stored} | {a.lost} | {a.duplicates} "
                f"| {result.outage_s:.1f} s | {fmt(r.online_s)} | {fmt(r.first_point_s)} | {fmt(r.backlog_s)} "
                f"| {result.wall_s:.0f} s |"
            )
    print()
    print(
        "| scenario | messages published | points expected | points stored | lost | duplicates | outage "
        "| agent online | first new point | backlog stored | wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0 if ok else 1


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


if __name__ == "__main__":
    raise SystemExit(main())
