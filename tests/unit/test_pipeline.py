"""The pipeline workers' contracts, built by the composition root's builders with fakes for the I/O
(spool, broker) and the model."""

import dataclasses
import json
import queue
from collections.abc import Callable

import numpy as np
import pytest

from agent.alerts.engine import AlertEngine
from agent.alerts.rules import AlertRule, RuleBook
from agent.bootstrap import Models, Stages, build_decoder, build_ingest, build_scoring, build_stages
from agent.commissioning.scorer import CommissioningScorer
from agent.config import Config, parse_config
from agent.decode.encode import encode_fields
from agent.decode.fieldkeys import FieldKeys
from agent.features.spec import FeatureSpec
from agent.features.windows import Windower
from agent.inference.router import ModelRouter
from agent.metrics import Metrics
from agent.records import Message, Reading, SampleBlock, Source, Window
from agent.runtime.ingest import IngestWorker
from agent.runtime.scoring import ScoringWorker
from agent.spool.codec import Entry, Kind, encode_lines
from agent.storage.entries import entry_lines
from agent.storage.points import RawVibrationPolicy
from agent.topics import format_rfc3339

T0 = 1_790_000_000 * 10**9


def _engine(raise_n: int, clear_after: int) -> AlertEngine:
    return AlertEngine(RuleBook(AlertRule(raise_n=raise_n, raise_m=raise_n, clear_after=clear_after)))


SPEC = FeatureSpec(kind="process", window_samples=3, hop_samples=1, channels=("temperature",))


class Journal:
    """One ordered record of what the fakes were asked to do."""

    def __init__(self) -> None:
        self.events: list[tuple] = []


class FakeSpool:
    def __init__(self, journal: Journal, failures: int = 0) -> None:
        self.journal = journal
        self.failures = failures
        self.lines: list[str] = []
        self.entries: list[Entry] = []

    def append(self, entries):
        """What the ingest worker appends: binary entries; the journal counts their points."""
        if self.failures:
            self.failures -= 1
            self.journal.events.append(("append_failed",))
            raise OSError("disk full")
        first = len(self.entries) + 1
        self.entries.extend(entries)
        self.lines.extend(line for e in entries for line in entry_lines(e.kind, e.body, self.bodies))
        self.journal.events.append(("append", sum(e.points for e in entries)))
        return list(range(first, first + len(entries)))

    def bodies(self, ids):
        return [self.entries[i - 1].body for i in ids]

    def append_lines(self, lines):
        """What the heartbeat appends: line protocol it produced."""
        return self.append([encode_lines(lines)])

    def append_entries(self, entries):
        """What the scoring worker appends: the points it produced, as entries."""
        return self.append(entries)


class FakeBroker:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.published: list[tuple[str, dict]] = []

    def publish(self, topic, payload, qos=1, retain=False):
        self.published.append((topic, json.loads(payload)))
        self.journal.events.append(("publish", topic))

    def ack(self, mid, qos):
        self.journal.events.append(("ack", mid))

    def ack_batch(self, acks):
        for mid, qos in acks:
            self.ack(mid, qos)


