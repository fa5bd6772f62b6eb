"""The Sparkplug B host decoder as pure logic: births and alias tables, datatypes, timestamps, nulls,
historical metrics, unsupported types, seq wrap and gaps, rebirth requests, NDEATH bdSeq, the STATE payload,
and fuzzed payloads. Payloads come from ``pysparkplug`` (a real encoder of the Tahu schema) where it can make
them, else from hand-made protobuf (alias-only data, gaps, stale deaths)."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pysparkplug as psp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pysparkplug._protobuf import Payload as TahuPayload

from agent.alerts.engine import AlertEngine
from agent.alerts.rules import AlertRule, RuleBook
from agent.config import parse_config
from agent.config.errors import ConfigError
from agent.decode import sparkplug_proto as spb
from agent.decode.base import DecodeLimits, DecoderContext, Outbox
from agent.decode.errors import CODES, DecodeError
from agent.decode.sparkplug_b import NS_PER_MS, REBIRTH_METRIC, SparkplugBDecoder, StatePayload
from agent.decode.topic import TopicTemplate
from agent.metrics import Metrics
from agent.records import NS_PER_S, Message, Reading, Source
from tests.unit.test_alert_engine import Clock

T0_MS = 1_764_000_000_000  # 2025-11-24
T0_NS = T0_MS * NS_PER_MS
TIMEOUT_S = 2.0
OPTIONS = SimpleNamespace(host_id="pdm-host", group_ids=("plant1",), reorder_timeout_s=TIMEOUT_S, sensor="process")


def decoder() -> SparkplugBDecoder:
    context = DecoderContext(
        topic_template=TopicTemplate("factory/{machine}/{sensor}"),
        limits=DecodeLimits(),
        outbound_base="pdm/a1",
        options=OPTIONS,
    )
    return SparkplugBDecoder(context)


def msg(topic: str, payload: bytes, at_ns: int = T0_NS) -> Message:
    return Message(topic=topic, payload=payload, qos=0, mid=0, received_ns=at_ns)


def nbirth(seq: int = 0, bd_seq: int = 7) -> bytes:
    metrics = (
        psp.Metric(timestamp=T0_MS, name="bdSeq", datatype=psp.DataType.UINT64, value=bd_seq),
        psp.Metric(timestamp=T0_MS, name=REBIRTH_METRIC, datatype=psp.DataType.BOOLEAN, value=False),
        psp.Metric(timestamp=T0_MS, name="Supply/Voltage", datatype=psp.DataType.DOUBLE, value=400.5, alias=1),
    )
    return psp.NBirth(timestamp=T0_MS, seq=seq, metrics=metrics).encode()


def dbirth(seq: int = 1) -> bytes:
    metrics = (
        psp.Metric(timestamp=T0_MS, name="temperature", datatype=psp.DataType.FLOAT, value=61.5, alias=10),
        psp.Metric(timestamp=T0_MS, name="rpm", datatype=psp.DataType.UINT32, value=1480, alias=11),
        psp.Metric(timestamp=T0_MS, name="offset", datatype=psp.DataType.INT16, value=-3, alias=12),
        psp.Metric(timestamp=T0_MS, name="running", datatype=psp.DataType.BOOLEAN, value=True, alias=13),
        psp.Metric(timestamp=T0_MS, name="count", datatype=psp.DataType.INT64, value=-(2**40), alias=14),
    )
    return psp.DBirth(timestamp=T0_MS, seq=seq, metrics=metrics).encode()


def alias_data(seq: int, values: dict[int, tuple[str, object]], ts_ms: int = T0_MS + 1000) -> bytes:
    """Hand-made: data carrying only aliases (what pysparkplug cannot produce without names)."""
    payload = TahuPayload(timestamp=ts_ms, seq=seq)
    for alias, (field, value) in values.items():
        metric = payload.metrics.add(alias=alias)
        setattr(metric, field, value)
    return bytes(payload.SerializeToString())


def born() -> SparkplugBDecoder:
    d = decoder()
    d.decode(msg("spBv1.0/plant1/NBIRTH/gw1", nbirth()))
    d.decode(msg("spBv1.0/plant1/DBIRTH/gw1/press-7", dbirth()))
    d.outbox(T0_NS)
    return d


def test_births_store_every_numeric_metric_once_with_its_tags_and_datatype() -> None:
    d = decoder()
    node = d.decode(msg("spBv1.0/plant1/NBIRTH/gw1", nbirth()))
    device = d.decode(msg("spBv1.0/plant1/DBIRTH/gw1/press-7", dbirth()))
    assert [r.fields for r in node if isinstance(r, Reading)] == [{"Supply/Voltage": 400.5}]  # bdSeq, control: not data
    assert node[0].source.as_dict() == {"group": "plant1", "node": "gw1", "machine": "gw1", "sensor": "process"}
    (reading,) = device
    assert isinstance(reading, Reading)
    assert reading.source.as_dict() == {"group": "plant1", "node": "gw1", "machine": "press-7", "sensor": "process"}
    assert reading.time_ns == T0_NS
    assert reading.fields == {"temperature": 61.5, "rpm": 1480.0, "offset": -3.0, "running": 1.0, "count": -(2.0**40)}


def test_alias_only_data_resolves_names_and_datatypes_from_the_birth() -> None:
    d = born()
    out = d.decode(
        msg(
            "spBv1.0/plant1/DDATA/gw1/press-7",
            alias_data(2, {10: ("float_value", 62.25), 12: ("int_value", 0xFFFFFFF9)}),
        )
    )
    assert [(r.fields, r.time_ns) for r in out if isinstance(r, Reading)] == [
        ({"temperature": 62.25, "offset": -7.0}, T0_NS + 1000 * NS_PER_MS)
    ]
    assert d.outbox(T0_NS) == ([], [])


def test_per_metric_timestamps_split_readings_and_historical_metrics_keep_their_time() -> None:
    d = born()
    payload = TahuPayload(timestamp=T0_MS + 5000, seq=2)
    payload.metrics.add(alias=10, timestamp=T0_MS + 100, float_value=1.0, is_historical=True)
    payload.metrics.add(alias=10, timestamp=T0_MS + 200, float_value=2.0, is_historical=True)
    payload.metrics.add(alias=11, int_value=5)  # the payload's timestamp
    out = d.decode(msg("spBv1.0/plant1/DDATA/gw1/press-7", bytes(payload.SerializeToString())))
    assert [(r.time_ns // NS_PER_MS - T0_MS, dict(r.fields)) for r in out if isinstance(r, Reading)] == [
        (100, {"temperature": 1.0}),
        (200, {"temperature": 2.0}),
        (5000, {"rpm": 5.0}),
    ]


def test_null_and_transient_metrics_store_nothing_and_are_counted() -> None:
    d = born()
    payload = TahuPayload(timestamp=T0_MS, seq=2)
    payload.metrics.add(alias=10, is_null=True)
    payload.metrics.add(alias=11, int_value=3, is_transient=True)
    payload.metrics.add(alias=13, boolean_value=False)
    out = d.decode(msg("spBv1.0/plant1/DDATA/gw1/press-7", bytes(payload.SerializeToString())))
    assert [r.fields for r in out if isinstance(r, Reading)] == [{"running": 0.0}]
    assert d.counts["nulls"] == 1 and d.counts["transient"] == 1


def test_unsupported_metric_types_are_dead_lettered_with_a_reason_and_the_rest_is_stored() -> None:
    d = decoder()
    payload = TahuPayload(timestamp=T0_MS, seq=0)
    payload.metrics.add(name="bdSeq", datatype=8, long_value=1)
    payload.metrics.add(name="recipe", datatype=16).dataset_value.num_of_columns = 2
    payload.metrics.add(name="mould", datatype=19).template_value.version = "1"
    payload.metrics.add(name="label", datatype=12, string_value="ok")
    payload.metrics.add(name="pressure", datatype=10, double_value=3.5)
    out = d.decode(msg("spBv1.0/plant1/NBIRTH/gw1", bytes(payload.SerializeToString())))
    assert [r.fields for r in out if isinstance(r, Reading)] == [{"pressure": 3.5}]
    _, rejected = d.outbox(T0_NS)
    (rejection,) = rejected
    assert rejection.error.code == "unsupported"
    for name in ("'recipe' is a DataSet", "'mould' is a Template", "'label' is a String"):
        assert name in rejection.error.detail
    assert d.counts["metrics_rejected"] == 3


def test_values_that_do_not_match_their_datatype_or_are_not_finite_are_rejected() -> None:
    d = born()
    payload = TahuPayload(timestamp=T0_MS, seq=2)
    payload.metrics.add(alias=10, double_value=1.0)  # a Float carrying a double
    payload.metrics.add(alias=10, float_value=float("nan"))
    payload.metrics.add(alias=11, int_value=9)
    out = d.decode(msg("spBv1.0/plant1/DDATA/gw1/press-7", bytes(payload.SerializeToString())))
    assert [r.fields for r in out if isinstance(r, Reading)] == [{"rpm": 9.0}]
    (rejection,) = d.outbox(T0_NS)[1]
    assert rejection.error.code == "value"
    assert "carries double_value" in rejection.error.detail and "nan" in rejection.error.detail


def test_seq_wraps_from_255_to_0_without_a_gap() -> None:
    d = decoder()
    d.decode(msg("spBv1.0/plant1/NBIRTH/gw1", nbirth(seq=254)))
    for seq in (255, 0, 1):
        d.decode(msg("spBv1.0/plant1/NDATA/gw1", alias_data(seq, {1: ("double_value", float(seq))})))
    assert d.counts["seq_gaps"] == 0
    assert d.outbox(T0_NS + 10 * NS_PER_S)[0][1:] == []  # only the node's state, no rebirth


def test_a_gap_filled_within_the_reorder_timeout_asks_for_nothing() -> None:
    d = born()
    d.decode(msg("spBv1.0/plant1/NDATA/gw1", alias_data(3, {1: ("double_value", 3.0)})))  # 2 missing
    late = d.decode(msg("spBv1.0/plant1/NDATA/gw1", alias_data(2, {1: ("double_value", 2.0)})))
    assert [r.fields for r in late if isinstance(r, Reading)] == [{"Supply/Voltage": 2.0}]  # stored, not dropped
    assert d.outbox(T0_NS + 10 * NS_PER_S) == ([], [])
    assert d.counts["seq_gaps"] == 1 and d.counts["seq_late"] == 1


def test_a_gap_still_open_after_the_reorder_timeout_sends_one_rebirth_ncmd() -> None:
    d = born()
    d.decode(msg("spBv1.0/plant1/NDATA/gw1", alias_data(5, {1: ("double_value", 5.0)})))
    assert d.outbox(T0_NS + int(TIMEOUT_S * NS_PER_S) - 1) == ([], [])  # still waiting
    publish, _ = d.outbox(T0_NS + int(TIMEOUT_S * NS_PER_S))
    (ncmd,) = publish
    assert (ncmd.topic, ncmd.qos, ncmd.retain) == ("spBv1.0/plant1/NCMD/gw1", 0, False)
    (metric,) = spb.Payload.FromString(ncmd.payload).metrics
    assert (metric.name, metric.datatype, metric.boolean_value) == (REBIRTH_METRIC.encode(), 11, True)
    assert d.outbox(T0_NS + 100 * NS_PER_S) == ([], [])  # once
    assert d.counts["rebirths_requested"] == 1


def test_an_unknown_alias_is_dead_lettered_and_leads_to_a_rebirth() -> None:
    d = born()
    out = d.decode(
        msg("spBv1.0/plant1/DDATA/gw1/press-7", alias_data(2, {99: ("double_value", 1.0), 11: ("int_value", 4)}))
    )
    assert [r.fields for r in out if isinstance(r, Reading)] == [{"rpm": 4.0}]
    publish, rejected = d.outbox(T0_NS + int(TIMEOUT_S * NS_PER_S))
    assert [r.error.code for r in rejected] == ["alias"]
    assert [p.topic for p in publish] == ["spBv1.0/plant1/NCMD/gw1"]


def test_data_before_any_birth_is_dead_lettered_and_a_rebirth_is_asked_at_once() -> None:
    d = decoder()
    with pytest.raises(DecodeError) as info:
        d.decode(msg("spBv1.0/plant1/NDATA/gw9", alias_data(4, {1: ("double_value", 1.0)})))
    assert info.value.code == "not_born"
    publish, _ = d.outbox(T0_NS)
    assert [p.topic for p in publish] == ["spBv1.0/plant1/NCMD/gw9"]


def test_ndeath_with_the_birth_bdseq_marks_the_node_and_its_devices_stale() -> None:
    d = born()
    death = psp.NDeath(
        timestamp=T0_MS, bd_seq_metric=psp.Metric(timestamp=T0_MS, name="bdSeq", datatype=psp.DataType.UINT64, value=7)
    )
    assert d.decode(msg("spBv1.0/plant1/NDEATH/gw1", death.encode())) == []
    (state,) = d.outbox(T0_NS)[0]
    assert state.topic == "pdm/a1/sparkplug/plant1/gw1" and state.retain
    body = json.loads(state.payload)
    assert (body["state"], body["devices"], body["bdSeq"]) == ("stale", {"press-7": "stale"}, 7)
    with pytest.raises(DecodeError):  # dead: its data waits for the next birth
        d.decode(msg("spBv1.0/plant1/NDATA/gw1", alias_data(2, {1: ("double_value", 1.0)})))


def test_ndeath_with_a_stale_bdseq_is_ignored() -> None:
    d = born()
    old = TahuPayload(timestamp=T0_MS)
    old.metrics.add(name="bdSeq", datatype=8, long_value=6)  # the will of the session before the birth
    d.decode(msg("spBv1.0/plant1/NDEATH/gw1", bytes(old.SerializeToString())))
    assert d.outbox(T0_NS) == ([], [])
    assert d.counts["stale_deaths"] == 1 and d.counts["node_deaths"] == 0
    assert d.decode(msg("spBv1.0/plant1/NDATA/gw1", alias_data(2, {1: ("double_value", 1.0)})))


def test_ddeath_marks_only_that_device_stale() -> None:
    d = born()
    d.decode(msg("spBv1.0/plant1/DDEATH/gw1/press-7", psp.DDeath(timestamp=T0_MS, seq=2).encode()))
    (state,) = d.outbox(T0_NS)[0]
    assert json.loads(state.payload)["devices"] == {"press-7": "stale"}
    assert json.loads(state.payload)["state"] == "online"


def test_state_payload_online_carries_the_timestamp_of_its_will() -> None:
    clock = iter([100, 250])
    payload = StatePayload(lambda: next(clock))
    will = json.loads(payload("offline"))
    assert will == {"online": False, "timestamp": 100}
    assert json.loads(payload("online")) == {"online": True, "timestamp": 100}
    assert decoder().presence().topic == "spBv1.0/STATE/pdm-host"


def test_topics_of_other_groups_and_wrong_shapes_are_rejected_and_state_and_commands_ignored() -> None:
    d = decoder()
    for topic in (
        "spBv1.0/other/NDATA/gw1",
        "spBv1.0/plant1/DDATA/gw1",
        "spBv1.0/plant1/NDATA/gw1/x",
        "spBv1.0/plant1/XDATA/gw1",
    ):
        with pytest.raises(DecodeError) as info:
            d.decode(msg(topic, b""))
        assert info.value.code == "topic", topic
    assert d.decode(msg("spBv1.0/STATE/pdm-host", b'{"online":true}')) == []
    assert d.decode(msg("spBv1.0/plant1/NCMD/gw1", b"")) == []
    assert d.subscriptions() == ("spBv1.0/plant1/#", "spBv1.0/STATE/pdm-host")
    assert isinstance(d, Outbox)


def test_the_descriptor_matches_the_tahu_schema_field_by_field() -> None:
    ours = spb.Payload.DESCRIPTOR
    tahu = TahuPayload.DESCRIPTOR
    length_delimited = {9, 11, 12}  # string, message, bytes: the same wire type
    for mine, theirs in ((ours, tahu), (ours.nested_types_by_name["Metric"], tahu.nested_types_by_name["Metric"])):
        for f in theirs.fields:
            g = mine.fields_by_name[f.name]
            assert g.number == f.number, f.name
            assert g.type == f.type or {g.type, f.type} <= length_delimited, f.name


fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed(d: SparkplugBDecoder, topic: str, payload: bytes) -> None:
    try:
        for record in d.decode(msg(topic, payload)):
            assert isinstance(record, Reading) and all(v == v for v in record.fields.values())
    except DecodeError as exc:
        assert exc.code in CODES and len(exc.detail) < 1000
    for rejection in d.outbox(T0_NS)[1]:
        assert rejection.error.code in CODES


@fuzz
@given(payload=st.binary(max_size=512), kind=st.sampled_from(["NBIRTH", "NDATA", "NDEATH"]))
def test_random_bytes_never_crash_the_decoder(payload: bytes, kind: str) -> None:
    _feed(born(), f"spBv1.0/plant1/{kind}/gw1", payload)


def test_mutated_valid_payloads_never_crash_the_decoder() -> None:
    rng = random.Random(20261203)
    seeds = [nbirth(), dbirth(), alias_data(2, {10: ("float_value", 1.0), 11: ("int_value", 3)})]
    topics = ["spBv1.0/plant1/NBIRTH/gw1", "spBv1.0/plant1/DBIRTH/gw1/press-7", "spBv1.0/plant1/DDATA/gw1/press-7"]
    d = born()
    for _ in range(5000):
        i = rng.randrange(3)
        data = bytearray(seeds[i])
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        _feed(d, topics[i], bytes(data))


def test_a_dead_node_opens_no_no_data_alert_and_a_silent_live_one_does() -> None:
    d = born()
    metrics = Metrics()
    rules = RuleBook(AlertRule(raise_n=2, raise_m=3, clear_after=3, cooldown_s=0, renotify_s=0, no_data_after_s=30))
    dead = Source.of(group="plant1", node="gw1", machine="press-7", sensor="process")
    alive = Source.of(group="plant1", node="gw2", machine="lathe-2", sensor="process")
    clock = Clock(AlertEngine(rules, metrics=metrics, offline=d.offline))
    clock.feed([0.1] * 5, source=dead)
    clock.feed([0.1] * 5, source=alive)
    d.decode(msg("spBv1.0/plant1/DDEATH/gw1/press-7", psp.DDeath(timestamp=T0_MS, seq=2).encode()))
    assert d.offline(dead) and not d.offline(alive)
    gaps = clock.wait(60)
    assert [(a.alert_type, a.source.machine) for a in gaps] == [("no_data", "lathe-2")]
    assert metrics.get("alerts.suppressed", reason="source_offline", alert_type="no_data") == 1
    d.decode(msg("spBv1.0/plant1/DBIRTH/gw1/press-7", dbirth(seq=3)))  # born again: watched again
    assert not d.offline(dead)


def test_an_older_sessions_offline_state_is_answered_with_online_and_the_own_clean_stop_is_not() -> None:
    d = decoder()
    presence = d.presence()
    presence.payload("offline")  # this connection's will
    online = json.loads(presence.payload("online"))
    state = "spBv1.0/STATE/pdm-host"
    assert state in d.subscriptions()
    older = json.dumps({"online": False, "timestamp": online["timestamp"] - 5000}).encode()
    assert d.decode(msg(state, older)) == []
    (republished,) = d.outbox(T0_NS)[0]
    assert (republished.topic, republished.retain, json.loads(republished.payload)) == (state, True, online)
    own_stop = presence.payload("offline")
    d.decode(msg(state, own_stop))
    assert d.outbox(T0_NS) == ([], [])


def test_the_config_refuses_sparkplug_without_host_id_and_group_ids_with_wildcards_by_key_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"decoder": {"type": "sparkplug_b", "group_ids": ["plant/1", "+"]}}}, environ={})
    text = str(info.value)
    assert "mqtt.decoder.host_id" in text and "mqtt.decoder.group_ids" in text
    config = parse_config({"mqtt": {"decoder": {"type": "sparkplug_b", "host_id": "h"}}}, environ={})
    assert config.mqtt.decoder.reorder_timeout_s == 2.0


def test_edge_nodes_beyond_the_bound_are_refused_and_known_ones_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.decode.sparkplug_b.MAX_NODES", 2)
    d = born()  # gw1
    d.decode(msg("spBv1.0/plant1/NBIRTH/gw2", nbirth()))
    with pytest.raises(DecodeError) as info:
        d.decode(msg("spBv1.0/plant1/NBIRTH/gw3", nbirth()))
    assert info.value.code == "too_large" and "more than 2 edge nodes" in info.value.detail
    assert d.decode(msg("spBv1.0/plant1/NDATA/gw1", alias_data(2, {1: ("double_value", 1.0)})))


def test_a_payload_on_the_own_state_topic_that_is_no_state_is_replaced_with_online() -> None:
    d = decoder()
    d.presence().payload("offline")
    d.decode(msg("spBv1.0/STATE/pdm-host", b"OFFLINE"))  # a Sparkplug 2.x host's payload
    (republished,) = d.outbox(T0_NS)[0]
    assert json.loads(republished.payload)["online"] is True


def _valid(name: str, payload: bytes) -> bool:
    path = Path(__file__).resolve().parents[2] / "agent" / "schemas" / f"{name}.schema.json"
    schema = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema).is_valid(json.loads(payload))


def test_node_state_and_state_payloads_match_their_schemas() -> None:
    d = born()
    d.decode(msg("spBv1.0/plant1/DDEATH/gw1/press-7", psp.DDeath(timestamp=T0_MS, seq=2).encode()))
    (state,) = d.outbox(T0_NS)[0]
    assert _valid("sparkplug_node", state.payload)
    assert not _valid("sparkplug_node", json.dumps({**json.loads(state.payload), "state": "dead"}).encode())
    presence = d.presence()
    assert _valid("sparkplug_state", presence.payload("offline")) and _valid(
        "sparkplug_state", presence.payload("online")
    )


def test_the_offline_view_for_the_scoring_process_says_what_the_decoder_says() -> None:
    """The copy a scoring process gets answers like the decoder, survives pickling, and each birth or death
    moves ``liveness_version`` (the agent sends a new copy then)."""
    d = born()
    node = Source.of(group="plant1", node="gw1", machine="gw1", sensor="process")
    device = Source.of(group="plant1", node="gw1", machine="press-7", sensor="process")
    unknown = Source.of(group="plant1", node="gw9", machine="drill", sensor="process")
    untagged = Source.of(site="s", line="l", machine="press-7", sensor="process")
    sources = (node, device, unknown, untagged)
    states = []
    versions = [d.liveness_version]
    for topic, payload in [
        ("spBv1.0/plant1/DBIRTH/gw1/press-7", dbirth(seq=1)),
        ("spBv1.0/plant1/DDEATH/gw1/press-7", psp.DDeath(timestamp=T0_MS, seq=2).encode()),
        ("spBv1.0/plant1/DBIRTH/gw1/press-7", dbirth(seq=3)),
        ("spBv1.0/plant1/NDEATH/gw1", _ndeath()),
    ]:
        d.decode(msg(topic, payload))
        versions.append(d.liveness_version)
        view = pickle.loads(pickle.dumps(d.offline_view()))
        states.append([view.offline(s) for s in sources])
        assert states[-1] == [d.offline(s) for s in sources]
    assert states == [
        [False, False, False, False],
        [False, True, False, False],
        [False, False, False, False],
        [True, True, False, False],
    ]
    assert versions == sorted(set(versions))  # every one of them moved it


def _ndeath() -> bytes:
    bd_seq = psp.Metric(timestamp=T0_MS, name="bdSeq", datatype=psp.DataType.UINT64, value=7)
    return psp.NDeath(timestamp=T0_MS, bd_seq_metric=bd_seq).encode()
