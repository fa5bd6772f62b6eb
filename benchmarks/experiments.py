"""Side-by-side variants of the agent's ingest path: how fast each works off the same backlog.

``python benchmarks/experiments.py [--speed 32] [--seconds 4]``: for each variant, a fresh agent gets
``seconds`` of the benchmark fleet at ``speed`` x real time (more than it can take), then the rate at
which it works off the backlog (publisher idle) is read from its heartbeat counters. Variants:

- ``shipped``: the agent as it is, broker defaults (``max_inflight_messages 20``);
- ``inflight200``: the same agent, broker ``max_inflight_messages 200`` (more unacknowledged messages
  per subscriber, so one spool commit acknowledges more of them);
- ``range_ack``: ``benchmarks/patched_agent.py`` (``Spool.ack`` as one range delete), broker defaults;
- ``range_ack+inflight200``: both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.run import BROKER_CONF, Run, log  # noqa: E402
from benchmarks.workload import Fleet  # noqa: E402
from pdm_tools.dev import services as devservices  # noqa: E402

PATCHED = [sys.executable, str(REPO / "benchmarks" / "patched_agent.py")]
VARIANTS = {
    "shipped": (None, ""),
    "inflight200": (None, "max_inflight_messages 200\n"),
    "range_ack": (PATCHED, ""),
    "range_ack+inflight200": (PATCHED, "max_inflight_messages 200\n"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", type=float, default=32.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="pdm-exp-") as tmp:
        workdir = Path(tmp)
        influx = devservices.start_influxdb_v1(workdir / "influxdb")
        try:
            for r in range(args.rounds):
                for name, (command, conf) in VARIANTS.items():
                    broker = devservices.start_mosquitto(
                        workdir / f"mosquitto-{name}-{r}", extra_conf=BROKER_CONF + conf
                    )
                    try:
                        tag = f"exp-{name.replace('+', '-')}-{r}"
                        run = Run((broker.host, broker.port, influx.url), workdir, tag, Fleet(100, 10))
                        run.agent.command = command
                        with run:
                            step = run.step(args.speed, args.seconds, drain_s=120.0)
                            final = run.finish()
                    finally:
                        broker.stop()
                    row = {
                        "drain_msgs_per_s": step["drain_msgs_per_s"],
                        "agent_cpu_pct": step["agent_cpu_pct"],
                        "zero_loss": final["zero_loss"],
                    }
                    results[name].append(row)
                    log(f"{name}: {row}")
        finally:
            influx.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "experiments.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
