"""``mqtt.decoder.type: sparkplug_b``: the agent as a Sparkplug B 3.0 primary host application.

Topics ``spBv1.0/{group_id}/{NBIRTH|NDATA|NDEATH|DBIRTH|DDATA|DDEATH}/{edge_node_id}[/{device_id}]``,
payloads of the Eclipse Tahu schema (``agent.decode.sparkplug_proto``). Each numeric metric value becomes one
field of a ``Reading`` of the machine (tags ``group``, ``node``, ``machine`` = the device id, or the edge node
id for node metrics, and ``sensor`` = ``mqtt.decoder.sensor``), at the metric's own timestamp, else the
payload's, else the arrival time. See ``docs/sparkplug.md`` for every case and its counter.

State lives here, not in the ingest worker: per edge node the birth's ``bdSeq``, the alias table (node and
device metrics share it, aliases are unique per edge node), the expected ``seq`` (0-255, wraps) and which
devices are online. Like every decoder it belongs to the ingest thread (no locks) and reads no clock:
``decode`` takes the arrival time of the message, ``outbox`` the time of the worker's call.

What the host must say goes through ``outbox`` (``agent.decode.base.Outbox``), drained by the ingest worker:

- NCMD ``Node Control/Rebirth`` when a ``seq`` gap has not been filled within ``reorder_timeout_s``, when a
  data message names an alias that no birth declared, or when a node that was never born (since the agent
  started) sends data: its aliases cannot be resolved, so those messages are dead-lettered (``not_born``);
- the node's retained state on ``{base}/sparkplug/{group}/{node}``: online or stale (an NDEATH whose bdSeq
  matches the birth, a DDEATH), with its devices, so an operator sees why a machine went silent;
- per-metric rejections (a DataSet or Template value, a string, NaN, an unknown alias): the other metrics of
  the message are stored; the rejected ones go to the dead-letter topic with their reason.

The MQTT connection's presence is the Sparkplug STATE topic (``presence``): ``spBv1.0/STATE/{host_id}``,
retained, with the matching last will; MQTT allows one will per connection, so in this mode it replaces the
agent's own ``status`` will.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from google.protobuf.message import DecodeError as ProtobufError

from agent.decode import sparkplug_proto as spb
from agent.decode.base import DecoderContext, Presence, Publish, Rejection
from agent.decode.errors import DecodeError, DecodeErrorCode, quote
from agent.decode.json_v1 import _check_name
from agent.records import NS_PER_S, Decoded, Message, Reading, Source
from agent.topics import format_rfc3339

NAMESPACE: Final = "spBv1.0"
NS_PER_MS: Final = 1_000_000
REBIRTH_METRIC: Final = "Node Control/Rebirth"
# Protocol metrics, not process values: never stored as readings.
_CONTROL_PREFIXES: Final = ("Node Control/", "Device Control/", "Properties/", "Node Info/", "Device Info/")
MAX_NODES: Final = 10_000
"""Edge nodes the host keeps state for, at most: a flood of made-up node ids must not grow it without end."""
_BDSEQ: Final = "bdSeq"
EVENTS: Final = (
    "births",
    "node_deaths",
    "device_deaths",
    "stale_deaths",
    "seq_gaps",
    "seq_late",
    "rebirths_requested",
    "nulls",
    "transient",
    "metrics_rejected",
    "state_restored",
)
"""The protocol events counted (``decode.events{event}``)."""
_MESSAGE_TYPES: Final = frozenset({"NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH", "NCMD", "DCMD"})

# datatype -> (value field, bits of a two's complement integer or 0, unsigned)
_NUMERIC: Final[dict[int, tuple[str, int]]] = {
    spb.INT8: ("int_value", 8),
    spb.INT16: ("int_value", 16),
    spb.INT32: ("int_value", 32),
    spb.INT64: ("long_value", 64),
    spb.UINT8: ("int_value", 0),
    spb.UINT16: ("int_value", 0),
    spb.UINT32: ("int_value", 0),
    spb.UINT64: ("long_value", 0),
    spb.FLOAT: ("float_value", 0),
    spb.DOUBLE: ("double_value", 0),
    spb.BOOLEAN: ("boolean_value", 0),
}


@dataclass(frozen=True)
class SparkplugOptions:
    """The keys of ``mqtt.decoder`` this decoder reads (validated by the config's ``DecoderSection``)."""

    host_id: str
    group_ids: tuple[str, ...] = ()
    reorder_timeout_s: float = 2.0
    sensor: str = "process"

    @classmethod
    def of(cls, section: Any) -> SparkplugOptions:
        if section is None or not getattr(section, "host_id", None):
            raise ValueError("mqtt.decoder.host_id is required for the sparkplug_b decoder")
        return cls(
            host_id=section.host_id,
            group_ids=tuple(section.group_ids),
            reorder_timeout_s=float(section.reorder_timeout_s),
            sensor=section.sensor,
        )


@dataclass
class _Node:
    """What the host knows of one edge node since its last NBIRTH."""

    born: bool = False
    bd_seq: int | None = None
    expected_seq: int | None = None
    aliases: dict[int, tuple[str, int]] = field(default_factory=dict)  # alias -> (name, datatype)
    datatypes: dict[str, int] = field(default_factory=dict)  # name -> datatype (node and device metrics)
    names_ok: set[str] = field(default_factory=set)  # names of births found storable (checked once)
    devices: dict[str, bool] = field(default_factory=dict)  # device id -> online
    missing: set[int] = field(default_factory=set)  # seqs skipped, waiting for reorder_timeout_s
    rebirth_due_ns: int | None = None  # when a rebirth is requested unless the problem resolves
    rebirth_reason: str = ""
    rebirth_sent_ns: int | None = None  # the last request, so that one is sent per reorder timeout
    state_changed: bool = False


def _liveness_key(source: Source) -> tuple[str, str, str] | None:
    """(group, edge node, machine) of a source this decoder named; None for a source without those tags."""
    try:
        return source.tag("group"), source.tag("node"), source.machine
    except KeyError:
        return None


def _dead(key: tuple[str, str, str], born: bool, devices: Mapping[str, bool]) -> bool:
    """A node is dead until its birth; a device (a machine other than the node) from its DDEATH to its DBIRTH."""
    _, node_id, machine = key
    return not born or (machine != node_id and devices.get(machine) is False)


@dataclass(frozen=True)
class SparkplugOfflineView:
    """Every edge node's and device's liveness, copied (``SparkplugBDecoder.offline_view``)."""

    nodes: dict[tuple[str, str], tuple[bool, dict[str, bool]]]
    """(group, edge node) -> (born, device id -> online)."""

    def offline(self, source: Source) -> bool:
        key = _liveness_key(source)
        if key is None:
            return False
        node = self.nodes.get((key[0], key[1]))
        return node is not None and _dead(key, *node)


@dataclass(frozen=True)
class _Topic:
    group: str
    kind: str
    node: str
    device: str | None


class SparkplugBDecoder:
    """Readings from Sparkplug B messages; NCMD rebirths, node states and rejections through ``outbox``."""

    def __init__(self, context: DecoderContext) -> None:
        self._options = SparkplugOptions.of(context.options)
        self._limits = context.limits
        self._field_keys = context.field_keys
        self._base = context.outbound_base
        self._timeout_ns = round(self._options.reorder_timeout_s * NS_PER_S)
        groups = self._options.group_ids
        self._state_topic = f"{NAMESPACE}/STATE/{self._options.host_id}"
        self._state_payload = StatePayload()
        self._subscriptions = context.subscriptions or (
            (*(f"{NAMESPACE}/{g}/#" for g in groups), self._state_topic) if groups else (f"{NAMESPACE}/#",)
        )
        self._nodes: dict[tuple[str, str], _Node] = defaultdict(_Node)
        # What ``outbox`` looks at: nodes a message reached since its last call, and nodes with a rebirth due
        # (so that a call costs what changed, not the number of nodes).
        self._touched: set[tuple[str, str]] = set()
        self._waiting: set[tuple[str, str]] = set()
        self._publish: list[Publish] = []
        self._rejected: list[Rejection] = []
        self._counts: dict[str, int] = dict.fromkeys(EVENTS, 0)
        self.liveness_version = 0

    @property
    def counts(self) -> dict[str, int]:
        """Events by name (``EVENTS``): ``decode.events{event}``."""
        return self._counts

    # --- the Decoder protocol --------------------------------------------------------------------------

    def subscriptions(self) -> tuple[str, ...]:
        return self._subscriptions

    def presence(self) -> Presence:
        return Presence(self._state_topic, self._state_payload)

    def decode(self, message: Message) -> list[Decoded]:
        if message.topic == self._state_topic:
            self._own_state(message.payload)
            return []
        topic = _parse_topic(message.topic)
        if topic is None:
            return []  # STATE of a host, or a command: not input
        if self._options.group_ids and topic.group not in self._options.group_ids:
            raise DecodeError("topic", f"group {quote(topic.group)} is not in mqtt.decoder.group_ids")
        payload = self._parse(message.payload)
        key = (topic.group, topic.node)
        if key not in self._nodes and len(self._nodes) >= MAX_NODES:
            raise DecodeError("too_large", f"more than {MAX_NODES:,} edge nodes; {quote(topic.node)} is not taken in")
        node = self._nodes[key]
        self._touched.add(key)
        now = message.received_ns
        if topic.kind == "NDEATH":
            self._node_death(topic, node, payload)
            return []
        if topic.kind == "NBIRTH":
            self._node_birth(topic, node, payload)
        elif not node.born:
            self._due(node, now, "not_born", at_once=True)
            raise DecodeError(
                "not_born",
                f"{topic.kind} from edge node {quote(topic.node)} of group {quote(topic.group)} before its NBIRTH; "
                "a rebirth is requested",
            )
        else:
            self._check_seq(node, payload, now)
        if topic.kind == "DBIRTH":
            assert topic.device is not None
            node.devices[topic.device] = True
            node.state_changed = True
            self.liveness_version += 1
        if topic.kind == "DDEATH":
            assert topic.device is not None
            node.devices[topic.device] = False
            node.state_changed = True
            self.liveness_version += 1
            self._counts["device_deaths"] += 1
            return []
        birth = topic.kind in ("NBIRTH", "DBIRTH")
        return self._readings(message, topic, node, payload, birth, now)

    def offline(self, source: Source) -> bool:
        """Whether ``source``'s edge node or device is dead since its last birth (``Liveness``)."""
        key = _liveness_key(source)
        if key is None:
            return False
        node = self._nodes.get((key[0], key[1]))
        return node is not None and _dead(key, node.born, node.devices)

    def offline_view(self) -> SparkplugOfflineView:
        """A copy of every node's and device's liveness, for the scoring process (``Liveness``). Called from
        another thread than the ingest thread's: ``list`` and ``dict`` copy in one step under the GIL."""
        nodes = list(self._nodes.items())
        return SparkplugOfflineView({key: (node.born, dict(node.devices)) for key, node in nodes})

    # --- the Outbox protocol ---------------------------------------------------------------------------

    def outbox(self, now_ns: int, final: bool = False) -> tuple[list[Publish], list[Rejection]]:
        """Due rebirth requests and changed node states (to publish) and per-metric rejections (to report)."""
        keys, self._touched = self._touched | self._waiting, set()
        for group, node_id in keys:
            node = self._nodes[(group, node_id)]
            if node.rebirth_due_ns is not None and now_ns >= node.rebirth_due_ns:
                self._rebirth(group, node_id, node, now_ns)
            if node.rebirth_due_ns is None:
                self._waiting.discard((group, node_id))
            else:
                self._waiting.add((group, node_id))
            if node.state_changed:
                node.state_changed = False
                self._publish.append(self._state(group, node_id, node, now_ns))
        publish, self._publish = self._publish, []
        rejected, self._rejected = self._rejected, []
        return publish, rejected

    # --- node lifecycle --------------------------------------------------------------------------------

    def _node_birth(self, topic: _Topic, node: _Node, payload: Any) -> None:
        bd_seq = _bd_seq(payload)
        if bd_seq is None:
            raise DecodeError("shape", "NBIRTH without its bdSeq metric")
        node.born = True
        node.bd_seq = bd_seq
        node.aliases.clear()
        node.datatypes.clear()
        node.names_ok.clear()
        node.devices.clear()  # an NBIRTH means the devices are born again too
        node.missing.clear()
        node.rebirth_due_ns = None
        node.expected_seq = (payload.seq + 1) % 256 if payload.HasField("seq") else None
        node.state_changed = True
        self.liveness_version += 1
        self._counts["births"] += 1

    def _node_death(self, topic: _Topic, node: _Node, payload: Any) -> None:
        bd_seq = _bd_seq(payload)
        if not node.born or bd_seq != node.bd_seq:
            # The will of an older session, delivered after the node was born again: ignored (spec).
            self._counts["stale_deaths"] += 1
            return
        node.born = False
        node.expected_seq = None
        node.missing.clear()
        node.rebirth_due_ns = None
        for device in node.devices:
            node.devices[device] = False
        node.state_changed = True
        self.liveness_version += 1
        self._counts["node_deaths"] += 1

    def _own_state(self, raw: bytes) -> None:
        """An offline STATE of this host that is not the will of the current connection (an older session's,
        delivered late), or a payload that is no STATE at all: edge nodes would take the host for gone, so
        online is published again (spec)."""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # not a STATE payload: edge nodes cannot read it either, so it is replaced too
        if isinstance(body, dict):
            if body.get("online") is True:
                return
            stamp = body.get("timestamp")
            if stamp is not None and stamp == self._state_payload.will_ms:
                return  # this connection's own offline (a clean stop)
        self._counts["state_restored"] += 1
        self._publish.append(Publish(self._state_topic, self._state_payload("online"), qos=1, retain=True))

    def _check_seq(self, node: _Node, payload: Any, now_ns: int) -> None:
        """Track ``seq`` (0-255, wrapping): a late message fills its gap; a gap still open after
        ``reorder_timeout_s`` triggers a rebirth request (``outbox``). Messages are decoded either way: each
        reading carries its own timestamp, so arrival order does not matter to storage."""
        if not payload.HasField("seq") or payload.seq > 255:
            raise DecodeError("shape", "a Sparkplug data message needs seq 0..255")
        seq = payload.seq
        if seq in node.missing:
            node.missing.discard(seq)
            if not node.missing and node.rebirth_reason == "seq_gap":
                node.rebirth_due_ns = None
            self._counts["seq_late"] += 1
            return
        expected = node.expected_seq
        node.expected_seq = (seq + 1) % 256
        if expected is None or seq == expected:
            return
        skipped = (seq - expected) % 256
        node.missing.update((expected + i) % 256 for i in range(skipped))
        self._counts["seq_gaps"] += 1
        self._due(node, now_ns, "seq_gap")

    def _due(self, node: _Node, now_ns: int, reason: str, at_once: bool = False) -> None:
        if node.rebirth_due_ns is None:
            node.rebirth_due_ns = now_ns if at_once else now_ns + self._timeout_ns
            node.rebirth_reason = reason

    def _rebirth(self, group: str, node_id: str, node: _Node, now_ns: int) -> None:
        node.rebirth_due_ns = None
        node.missing.clear()
        if node.rebirth_sent_ns is not None and now_ns - node.rebirth_sent_ns < self._timeout_ns:
            return  # one request per reorder timeout: the births are on their way
        node.rebirth_sent_ns = now_ns
        self._counts["rebirths_requested"] += 1
        self._publish.append(
            Publish(f"{NAMESPACE}/{group}/NCMD/{node_id}", rebirth_payload(now_ns), qos=0, retain=False)
        )

    def _state(self, group: str, node_id: str, node: _Node, now_ns: int) -> Publish:
        body = {
            "v": 1,
            "group": group,
            "node": node_id,
            "state": "online" if node.born else "stale",
            "bdSeq": node.bd_seq,
            "devices": {d: "online" if up and node.born else "stale" for d, up in sorted(node.devices.items())},
            "time": format_rfc3339(now_ns),
        }
        topic = f"{self._base}/sparkplug/{group}/{node_id}"
        return Publish(topic, json.dumps(body, separators=(",", ":")).encode(), qos=1, retain=True)

    # --- metrics ---------------------------------------------------------------------------------------

    def _parse(self, raw: bytes) -> Any:
        if len(raw) > self._limits.max_payload_bytes:
            raise DecodeError("too_large", f"payload is {len(raw):,} bytes, limit {self._limits.max_payload_bytes:,}")
        try:
            return spb.Payload.FromString(raw)
        except (ProtobufError, RuntimeError, ValueError) as exc:
            raise DecodeError("protobuf", f"not a Sparkplug B payload: {exc}") from None

    def _readings(
        self, message: Message, topic: _Topic, node: _Node, payload: Any, birth: bool, now: int
    ) -> list[Decoded]:
        machine = topic.device or topic.node
        source = Source(
            (("group", topic.group), ("node", topic.node), ("machine", machine), ("sensor", self._options.sensor))
        )
        default_ns = payload.timestamp * NS_PER_MS if payload.HasField("timestamp") else message.received_ns
        earliest = self._limits.min_time_ns
        latest = message.received_ns + round(self._limits.max_future_s * NS_PER_S)
        by_time: dict[int, dict[str, float]] = defaultdict(dict)
        problems: list[str] = []
        code: DecodeErrorCode | None = None
        for metric in payload.metrics:
            try:
                resolved = self._metric(metric, node, birth, now)
                if resolved is None:
                    continue
                name, value = resolved
                time_ns = metric.timestamp * NS_PER_MS if metric.HasField("timestamp") else default_ns
                if not earliest <= time_ns <= latest:
                    when = "before 2000" if time_ns < earliest else "in the future"
                    raise DecodeError("timestamp", f"metric {quote(name)} has a timestamp {when}")
            except DecodeError as exc:
                code = code or exc.code
                problems.append(exc.detail)
                continue
            by_time[time_ns][name] = value
        readings: list[Decoded] = []
        for time_ns, fields in sorted(by_time.items()):
            if self._field_keys is not None:
                try:
                    self._field_keys.admit(machine, fields)
                except DecodeError as exc:
                    code = code or exc.code
                    problems.append(exc.detail)
                    continue
            readings.append(Reading(source, time_ns, fields))
        if problems:
            assert code is not None
            self._counts["metrics_rejected"] += len(problems)
            detail = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            self._rejected.append(Rejection(message.topic, DecodeError(code, detail), message.payload))
        return readings

    def _metric(self, metric: Any, node: _Node, birth: bool, now: int) -> tuple[str, float] | None:
        """The (field name, value) of one metric; None when it holds nothing to store (a protocol metric,
        ``is_null``, ``is_transient``); ``DecodeError`` when it cannot be stored."""
        raw_name = metric.name
        if raw_name:
            try:
                name = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError("name", f"a metric name is not UTF-8: {quote(raw_name)}") from None
            datatype = metric.datatype if metric.HasField("datatype") else node.datatypes.get(name, 0)
            if birth:
                node.datatypes[name] = datatype
                if metric.HasField("alias"):
                    node.aliases[metric.alias] = (name, datatype)
        elif metric.HasField("alias"):
            known = node.aliases.get(metric.alias)
            if known is None:
                self._due(node, now, "unknown_alias")
                raise DecodeError("alias", f"alias {metric.alias} was declared by no birth (a rebirth is requested)")
            name, datatype = known
            if metric.HasField("datatype"):
                datatype = metric.datatype
        else:
            raise DecodeError("shape", "a metric with neither name nor alias")
        if metric.is_null:
            if name != _BDSEQ and not name.startswith(_CONTROL_PREFIXES):
                self._counts["nulls"] += 1
            return None
        spec = _NUMERIC.get(datatype)
        if spec is None or metric.is_transient or name not in node.names_ok:
            if name == _BDSEQ or name.startswith(_CONTROL_PREFIXES):
                return None
            if metric.is_transient:
                self._counts["transient"] += 1
                return None
            if spec is None:
                kind = spb.DATATYPE_NAMES.get(datatype, f"datatype {datatype}")
                raise DecodeError(
                    "unsupported", f"metric {quote(name)} is a {kind}; only numbers and booleans are stored"
                )
            _check_name(name, "metric name")
            if birth:  # remembered until the next NBIRTH, so bounded by what births declare
                node.names_ok.add(name)
        which, bits = spec
        present = metric.WhichOneof("value")
        if present != which:
            got = present or "no value"
            raise DecodeError("value", f"metric {quote(name)} ({spb.DATATYPE_NAMES[datatype]}) carries {got}")
        raw = getattr(metric, which)
        if bits:
            raw &= (1 << bits) - 1
            if raw >= 1 << (bits - 1):
                raw -= 1 << bits
        value = float(raw)
        if not math.isfinite(value):
            raise DecodeError("value", f"metric {quote(name)} is {value}; values must be finite")
        return name, value


def _bd_seq(payload: Any) -> int | None:
    """The ``bdSeq`` metric of a birth or death (the edge node's session number), if it has one."""
    for metric in payload.metrics:
        if metric.name == _BDSEQ.encode():
            return int(metric.long_value if metric.WhichOneof("value") == "long_value" else metric.int_value)
    return None


def _parse_topic(topic: str) -> _Topic | None:
    """The parts of a Sparkplug topic; None for STATE and commands; ``DecodeError`` for another shape."""
    parts = topic.split("/")
    if len(parts) >= 2 and parts[0] == NAMESPACE and parts[1] == "STATE":
        return None
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE or parts[2] not in _MESSAGE_TYPES:
        raise DecodeError(
            "topic", f"{quote(topic)} is not spBv1.0/{{group}}/{{N|D}}{{BIRTH|DATA|DEATH}}/{{node}}[/{{device}}]"
        )
    kind = parts[2]
    if kind in ("NCMD", "DCMD"):
        return None
    device_level = kind.startswith("D")
    if device_level != (len(parts) == 5):
        raise DecodeError("topic", f"{quote(topic)}: {kind} {'needs' if device_level else 'takes no'} a device id")
    for level in parts[1:2] + parts[3:]:
        _check_name(level, "topic level")
    return _Topic(parts[1], kind, parts[3], parts[4] if device_level else None)


def rebirth_payload(now_ns: int) -> bytes:
    """The NCMD payload that asks an edge node for its births again."""
    payload = spb.Payload(timestamp=now_ns // NS_PER_MS)
    payload.metrics.add(name=REBIRTH_METRIC.encode(), datatype=spb.BOOLEAN, boolean_value=True)
    return bytes(payload.SerializeToString())


class StatePayload:
    """The Sparkplug 3.0 STATE payloads: ``{"online": bool, "timestamp": ms}``.

    The online message carries the timestamp of the will set for the same connection (the spec asks for the
    same one, so that edge nodes can tell the current session's messages from an older one's).
    """

    def __init__(self, clock_ms: Callable[[], int] | None = None) -> None:
        self._clock_ms = clock_ms or (lambda: time.time_ns() // NS_PER_MS)
        self._will_ms: int | None = None

    @property
    def will_ms(self) -> int | None:
        """The timestamp of the latest will (and of the online message that follows it)."""
        return self._will_ms

    def __call__(self, state: Literal["online", "offline"]) -> bytes:
        if state == "offline":
            self._will_ms = self._clock_ms()
            stamp = self._will_ms
        else:
            stamp = self._will_ms if self._will_ms is not None else self._clock_ms()
        return json.dumps({"online": state == "online", "timestamp": stamp}, separators=(",", ":")).encode()
