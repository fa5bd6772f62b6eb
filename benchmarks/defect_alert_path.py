"""The defect classifier on the alert path, side by side: the data-plane benchmark's alert storm with each of
several defect classifier directories, in one run.

The agent classifies an anomalous vibration window before the alert engine decides on it (the ``new`` alert
carries the defect class), so the classifier's feature cost is on the alert's path during an alert storm.
This runs the alert phase of ``benchmarks/run.py`` (``bench_alerts``: 480 machines, 48 with vibration, 120
fault episodes, ``around_alerts``) once per model directory and round, each agent with its own folder, the
rest of the config as shipped, against one Mosquitto and one InfluxDB::

    .venv/bin/python benchmarks/defect_alert_path.py --model v1=/tmp/v1 --model envelope=models/defect_classifier \\
        [--rounds 2] [--alert-speed 0.417] [--out benchmarks/results/defect_alert_path.json]

Rounds alternate the models (A B, A B, ...) so that a busy box's drift falls on both. Prints, per run, the
deciding-block and first-faulty-block latency percentiles (``docs/benchmarks.md`` defines them), episodes
raised and false alerts; writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from agent.health.selfmetrics import series_field  # noqa: E402
from benchmarks import run as bench  # noqa: E402
from benchmarks.harness import SERVICE_PIDS, AgentProcess  # noqa: E402
from pdm_tools.dev import services as devservices  # noqa: E402

_write_config = AgentProcess.write_config
AGENTS: list[AgentProcess] = []  # every agent configured since the last with_defect_model


def with_defect_model(model_dir: Path) -> None:
    """Make every agent the benchmark starts from now on serve the defect classifier in ``model_dir``."""
    AGENTS.clear()

    def write_config(self: AgentProcess) -> Path:
        if self not in AGENTS:
            AGENTS.append(self)
        path = _write_config(self)
        self._config["inference"]["defect"]["path"] = str(model_dir.resolve())
        path.write_text(yaml.safe_dump(self._config, sort_keys=False))
        return path

    AgentProcess.write_config = write_config  # type: ignore[method-assign]


def summary(name: str, model_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    return {
        "model": name,
        "model_dir": str(model_dir),
        "feature_spec_groups": manifest["feature_spec"].get("groups", "version 1 (default)"),
        "n_features": manifest["inputs"][0]["shape"][1],
        "speed": result["speed"],
        "published_msgs_per_s": result["published_msgs_per_s"],
        "agent_cpu_pct": result["agent_cpu_pct"],
        "episodes": result["episodes"],
        "alerts_matched": result["alerts_matched"],
        "false_alerts": result["false_alerts"],
        "decision_p50_ms": result["decision_p50_ms"],
        "decision_p99_ms": result["decision_p99_ms"],
        "decision_max_ms": result["decision_max_ms"],
        "onset_p50_ms": result["onset_p50_ms"],
        "onset_p99_ms": result["onset_p99_ms"],
        # That the classifier ran: the agent's counter, and the vibration alerts that name a defect class.
        "defect_classified": sum(a.counters.get(series_field("defect.classified"), 0.0) for a in AGENTS),
        "new_alerts_with_defect": sum(
            1 for a in AGENTS for alert in a.alerts if alert.body.get("state") == "new" and alert.body.get("defect")
        ),
    }


def ms(value: float | None) -> str:
    """A latency for the table: whole milliseconds, or "refused" (fewer alerts than a percentile needs)."""
    return "refused" if value is None else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", action="append", required=True, metavar="NAME=DIR", help="a defect classifier directory (repeat)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs per model, alternating (default 1)")
    parser.add_argument(
        "--alert-speed",
        type=float,
        default=bench.REFERENCE_RAMP_SPEED / 2 * bench.FULL["fleet"][1] / bench.FULL["alert_fleet"][1],
        help="speed of the alert runs (default: the reference load of benchmarks/run.py --only alerts)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "defect_alert_path.json")
    args = parser.parse_args(argv)
    models = []
    for item in args.model:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "manifest.json").is_file():
            parser.error(f"--model {item!r}: expected NAME=DIR with a manifest.json in DIR")
        models.append((name, Path(folder)))
    cfg = dict(bench.FULL)
    runs: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="pdm-defect-alerts-") as tmp:
        workdir = Path(tmp)
        broker = devservices.start_mosquitto(workdir / "mosquitto", extra_conf=bench.BROKER_CONF)
        influx = devservices.start_influxdb_v1(workdir / "influxdb")
        try:
            SERVICE_PIDS.update({"mosquitto": broker.process.pid, "influxd": influx.process.pid})  # type: ignore[union-attr]
            services = (broker.host, broker.port, influx.url)
            for r in range(args.rounds):
                for name, folder in models:
                    bench.log(f"defect alert path: round {r + 1}, model {name} ({folder})")
                    with_defect_model(folder)
                    own = workdir / f"round{r}-{name}"
                    own.mkdir()
                    result = bench.bench_alerts(services, own, cfg, args.alert_speed, "around_alerts")
                    runs.append({"round": r + 1, **summary(name, folder, result)})
        finally:
            AgentProcess.write_config = _write_config  # type: ignore[method-assign]
            broker.stop()
            influx.stop()
    report = {"started": started, "command": " ".join(["python", *sys.argv]), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        "| round | model | deciding block p50 / p99 / max ms | first faulty block p50 / p99 ms | raised | false "
        "| classified |"
    )
    print("|---|---|---|---|---|---|---|")
    for x in runs:
        print(
            f"| {x['round']} | {x['model']} | {ms(x['decision_p50_ms'])} / {ms(x['decision_p99_ms'])} / "
            f"{ms(x['decision_max_ms'])} | {ms(x['onset_p50_ms'])} / {ms(x['onset_p99_ms'])} "
            f"| {x['alerts_matched']}/{x['episodes']} "
            f"| {x['false_alerts']} | {x['defect_classified']:.0f} "
            f"({x['new_alerts_with_defect']} new alerts name a defect) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
