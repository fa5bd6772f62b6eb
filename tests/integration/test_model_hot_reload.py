"""A new model version dropped into the models directory of a running agent is swapped in without a restart.

Real Mosquitto and InfluxDB 1.6.7, the gateway simulator publishing two machines in real time, and the
agent built by the composition root with ``inference.models_dir`` and a model entry by ``model_id``.
Mid-run a new version of the vibration model (same ONNX, another version and threshold, its manifest
rewritten with the right sha256) is moved into the directory: it must be picked up, and every window
(source, window start) must have exactly one score in InfluxDB — none lost, none scored twice across the
swap — with the new version on every score after the swap. Then a corrupted version (bad sha256) is
dropped: it must be refused and counted once, and the running version must keep scoring.
No timing threshold is asserted; waits have generous deadlines.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import schema
from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.inference.manifest import MANIFEST_FILE, sha256_file
from agent.storage.influx_v1 import InfluxV1Sink
from pdm_tools.simulator.config import config_from_dict
from pdm_tools.simulator.gateway import Gateway, GatewayStats

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
VIBRATION = REPO / "models" / "vibration_anomaly"
MODEL_ID = "vibration-anomaly"
NEW_THRESHOLD = 0.9
HOP_NS = 200_000_000  # 2048 samples at the simulator's 10240 Hz: the vibration spec's hop


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def drop_version(models: Path, name: str, version: str, threshold: float, corrupt: bool = False) -> Path:
    """Stage a copy of the shipped vibration model as ``version`` and move it into ``models`` in one rename."""
    staging = models / f".staging-{name}"  # dot-directories are ignored by the registry
    shutil.copytree(VIBRATION, staging)
    path = staging / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(version=version, threshold=threshold, sha256=sha256_file(staging / data["file"]))
    if corrupt:
        data["sha256"] = "0" * 64
    path.write_text(json.dumps(data, indent=2) + "\n")
    target = models / name
    staging.rename(target)
    return target


def scored(agent) -> float:
    return agent.metrics.get("windows.scored", model=MODEL_ID)


def test_a_new_version_is_swapped_in_without_losing_or_double_scoring_a_window(
    mosquitto, influxdb_v1, influx_db_name, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(VIBRATION, models / "vibration_anomaly")
    prefix = f"hr{time.monotonic_ns()}"
    config = parse_config(
        {
            "agent": {"id": f"it-{prefix}", "heartbeat_s": 60},
            "health": {"port": 0},
            "mqtt": {
                "host": mosquitto.host,
                "port": mosquitto.port,
                "topic_template": prefix + "/{site}/{line}/{machine}/{sensor}",
            },
            "storage": {
                "url": influxdb_v1.url,
                "v1": {"database": influx_db_name},
                "flush_interval_s": 0.2,
                "raw_vibration": {"mode": "none"},
            },
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {
                "models_dir": str(models),
                "reload_interval_s": 0.2,
                "models": [{"model_id": MODEL_ID, "sensors": ["vibration"]}],
            },
        }
    )
    agent = build_agent(config)
    gateway = Gateway(
        config_from_dict(
            {
                "broker": {"host": mosquitto.host, "port": mosquitto.port, "client_id": f"sim-{prefix}"},
                "topics": {"prefix": prefix},
                "machines": {"count": 2},
                "duration_s": None,
                "speed": 1.0,
                "seed": 3,
            }
        )
    )
    stop_gateway = threading.Event()
    stats: list[GatewayStats] = []
    publisher = threading.Thread(target=lambda: stats.append(gateway.run(stop_gateway)), name="simulator")
    agent.start()
    try:
        assert agent.mqtt.wait_subscribed(20)
        publisher.start()
        wait_until(lambda: scored(agent) >= 20, "the first version to score windows")
        assert agent.registry is not None
        assert agent.registry.active()[MODEL_ID][0] == "1.0.0"

        # A new version, dropped mid-run.
        drop_version(models, "vibration_anomaly-1.1.0", "1.1.0", NEW_THRESHOLD)
        wait_until(lambda: agent.registry.active()[MODEL_ID][0] == "1.1.0", "version 1.1.0 to be swapped in")
        at_swap = scored(agent)
        wait_until(lambda: scored(agent) >= at_swap + 20, "version 1.1.0 to score windows")
        assert agent.metrics.get("models.loaded", model=MODEL_ID, version="1.1.0") == 1
        assert agent.metrics.get("models.loaded", model=MODEL_ID, version="1.0.0") == 0
        assert agent.metrics.get("models.swaps", model=MODEL_ID) == 1

        # A corrupted version: refused once, and 1.1.0 keeps scoring.
        bad = drop_version(models, "vibration_anomaly-1.2.0", "1.2.0", NEW_THRESHOLD, corrupt=True)
        wait_until(lambda: agent.metrics.get("models.refused", reason="sha256") == 1, "the bad version's refusal")
        at_refusal = scored(agent)
        wait_until(lambda: scored(agent) >= at_refusal + 20, "version 1.1.0 to keep scoring")
        assert agent.registry.active()[MODEL_ID][0] == "1.1.0"
        assert "sha256 mismatch" in str(agent.registry.refused()[bad])
        assert agent.metrics.get("models.refused") == 1  # many rescans since, the unchanged directory not retried

        stop_gateway.set()
        publisher.join(60)
        assert not publisher.is_alive() and stats and stats[0].unacked == 0
        # Everything the simulator published is received and every window is scored (or stopping drains it).
        wait_until(
            lambda: agent.metrics.get("ingest.messages") >= stats[0].messages, "the agent to receive every message"
        )
        wait_until(
            lambda: scored(agent) == agent.metrics.get("windows.emitted", kind="vibration"), "every window's score"
        )
        assert agent.writer.flush(30)
    finally:
        stop_gateway.set()
        agent.stop()

    m = agent.metrics
    assert m.get("windows.dropped") == 0 and m.get("windows.rejected") == 0 and m.get("windows.gaps") == 0
    assert m.get("models.swaps", model=MODEL_ID) == 1 and m.get("models.refused") == 1
    assert m.get("mqtt.connects") == 1  # one agent, one connection: no restart

    rows = InfluxV1Sink(influxdb_v1.url, influx_db_name).query(
        f'SELECT "{schema.WINDOW_START_FIELD}", "threshold" FROM "{schema.SCORE}" '
        f"WHERE \"{schema.TAG_MODEL_ID}\" = '{MODEL_ID}' GROUP BY *"
    )
    scores: dict[str, list[tuple[int, str, float]]] = defaultdict(list)  # machine -> (window start, version, threshold)
    for series in rows:
        tags = series["tags"]
        assert tags["sensor"] == "vibration"
        columns = series["columns"]
        for row in series["values"]:
            record = dict(zip(columns, row, strict=True))
            scores[tags["machine"]].append(
                (int(record[schema.WINDOW_START_FIELD]), tags[schema.TAG_MODEL_VERSION], record["threshold"])
            )
    assert sorted(scores) == ["m01", "m02"]
    total = sum(len(v) for v in scores.values())
    # Exactly once: every score the agent counted is one stored point (a window scored twice by the same
    # version would overwrite its point), and no window start has two points (two versions).
    assert total == scored(agent) == m.get("windows.emitted", kind="vibration")
    for machine, items in scores.items():
        items.sort()
        starts = [start for start, _, _ in items]
        assert len(set(starts)) == len(starts), f"{machine}: a window was scored twice"
        # None lost: consecutive windows one hop apart, from the first window to the last.
        steps = {b - a for a, b in itertools.pairwise(starts)}
        assert steps <= {HOP_NS - 1, HOP_NS, HOP_NS + 1}, f"{machine}: windows missing, steps {sorted(steps)[:5]}"
        versions = [version for _, version, _ in items]
        print(f"{machine}: {len(items)} windows scored, {versions.count('1.0.0')} of them by 1.0.0")
        assert set(versions) == {"1.0.0", "1.1.0"}, machine
        first_new = versions.index("1.1.0")
        assert set(versions[first_new:]) == {"1.1.0"}, f"{machine}: a window after the swap scored by 1.0.0"
        assert {t for _, v, t in items if v == "1.1.0"} == {NEW_THRESHOLD}