class FakeModel:
    """Scores a window by its mean temperature; records each batch it is given."""

    model_id = "fake"
    version = "0.1"
    threshold = 100.0
    spec = SPEC
    explainable = None
    adaptable = None

    def __init__(self) -> None:
        self.batches: list[int] = []

    def score(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        return x[:, SPEC.feature_names().index("temperature_mean")].astype(np.float32)


def _message(mid: int, payload: bytes, topic: str = "factory/s1/l1/m01/process") -> Message:
    return Message(topic=topic, payload=payload, qos=1, mid=mid, received_ns=T0 + 10**12)


def _config(raw_mode: str = "none", keep_blocks: int = 10) -> Config:
    return parse_config(
        {
            "agent": {"id": "edge-01"},
            "storage": {"raw_vibration": {"mode": raw_mode, "keep_blocks": keep_blocks}},
            "queues": {"put_timeout_s": 0.01},
            "inference": {"max_batch": 64},
        }
    )


def _stages(config: Config, router: ModelRouter, metrics: Metrics) -> Stages:
    return build_stages(config, metrics, Models(router, classifier=None, registry=None))


def _ingest(
    journal: Journal,
    spool: FakeSpool,
    router: ModelRouter,
    windows: queue.Queue,
    metrics: Metrics,
    before_commit: Callable[[], None] | None = None,
) -> IngestWorker:
    config = _config()
    return build_ingest(
        config,
        _stages(config, router, metrics),
        metrics,
        messages=queue.Queue(),
        windows=windows,
        spool=spool,
        broker=FakeBroker(journal),
        before_commit=before_commit,
    )


def _scoring(
    journal: Journal,
    router: ModelRouter,
    engine: AlertEngine,
    metrics: Metrics,
    spool: FakeSpool | None = None,
    broker: FakeBroker | None = None,
    config: Config | None = None,
    baseline: CommissioningScorer | None = None,
    store_raw=lambda blocks: None,
) -> tuple[ScoringWorker, Stages]:
    config = config or _config()
    stages = _stages(config, router, metrics)
    if baseline is not None:
        stages = dataclasses.replace(stages, baseline=baseline)
    worker = build_scoring(
        config,
        stages,
        metrics,
        spool=spool or FakeSpool(journal),
        broker=broker or FakeBroker(journal),
        engine=engine,
        store_raw=store_raw,
    )
    return worker, stages


@pytest.fixture
def router() -> ModelRouter:
    return ModelRouter([(("process",), FakeModel())])


def test_messages_are_acknowledged_only_after_their_readings_are_in_the_spool(router):
    journal, metrics, windows = Journal(), Metrics(), queue.Queue()
    spool = FakeSpool(journal)
    worker = _ingest(journal, spool, router, windows, metrics)
    worker.process([_message(i, encode_fields({"temperature": 20.0 + i}, ts_ns=T0 + i * 10**9)) for i in range(1, 4)])
    assert journal.events == [("append", 3), ("ack", 1), ("ack", 2), ("ack", 3)]
    assert metrics.get("ingest.readings") == 3


def test_new_field_names_are_saved_once_per_batch_before_its_commit(router, tmp_path):
    """The agent's field-name file is saved before the commit of the batch that brought new names (so before
    any acknowledgement), once per batch rather than once per new machine (two fsyncs each)."""
    journal, metrics = Journal(), Metrics()
    path = tmp_path / "field_keys.json"
    keys = FieldKeys(max_per_machine=10, max_total=100, path=path, deferred=True)
    saved_before_append = []

    def flush() -> None:
        keys.flush()
        saved_before_append.append(path.exists() and json.loads(path.read_text())["machines"])
        journal.events.append(("flush",))

    config = _config()
    worker = build_ingest(
        config,
        _stages(config, router, metrics),
        metrics,
        messages=queue.Queue(),
        windows=queue.Queue(),
        spool=FakeSpool(journal),
        broker=FakeBroker(journal),
        decoder=build_decoder(config, keys),
        before_commit=flush,
    )
    batch = [
        Message(f"factory/s1/l1/m{i}/process", encode_fields({"t": 1.0}, ts_ns=T0), qos=1, mid=i, received_ns=T0)
        for i in range(1, 6)
    ]
    assert not path.exists()  # nothing saved while decoding
    worker.process(batch)
    assert journal.events == [("flush",), ("append", 5), *[("ack", i) for i in range(1, 6)]]
    assert saved_before_append == [{f"m{i}": ["t"] for i in range(1, 6)}]


def test_a_failing_spool_delays_the_acknowledgement_until_the_readings_are_durable(router):
    journal, metrics = Journal(), Metrics()
    worker = _ingest(journal, FakeSpool(journal, failures=2), router, queue.Queue(), metrics)
    worker.process([_message(7, encode_fields({"temperature": 20.0}, ts_ns=T0))])
    assert journal.events == [("append_failed",), ("append_failed",), ("append", 1), ("ack", 7)]
    assert metrics.get("spool.append_failures") == 2


def test_rejected_messages_are_dead_lettered_counted_and_acknowledged(router):
    journal, metrics = Journal(), Metrics()
    worker = _ingest(journal, FakeSpool(journal), router, queue.Queue(), metrics)
    worker.process([_message(1, b"{not json"), _message(2, b"1.0", topic="factory/s1/l1/m01")])
    broker = worker._broker
    assert [(topic, body["code"]) for topic, body in broker.published] == [
        ("pdm/edge-01/deadletter", "json"),
        ("pdm/edge-01/deadletter", "topic"),
    ]
    assert ("ack", 1) in journal.events and ("ack", 2) in journal.events
    assert metrics.get("decode.errors", reason="json") == 1
    assert metrics.get("decode.errors", reason="topic") == 1


def test_completed_windows_go_to_the_scoring_queue_and_a_full_queue_drops_counted(router):
    journal, metrics = Journal(), Metrics()
    windows: queue.Queue[Window] = queue.Queue(maxsize=2)
    worker = _ingest(journal, FakeSpool(journal), router, windows, metrics)
    worker.process([_message(i, encode_fields({"temperature": 20.0}, ts_ns=T0 + i * 10**9)) for i in range(6)])
    # 6 readings, window 3, hop 1: 4 windows; the queue holds 2, the other 2 are dropped and counted.
    assert windows.qsize() == 2
    assert metrics.get("windows.dropped", reason="queue_full") == 2


def _windows(temperatures: list[float], machine: str = "m01") -> list[Window]:
    metrics = Metrics()
    router = ModelRouter([(("process",), FakeModel())])
    windower = Windower(router.spec_for, metrics)

    source = Source.of(site="s1", line="l1", machine=machine, sensor="process")
    out: list[Window] = []
    for i, t in enumerate(temperatures):
        out.extend(windower.add(Reading(source, T0 + i * 10**9, {"temperature": t})))
    return out


def test_windows_ready_together_are_scored_in_one_model_run_and_alert_once():
    journal, metrics = Journal(), Metrics()
    model = FakeModel()
    spool, broker = FakeSpool(journal), FakeBroker(journal)
    worker, _ = _scoring(
        journal, ModelRouter([(("process",), model)]), _engine(raise_n=2, clear_after=2), metrics, spool, broker
    )
    batch = _windows([20, 20, 20, 500, 500, 500, 500]) + _windows([20] * 7, machine="m02")
    worker.process(batch)
    assert model.batches == [len(batch)]
    assert metrics.get("windows.scored") == len(batch)
    alerts = [body for topic, body in broker.published if "/alerts/" in topic]
    assert [(a["machine"], a["state"]) for a in alerts] == [("m01", "new")]
    assert broker.published[0][0] == "pdm/edge-01/alerts/m01/process"
    # Features and score of every window, and the alert event, in one spool append.
    assert [e for e in journal.events if e[0] == "append"] == [("append", 2 * len(batch) + 1)]
    assert sum(line.startswith("anomaly_score,") for line in spool.lines) == len(batch)
    assert sum(line.startswith("alert,") for line in spool.lines) == 1


def test_windows_of_sensors_without_a_model_are_counted_not_scored():
    metrics = Metrics()
    worker, _ = _scoring(Journal(), ModelRouter([(("vibration",), FakeModel())]), _engine(1, 1), metrics)
    worker.process(_windows([1.0, 2.0, 3.0]))
    assert metrics.get("windows.unassigned") == 1
    assert metrics.get("windows.scored") == 0


def test_process_readings_are_scored_by_the_machine_baseline_once_commissioned():
    from agent.commissioning.baseline import CommissioningConfig
    from agent.commissioning.scorer import MODEL_ID

    journal, metrics = Journal(), Metrics()
    broker = FakeBroker(journal)
    scorer = CommissioningScorer(CommissioningConfig(commissioning_steps=100), ["process"], ["temperature"], metrics)
    worker, _ = _scoring(journal, ModelRouter([]), _engine(3, 3), metrics, broker=broker, baseline=scorer)
    source = Source.of(site="s1", line="l1", machine="m01", sensor="process")
    rng = np.random.default_rng(3)
    temperatures = list(55 + 0.2 * rng.standard_normal(200)) + [65.0] * 60
    worker.process([Reading(source, T0 + i * 10**9, {"temperature": float(t)}) for i, t in enumerate(temperatures)])
    assert metrics.get("commissioning.steps", phase="commissioning") == 100
    assert metrics.get("commissioning.steps", phase="monitoring") == len(temperatures) - 100
    alerts = [body for topic, body in broker.published if "/alerts/" in topic]
    assert [(a["model"]["id"], a["state"]) for a in alerts] == [(MODEL_ID, "new")]
    # Raised on the step change, not on the healthy readings before it.
    assert alerts[0]["first_detected"] >= format_rfc3339(T0 + 200 * 10**9)


def _vibration_messages(worker: IngestWorker, blocks: list[SampleBlock], first_mid: int) -> list[Message]:
    """Messages of one block each, decoded to that block (the decoder is not what these tests are about)."""
    by_mid = {first_mid + i: block for i, block in enumerate(blocks)}

    class OneBlock:
        def decode(self, msg: Message) -> list:
            return [by_mid[msg.mid]]

    worker._decoder = OneBlock()  # type: ignore[assignment]
    return [_message(mid, b"{}", topic="factory/s1/l1/m01/vibration") for mid in by_mid]


def test_held_blocks_stay_in_memory_and_an_alert_spools_them_as_one_release(router):
    journal, metrics = Journal(), Metrics()
    spool = FakeSpool(journal)
    worker = _ingest(journal, spool, router, queue.Queue(), metrics)
    policy = worker._raw = RawVibrationPolicy("around_alerts", keep_blocks=2)
    source = Source.of(site="s1", line="l1", machine="m01", sensor="vibration")
    blocks = [SampleBlock(source, T0 + i * 10**9, 10240.0, np.arange(64, dtype=np.float32)) for i in range(3)]
    worker.process(_vibration_messages(worker, blocks, first_mid=5))
    assert spool.entries == []  # nothing of a held block reaches the disk ...
    assert [e for e in journal.events if e[0] == "ack"] == [("ack", 5), ("ack", 6), ("ack", 7)]  # ... yet acked
    assert policy.held() == (2, 2 * 64 * 4)
    worker.step()  # the worker's periodic look at what it holds
    assert (metrics.get("storage.raw_held_blocks"), metrics.get("storage.raw_held_bytes")) == (2, 512)
    worker.store_raw(policy.on_alert(source))  # what the alert stage does when it raises one
    worker.step()  # no message is waiting: the release is spooled anyway
    assert [e.kind for e in spool.entries] == [Kind.RAW_BLOCKS]
    assert journal.events[-1] == ("append", 128)  # its points count in the spool like any other
    assert len(spool.lines) == 128 and all(line.startswith("vibration,") for line in spool.lines)
    assert {int(line.rsplit(" ", 1)[1]) // 10**9 for line in spool.lines} == {T0 // 10**9 + 1, T0 // 10**9 + 2}
    assert policy.held() == (0, 0)


def test_held_blocks_given_up_for_the_byte_cap_are_counted_and_logged(router, caplog):
    journal, metrics = Journal(), Metrics()
    worker = _ingest(journal, FakeSpool(journal), router, queue.Queue(), metrics)
    policy = worker._raw = RawVibrationPolicy("around_alerts", keep_blocks=5, max_bytes=2 * 64 * 4)
    blocks = [
        SampleBlock(Source.of(machine=f"m{i}", sensor="vibration"), T0, 10240.0, np.zeros(64, dtype=np.float32))
        for i in range(3)
    ]
    with caplog.at_level("WARNING"):
        worker.process(_vibration_messages(worker, blocks, first_mid=5))
    assert metrics.get("storage.raw_hold_evicted") == 1
    assert policy.held() == (2, 2 * 64 * 4)
    assert "hold_max_bytes" in caplog.text
    assert [e for e in journal.events if e[0] == "ack"] == [("ack", 5), ("ack", 6), ("ack", 7)]


def test_a_held_block_the_spool_could_not_hold_is_refused_at_once_not_when_released(router):
    journal, metrics = Journal(), Metrics()
    worker = _ingest(journal, FakeSpool(journal), router, queue.Queue(), metrics)
    policy = worker._raw = RawVibrationPolicy("around_alerts", keep_blocks=2)
    source = Source.of(site="s1", line="l1", machine="m01", sensor="vibration")
    block = SampleBlock(source, T0, 10240.0, np.zeros(8, dtype=np.float32), channel="c" * 70_000)
    worker.process(_vibration_messages(worker, [block], first_mid=5))
    assert [body["code"] for _, body in worker._broker.published] == ["too_large"]
    assert policy.held() == (0, 0)  # an alert can never hand the writer a block it cannot encode


def test_a_raised_alert_hands_the_raw_blocks_around_it_to_storage():
    released: list = []
    worker, stages = _scoring(
        Journal(),
        ModelRouter([(("process",), FakeModel())]),
        _engine(1, 1),
        Metrics(),
        config=_config("around_alerts", keep_blocks=2),
        store_raw=released.extend,
    )
    source = Source.of(site="s1", line="l1", machine="m01", sensor="process")
    blocks = [SampleBlock(source, T0 + i * 10**9, 10240.0, np.zeros(8, dtype=np.float32)) for i in range(3)]
    for block in blocks:
        assert stages.raw_policy.decide(block) == "hold"
        stages.raw_policy.hold(block)
    worker.process(_windows([500, 500, 500]))
    assert len(released) == 2 and all(r is b for r, b in zip(released, blocks[1:], strict=True))  # the last two


def test_an_unexpected_error_in_a_batch_is_counted_and_the_worker_keeps_running(router):
    journal, metrics = Journal(), Metrics()
    worker = _ingest(journal, FakeSpool(journal), router, queue.Queue(), metrics)
    calls = []

    def failing_step() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")
        worker._stop_event.set()

    worker.step = failing_step  # type: ignore[method-assign]
    worker.run()
    assert len(calls) == 2
    assert metrics.get("pipeline.errors", worker="ingest") == 1


def test_points_the_scoring_thread_produced_go_into_the_ingest_threads_next_append(router):
    journal, metrics = Journal(), Metrics()
    spool = FakeSpool(journal)
    worker = _ingest(journal, spool, router, queue.Queue(), metrics)
    worker.append_lines(["anomaly_score,machine=m01 score=0.5 1", "features,machine=m01 x=1 1"])
    assert journal.events == []  # handed over, not appended by the calling (scoring) thread
    worker.step()  # no message is waiting: the points are stored anyway, in one entry
    assert journal.events == [("append", 2)]
    assert spool.lines == ["anomaly_score,machine=m01 score=0.5 1", "features,machine=m01 x=1 1"]
    worker.finish()  # stopped: what scoring hands over afterwards (its own final batch) goes straight in
    worker.append_lines(["alert,machine=m01 active=0i 2"])
    assert journal.events == [("append", 2), ("append", 1)]
    assert spool.lines[-1] == "alert,machine=m01 active=0i 2"


def test_a_decoded_item_the_spool_cannot_hold_is_dead_lettered_not_acknowledged_and_dropped(router):
    """A decoder plugin may let through a name beyond the spool format's limits (json_v1 caps names itself)."""
    journal, metrics = Journal(), Metrics()
    spool = FakeSpool(journal)
    worker = _ingest(journal, spool, router, queue.Queue(), metrics)
    source = Source.of(site="s1", line="l1", machine="m01", sensor="vibration")
    block = SampleBlock(source, T0, 10240.0, np.zeros(8, dtype=np.float32), channel="c" * 70_000)

    class LongNames:
        def decode(self, msg: Message) -> list:
            return [block]

    worker._decoder = LongNames()  # type: ignore[assignment]
    worker._raw = RawVibrationPolicy("all")  # the block is to be stored
    worker.process([_message(5, b"{}", topic="factory/s1/l1/m01/vibration")])
    assert [body["code"] for _, body in worker._broker.published] == ["too_large"]
    assert "cannot be stored" in worker._broker.published[0][1]["reason"]
    assert metrics.get("storage.unencodable", kind="SampleBlock") == 1
    assert metrics.get("decode.errors", reason="too_large") == 1
    assert spool.entries == [] and ("ack", 5) in journal.events  # reported, then acknowledged
