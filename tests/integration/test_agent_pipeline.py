"""The agent built by the composition root, in-process, against a real Mosquitto and InfluxDB 1.6.7."""

import gc
import time
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.decode.encode import encode_block, encode_fields
from agent.storage.influx_v1 import InfluxV1Sink
from pdm_tools.dev.services import victoria_metrics_series
from tests.integration.mqtt_helpers import Subscriber
from tests.integration.mqtt_helpers import publish as _publish

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _config(
    mosquitto,
    influxdb_v1,
    database: str,
    tmp_path: Path,
    agent_id: str,
    raw_mode: str = "all",
    scoring_process: bool = False,
):
    return parse_config(
        {
            "agent": {"id": agent_id, "heartbeat_s": 60, "scoring_process": scoring_process},
            "health": {"port": 0},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "subscriptions": ["factory/#"]},
            "storage": {
                "url": influxdb_v1.url,
                "v1": {"database": database},
                "flush_interval_s": 0.2,
                "raw_vibration": {"mode": raw_mode},
            },
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {
                "models": [
                    {"path": str(REPO / "models/vibration_anomaly"), "sensors": ["vibration"]},
                    {"path": str(REPO / "models/process_anomaly"), "sensors": ["process"]},
                ]
            },
        }
    )


@pytest.fixture(params=[False, True], ids=["scoring-thread", "scoring-process"])
def running_agent(mosquitto, influxdb_v1, influx_db_name, tmp_path, request):
    agent_id = f"it-{time.monotonic_ns()}"
    config = _config(mosquitto, influxdb_v1, influx_db_name, tmp_path, agent_id, scoring_process=request.param)
    agent = build_agent(config)
    sub = Subscriber(mosquitto.host, mosquitto.port, [f"pdm/{agent_id}/#"])
    agent.start()
    assert agent.mqtt.wait_subscribed(20)
    yield agent, sub
    agent.stop()
    sub.close()


def test_bad_input_is_dead_lettered_with_its_reason_and_good_input_is_stored(
    running_agent, mosquitto, influxdb_v1, influx_db_name
):
    agent, sub = running_agent
    t0 = time.time_ns() - 10**9
    _publish(
        mosquitto,
        [
            ("factory/s1/l1/m01/process", b'{"v":1,"fields":{"temperature":'),
            ("factory/s1/l1/m01/process", encode_fields({"temperature": 61.5, "current": 12.0}, ts_ns=t0, seq=1)),
            ("factory/s1/l1/m01", encode_fields({"temperature": 1.0}, ts_ns=t0, seq=2)),
            ("factory/s1/l1/m01/process", b'{"v":1,"value":true}'),
            ("factory/s1/l1/m01/process", encode_fields({"temperature": 62.0, "current": 12.1}, ts_ns=t0 + 10**9)),
        ],
    )
    deadletter = f"pdm/{agent.config.agent.id}/deadletter"
    seen = sub.wait_for(lambda msgs: sum(t == deadletter for t, _ in msgs) >= 3)
    codes = sorted(body["code"] for topic, body in seen if topic == deadletter)
    assert codes == ["json", "topic", "value"]
    assert all(body["reason"] for topic, body in seen if topic == deadletter)
    assert agent.writer.flush(20)

    sink = InfluxV1Sink(influxdb_v1.url, influx_db_name)
    rows = sink.query('SELECT "temperature", "current" FROM "reading" WHERE "machine" = \'m01\'')
    assert [v[1:] for v in rows[0]["values"]] == [[61.5, 12.0], [62.0, 12.1]]
    assert agent.metrics.get("decode.errors") == 3
    assert agent.metrics.get("ingest.messages") == 5


