"""The fleet client's process model reads the agent's own readings from the local InfluxDB (``LocalStore``)
instead of a data folder: a real InfluxDB 1.x, the agent's config file, the ClientApp's train and evaluate
handlers called as the SuperNode calls them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.app.metadata import Metadata

from agent.bootstrap import build_sink
from agent.config import load_config
from pdm_tools.dev import services as devservices
from pdm_tools.fleet_learning.data import ClientDataError
from pdm_tools.fleet_learning.process import TRAIN_ROWS, init_autoencoder, to_arrays
from pdm_tools.fleet_learning.process_app import build_process_client_app, store_client

NS = 1_000_000_000
ROWS = 600
FIELDS = ["flow", "pressure", "temperature"]


def _readings(seed: int) -> np.ndarray:
    """Three channels moving with one latent load, as a process machine's readings do."""
    rng = np.random.default_rng(seed)
    load = np.cumsum(rng.normal(0.0, 0.05, ROWS))
    return np.round(np.array([30.0, 2.0, 60.0]) + np.outer(load, [1.0, -0.2, 0.5]) + rng.normal(0, 0.1, (ROWS, 3)), 4)


@pytest.fixture
def agent_config(influxdb_v1: devservices.Service, influx_db_name: str, tmp_path: Path) -> tuple[Path, np.ndarray]:
    """An agent config whose local store holds ``ROWS`` readings of m1 (1 s apart, the last minute ago), a
    few of m2 and one incomplete m1 reading; returns the config file and m1's readings."""
    path = tmp_path / "agent.yaml"
    path.write_text(
        json.dumps(
            {
                "storage": {"url": influxdb_v1.url, "v1": {"database": influx_db_name}},
                "spool": {"path": str(tmp_path / "spool.db")},
            }
        )
    )
    values = _readings(0)
    start = (time.time_ns() // NS - 60 - ROWS) * NS
    lines = [
        f"reading,machine=m1,sensor=process {','.join(f'{n}={v}' for n, v in zip(FIELDS, row, strict=True))},seq={i}i "
        f"{start + i * NS}"
        for i, row in enumerate(values)
    ]
    lines += [f"reading,machine=m2,sensor=process flow=1.0 {start + i * NS}" for i in range(20)]
    lines.append(f"reading,machine=m1,sensor=process flow=99.0 {start + ROWS * NS}")  # lacks two channels
    sink = build_sink(load_config(path))
    try:
        sink.write(lines)
    finally:
        sink.close()
    return path, values


def _call(app_node: dict[str, bool | float | int | str], message_type: str, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )
    context = Context(run_id=1, node_id=1, node_config=app_node, state=RecordDict(), run_config={})
    return build_process_client_app()(Message(content, metadata=metadata), context)  # type: ignore[call-overload]


def test_process_client_reads_its_machine_from_the_local_store(agent_config: tuple[Path, np.ndarray]) -> None:
    path, values = agent_config
    client = store_client(path, "m1", "1h", FIELDS)
    # Exactly the stored readings, oldest first, in the fleet's channel order; the incomplete one left out.
    assert client.name == "m1" and client.labels == (None,)
    assert np.array_equal(client.values[0], values)
    assert store_client(path, "m1", "1h").values[0].shape == (ROWS, 3)  # every field, seq left out
    with pytest.raises(ClientDataError, match=f"machine m2: 20 complete readings .* needs at least {TRAIN_ROWS}"):
        store_client(path, "m2", "1h")
    with pytest.raises(ClientDataError, match="machine m1: 0 complete readings"):
        store_client(path, "m1", "1h", ["flow", "no_such_field"])

    # The ClientApp as a SuperNode with --node-config "agent-config='…' machine='m1' fields='…'" runs it.
    node: dict[str, bool | float | int | str] = {
        "agent-config": str(path),
        "machine": "m1",
        "since": "1h",
        "fields": ",".join(FIELDS),
    }
    start = init_autoencoder(3, (6, 2, 6), seed=0)
    config = ConfigRecord({"channels": 3, "local-epochs": 3, "learning-rate": 1e-2, "server-round": 1})
    reply = _call(node, MessageType.TRAIN, RecordDict({"arrays": to_arrays(start), "config": config}))
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == TRAIN_ROWS - 29  # the commissioning windows of the default detector
    assert set(reply.content.array_records["arrays"]) == {f"{p}{i}" for p in "wb" for i in range(4)}
    trained = reply.content.array_records["arrays"]
    evaluated = _call(
        node, MessageType.EVALUATE, RecordDict({"arrays": trained, "config": ConfigRecord({"channels": 3})})
    )
    counts = {k: int(v) for k, v in evaluated.content.metric_records["metrics"].items() if isinstance(v, int)}
    # No labels on an agent: every alarm is counted as a false one, every later step is scored.
    assert counts["tp"] == counts["fn"] == 0 and counts["fp"] + counts["tn"] == ROWS - TRAIN_ROWS
    # Another machine on the same agent (the same ClientApp process, as in a simulation) is its own data.
    with pytest.raises(ClientDataError, match="machine m2: 0 complete readings"):
        _call({**node, "machine": "m2"}, MessageType.TRAIN, RecordDict({"arrays": to_arrays(start), "config": config}))
    # A fleet model of other channels is refused by name (the SuperNode sends the error back as the reply).
    other = RecordDict({"arrays": to_arrays(init_autoencoder(4, (2,), 0)), "config": ConfigRecord({"channels": 4})})
    with pytest.raises(ClientDataError, match="the fleet model has 4 channels, this client's readings 3"):
        _call(node, MessageType.TRAIN, other)
