"""How much a database outage costs the spool at the demo's data rate, and whether a day fits the default cap.

The agent runs with the example config against a real broker while InfluxDB is unreachable (connection
refused); the simulator publishes the demo's machines (4, vibration at 10240 Hz and process values at
1 Hz) for 60 simulated seconds, healthy, so this is the steady rate. Points and bytes per simulated second
are extrapolated to 24 hours and compared with ``spool.max_points`` and ``spool.max_bytes``. Held blocks
(``around_alerts``) are kept in memory, not spooled, so they are not part of the outage's growth; each
alert adds the raw vibration around it (``2 × keep_blocks`` blocks), printed apart.

    .venv/bin/python benchmarks/spool_outage.py
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from agent.config import load_config
from pdm_tools.dev import services as devservices

REPO = Path(__file__).resolve().parents[1]
SIMULATED_S = 60.0


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pdm-outage-") as tmp:
        work = Path(tmp)
        broker = devservices.start_mosquitto(work / "mosquitto")
        try:
            data = yaml.safe_load((REPO / "config/agent.yaml").read_text())
            data["mqtt"].update(host=broker.host, port=broker.port)
            data["storage"]["url"] = f"http://127.0.0.1:{devservices.free_port()}"  # nothing listens: an outage
            data["storage"]["v1"]["create_database"] = False
            data["spool"]["path"] = str(work / "spool.db")
            data["health"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
            for model in [*data["inference"]["models"], data["inference"]["defect"]]:
                model["path"] = str((REPO / "config" / model["path"]).resolve())
            (work / "agent.yaml").write_text(yaml.safe_dump(data))
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(work / "agent.yaml")],
                stdout=(work / "agent.log").open("w"),
                stderr=subprocess.STDOUT,
            )
            time.sleep(5)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "agent",
                    "simulate",
                    "--machines",
                    "4",
                    "--host",
                    broker.host,
                    "--port",
                    str(broker.port),
                    "--duration",
                    str(SIMULATED_S),
                    "--speed",
                    "2",
                ],
                check=True,
                capture_output=True,
            )
            time.sleep(5)
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
        finally:
            broker.stop()
        with sqlite3.connect(work / "spool.db") as db:
            rows, points, payload = db.execute("SELECT count(*), sum(points), sum(length(body)) FROM entry").fetchone()
        config = load_config(REPO / "config/agent.yaml", environ={})
        max_points, max_bytes = config.spool.max_points, config.spool.max_bytes
        per_alert = 2 * config.storage.raw_vibration.keep_blocks * 2048
        day = 86_400 / SIMULATED_S
        print(
            f"spooled in {SIMULATED_S:.0f} simulated s of outage: {rows} rows, {points} points, {payload / 1e6:.2f} MB"
        )
        fits = points * day <= max_points and payload * day <= max_bytes
        print(
            f"per 24 h at this rate: {points * day / 1e6:.1f} M points, {payload * day / 1e9:.2f} GB; default caps "
            f"{max_points / 1e6:.0f} M points, {max_bytes / 2**30:.0f} GiB: {'fits' if fits else 'DOES NOT FIT'}"
        )
        room = (max_points - points * day) / per_alert
        print(f"each alert adds {per_alert} points of raw vibration: room for {max(room, 0):.0f} alerts in that day")


if __name__ == "__main__":
    main()