def test_vibration_blocks_are_windowed_scored_and_stored(running_agent, mosquitto, influxdb_v1, influx_db_name):
    agent, _ = running_agent
    model = agent.router.model_for(_source("vibration"))
    assert model is not None
    rate = 10240.0
    n_blocks = 6
    block = 2048
    rng = np.random.default_rng(0)
    t = np.arange(n_blocks * block) / rate
    signal = (0.5 * np.sin(2 * np.pi * 24.7 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    start = time.time_ns() - 60 * 10**9
    step_ns = round(block * 1e9 / rate)
    _publish(
        mosquitto,
        [
            (
                "factory/s1/l1/m07/vibration",
                encode_block(signal[i * block : (i + 1) * block], rate, ts_ns=start + i * step_ns, seq=i),
            )
            for i in range(n_blocks)
        ],
    )
    expected_windows = (n_blocks * block - model.spec.window_samples) // model.spec.hop_samples + 1
    deadline = time.monotonic() + 20
    while agent.metrics.get("windows.scored") < expected_windows and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.writer.flush(20)

    sink = InfluxV1Sink(influxdb_v1.url, influx_db_name)
    samples = sink.query('SELECT count("value") FROM "vibration" WHERE "machine" = \'m07\'')
    assert samples[0]["values"][0][1] == n_blocks * block
    scores = sink.query('SELECT "score", "threshold" FROM "anomaly_score" WHERE "machine" = \'m07\'')
    assert len(scores[0]["values"]) == expected_windows
    features = sink.query('SELECT "kurtosis", "rms" FROM "features" WHERE "machine" = \'m07\'')
    rms = [row[2] for row in features[0]["values"]]
    assert rms == pytest.approx([float(np.sqrt(np.mean(signal[:4096].astype(np.float64) ** 2)))] * len(rms), rel=0.05)


def test_stop_publishes_offline_status_and_unfreezes_what_the_agent_froze(
    mosquitto, influxdb_v1, influx_db_name, tmp_path
):
    agent_id = f"it-{time.monotonic_ns()}"
    agent = build_agent(_config(mosquitto, influxdb_v1, influx_db_name, tmp_path, agent_id))
    gc.unfreeze()
    threadpool_limits(2, user_api="blas")
    agent.start()
    assert agent.mqtt.wait_subscribed(20)
    # While it runs, what it built before its threads started is out of the collector's sight ...
    assert gc.get_freeze_count() > 0
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and set(blas) == {1}  # ... and numpy's BLAS runs on the calling thread only
    agent.stop()
    assert gc.get_freeze_count() == 0  # ... and handed back at stop
    sub = Subscriber(mosquitto.host, mosquitto.port, [f"pdm/{agent_id}/status"])
    try:
        seen = sub.wait_for(lambda msgs: len(msgs) >= 1)
        assert seen[-1][1]["state"] == "offline"
    finally:
        sub.close()


def _source(sensor: str):
    from agent.records import Source

    return Source.of(site="s1", line="l1", machine="m01", sensor=sensor)


def test_the_v2_write_path_stores_readings_through_the_agent(mosquitto, victoria_metrics, tmp_path):
    """storage.type influx_v2 (influxdb-client), against VictoriaMetrics, which accepts the v2 write API."""
    agent_id = f"it-{time.monotonic_ns()}"
    config = parse_config(
        {
            "agent": {"id": agent_id, "heartbeat_s": 60},
            "health": {"port": 0},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
            "storage": {
                "type": "influx_v2",
                "url": victoria_metrics.url,
                "v2": {"org": "plant", "bucket": "pdm", "token": "t"},
            },
            "spool": {"path": str(tmp_path / "spool.db")},
        }
    )
    agent = build_agent(config)
    agent.start()
    try:
        assert agent.mqtt.wait_subscribed(20)
        machine = f"v2-{time.monotonic_ns()}"
        t0 = time.time_ns() - 10 * 10**9
        _publish(
            mosquitto,
            [
                (f"factory/s1/l1/{machine}/process", encode_fields({"pressure": 3.0 + i}, ts_ns=t0 + i * 10**9))
                for i in range(5)
            ],
        )
        deadline = time.monotonic() + 20
        while agent.metrics.get("ingest.readings") < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.writer.flush(20)
    finally:
        agent.stop()
    series = victoria_metrics_series(victoria_metrics, f'{{__name__="reading_pressure",machine="{machine}"}}', 5)
    assert [s["values"] for s in series] == [[3.0, 4.0, 5.0, 6.0, 7.0]]
