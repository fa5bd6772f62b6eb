"""How much a database outage costs the spool at the demo's data rate, and whether a day fits the default cap.

The agent runs with the example config against a real broker while InfluxDB is unreachable (connection
refused); the simulator publishes the demo's machines (4, vibration at 10240 Hz and process values at
1 Hz) for 60 simulated seconds, healthy, so this is the steady rate. Rows and bytes per simulated second
are extrapolated to 24 hours and compared with ``spool.max_rows``. Each alert adds the raw vibration
around it (``2 × keep_blocks`` blocks of samples with the default ``around_alerts`` policy), printed apart.

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
            rows, payload = db.execute("SELECT count(*), sum(length(line)) FROM spool").fetchone()
        config = load_config(REPO / "config/agent.yaml", environ={})
        cap = config.spool.max_rows
        per_alert = 2 * config.storage.raw_vibration.keep_blocks * 2048
        day = 86_400 / SIMULATED_S
        print(
            f"spooled in {SIMULATED_S:.0f} simulated s of outage: {rows} rows, {payload / 1e6:.2f} MB of line protocol"
        )
        print(
            f"per 24 h at this rate: {rows * day / 1e6:.1f} M rows, {payload * day / 1e9:.2f} GB; "
            f"default cap spool.max_rows {cap / 1e6:.0f} M rows: {'fits' if rows * day <= cap else 'DOES NOT FIT'}"
        )
        room = (cap - rows * day) / per_alert
        print(f"each alert adds {per_alert} rows of raw vibration: room for {max(room, 0):.0f} alerts in that day")


if __name__ == "__main__":
    main()
