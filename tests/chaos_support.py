"""Chaos rig: the agent and the gateway simulator as real processes on a real Mosquitto and InfluxDB 1.6.7.

A scenario starts its own broker and database (it kills or stops them, so it never shares them), the
agent (``python -m agent run``) with raw vibration mode ``all`` (every sample is a point), a separate
*recording* subscriber, and the simulator (``python -m agent simulate``, QoS 1, a per-topic ``seq`` in
every message). While the simulator publishes, the scenario breaks one component and brings it back;
then ``Rig.account()`` compares, message by message, what was published with what InfluxDB holds.

The expected set, per topic: ``seq`` runs 0..n-1 without gaps (no dropout faults are injected), and the
simulator's ``--stats-json`` says how many messages of each kind and per machine it published and that
the broker acknowledged all of them (``unacked == 0``). The recorder (persistent session, QoS 1) keeps
the content of every message it received, which gives the checksums: per process reading its fields,
per vibration block the number of samples and their sum. InfluxDB is read back with InfluxQL: the
``reading`` points (with their ``seq``) and, per vibration block, ``count``/``sum`` of ``value``
grouped by 200 ms buckets aligned on the blocks (2048 samples at 10240 Hz).

For the broker's kill while the simulator publishes, a *witness* (a second persistent session, offline
across the kill) tells what the broker lost after acknowledging it from what the agent lost; for a stalled
InfluxDB, the agent writes through a ``StallProxy`` that holds the responses.

Used by ``tests/integration/test_chaos*.py`` and ``scripts/chaos_report.py``; helpers only (no asserts).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import schema
from agent.health.selfmetrics import series_field
from pdm_tools.dev import services as devservices
from pdm_tools.dev.services import Service

REPO = Path(__file__).resolve().parents[1]
NS = 1_000_000_000

RATE_HZ = 10240
BLOCK_SAMPLES = 2048
BLOCK_NS = BLOCK_SAMPLES * NS // RATE_HZ  # 200 ms, exact
assert BLOCK_SAMPLES * NS % RATE_HZ == 0

# Mosquitto keeps QoS 1 sessions across its own kill -9 only from its persistence file, which it writes
# on its autosave schedule: after every change here (autosave_on_changes + interval 1).
PERSISTENT_BROKER_CONF = (
    "persistence true\npersistence_location {dir}/\nautosave_on_changes true\nautosave_interval 1\n"
)


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- recorder


@dataclass
class Received:
    """What the recorder got for one message (the first delivery; redeliveries are only counted)."""

    kind: str  # "vibration" or "process"
    machine: str
    seq: int
    ts_ns: int
    n: int  # samples (vibration) or 1
    total: float  # sum of samples (vibration) or of the fields (process)
    fields: dict[str, float] = field(default_factory=dict)
    arrived: float = 0.0  # time.monotonic() at the recorder


class Recorder:
    """A separate MQTT subscriber with a persistent session: every simulator message, and the agent's
    retained status/heartbeat. Thread-safe reads through ``snapshot``/``wait``."""

    def __init__(
        self,
        host: str,
        port: int,
        agent_id: str,
        name: str = "recorder",
        clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY,
    ) -> None:
        self.messages: dict[tuple[str, int], Received] = {}
        self.redelivered = 0
        self.heartbeat: dict = {}
        self.heartbeats: list[dict] = []
        self.status: list[tuple[float, str]] = []  # (monotonic arrival, state)
        self._cond = threading.Condition()
        self._base = f"pdm/{agent_id}"
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"chaos-{name}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.reconnect_delay_set(0.2, 1)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._address = (host, port)
        self._connected = threading.Event()
        self._connect(clean_start)

    def _connect(self, clean_start: bool | Literal[3]) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self._client.connect_async(*self._address, clean_start=clean_start, properties=props)
        self._client.loop_start()

    def wait_connected(self, timeout_s: float = 20) -> bool:
        return self._connected.wait(timeout_s)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        client.subscribe(
            [("factory/#", 1), (f"{self._base}/status", 1), (f"{self._base}/heartbeat", 1)],
        )
        self._connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic()
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self._cond:
            if msg.topic.startswith(self._base):
                if msg.topic.endswith("/heartbeat"):
                    # A retained heartbeat re-sent on a resubscribe may be older than the last one seen.
                    if int(body.get("time_ns", 0)) >= int(self.heartbeat.get("time_ns", 0)):
                        self.heartbeat = body
                    self.heartbeats.append(body)
                elif msg.topic.endswith("/status") and not msg.retain:
                    # Only live changes: a retained status re-sent on a resubscribe says nothing new.
                    self.status.append((now, str(body.get("state"))))
            else:
                self._record(msg.topic, body)
            self._cond.notify_all()

    def _record(self, topic: str, body: dict) -> None:
        parts = topic.split("/")
        machine, sensor = parts[-2], parts[-1]
        key = (topic, int(body["seq"]))
        if key in self.messages:
            self.redelivered += 1
            return
        if "data" in body:
            samples = np.frombuffer(base64.b64decode(body["data"]), dtype="<f4").astype(np.float64)
            rec = Received(sensor, machine, key[1], int(body["ts_ns"]), len(samples), float(samples.sum()))
            rec.arrived = time.monotonic()
        else:
            fields = {k: float(v) for k, v in body["fields"].items()}
            rec = Received(sensor, machine, key[1], int(body["ts_ns"]), 1, float(sum(fields.values())), fields)
            rec.arrived = time.monotonic()
        self.messages[key] = rec

    def count(self, kind: str | None = None) -> int:
        with self._cond:
            return sum(1 for r in self.messages.values() if kind is None or r.kind == kind)

    def snapshot(self) -> dict[tuple[str, int], Received]:
        with self._cond:
            return dict(self.messages)

    def wait(self, predicate: Callable[[Recorder], bool], timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout_s)

    def pause(self) -> None:
        """Disconnect, keeping the session: the broker queues what arrives for it (and keeps it across a
        restart only if it had persisted it)."""
        self._connected.clear()
        self._client.disconnect()
        self._client.loop_stop()

    def resume(self) -> None:
        """Reconnect to the kept session (its queued messages arrive first)."""
        self._connect(False)

    def max_seq(self) -> dict[str, int]:
        """Per topic, the highest ``seq`` received."""
        out: dict[str, int] = {}
        with self._cond:
            for topic, seq in self.messages:
                out[topic] = max(seq, out.get(topic, -1))
        return out

    def online_since(self, t: float) -> bool:
        return any(at >= t and state == "online" for at, state in self.status)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


# ----------------------------------------------------------------------------------------------- influx


class Influx:
    """The few InfluxQL queries the accounting needs (HTTP /query, epoch ns)."""

    def __init__(self, url: str, database: str) -> None:
        self.url = url
        self.database = database

    def query(self, q: str, timeout_s: float = 30) -> list[dict]:
        params = urllib.parse.urlencode({"db": self.database, "q": q, "epoch": "ns"})
        with urllib.request.urlopen(f"{self.url}/query?{params}", timeout=timeout_s) as response:
            body = json.loads(response.read())
        result = body["results"][0]
        if "database not found" in str(result.get("error", "")):
            return []  # nothing was ever written
        if "error" in result:
            raise RuntimeError(f"InfluxQL error: {result['error']} in {q}")
        return result.get("series", [])

    def reading_count(self) -> int | None:
        """Points of ``reading`` (None while the database is away or not yet created)."""
        try:
            series = self.query(f'SELECT count("seq") FROM "{schema.READING}"', timeout_s=2)
        except (OSError, RuntimeError, ValueError):
            return None
        return int(series[0]["values"][0][1]) if series else 0

    def readings(self) -> list[dict]:
        """Every ``reading`` point: time, machine, sensor, seq and the fields."""
        rows = []
        for s in self.query(f'SELECT * FROM "{schema.READING}"'):
            cols = s["columns"]
            rows.extend(dict(zip(cols, v, strict=True)) for v in s["values"])
        return rows

    def vibration_blocks(self, start_ns: int, end_ns: int) -> dict[tuple[str, int], tuple[int, float]]:
        """(machine, block start ns) -> (samples stored, their sum), per 200 ms bucket aligned on blocks."""
        offset = start_ns % BLOCK_NS
        q = (
            f'SELECT count("{schema.VIBRATION_FIELD}"), sum("{schema.VIBRATION_FIELD}") FROM "{schema.VIBRATION}" '
            f"WHERE time >= {start_ns} AND time < {end_ns} "
            f'GROUP BY time({BLOCK_NS}ns, {offset}ns), "machine" fill(none)'
        )
        out: dict[tuple[str, int], tuple[int, float]] = {}
        for s in self.query(q, timeout_s=120):
            machine = s["tags"]["machine"]
            for t, n, total in s["values"]:
                out[(machine, int(t))] = (int(n), float(total))
        return out


# ------------------------------------------------------------------------------------------- stall proxy


@dataclass
class _Pipe:
    """One proxied connection; ``stalled`` while what InfluxDB sends back is held in ``held``."""

    client: socket.socket
    upstream: socket.socket
    stalled: bool
    held: list[bytes] = field(default_factory=list)
    closed: bool = False


class StallProxy:
    """A TCP proxy between the agent and InfluxDB that can stall: requests go through, responses are held.

    ``stall()``: from now on whatever InfluxDB sends back is held, on open connections and on those
    accepted during the stall. InfluxDB receives (and may apply) every write; the writer gets no answer
    and must time out. The stall ends three ways:

    - ``release()``: the held responses are sent to whoever still waits for them; everything passes again;
    - ``drop()``: every connection of the stall is closed, its held responses discarded;
    - ``hang()``: new connections pass, but those of the stall stay held until ``close()``: a server that
      never answers a request, which only a client-side timeout gets out of.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((devservices.HOST, 0))
        self._listener.settimeout(0.2)
        self.url = f"http://{devservices.HOST}:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._stalled = False
        self._closing = False
        self._pipes: list[_Pipe] = []
        self.stats = {"connections": 0, "requests_in_stall": 0, "responses_held": 0, "released": 0, "dropped": 0}
        self._thread = threading.Thread(target=self._accept_loop, name="stall-proxy", daemon=True)
        self._thread.start()

    def stall(self) -> None:
        with self._lock:
            self._stalled = True
            for pipe in self._pipes:
                pipe.stalled = True

    def release(self) -> None:
        with self._lock:
            self._stalled = False
            for pipe in self._pipes:
                pipe.stalled = False
                for chunk in pipe.held:
                    try:
                        pipe.client.sendall(chunk)
                        self.stats["released"] += 1
                    except OSError:
                        break  # the client gave up on this connection (timed out and closed it)
                pipe.held.clear()

    def drop(self) -> None:
        with self._lock:
            self._stalled = False
            for pipe in [p for p in self._pipes if p.stalled]:
                self.stats["dropped"] += 1
                self._close(pipe)

    def hang(self) -> None:
        with self._lock:
            self._stalled = False

    def close(self) -> None:
        self._closing = True
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for pipe in list(self._pipes):
                self._close(pipe)

    def _close(self, pipe: _Pipe) -> None:
        """Close both sides (the caller holds the lock); shutdown first wakes the pumps' blocked recv."""
        if pipe.closed:
            return
        pipe.closed = True
        for sock in (pipe.client, pipe.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._pipes.remove(pipe)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()  # InfluxDB is down: the client sees the connection closed
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                pipe = _Pipe(client, upstream, stalled=self._stalled)
                self._pipes.append(pipe)
                self.stats["connections"] += 1
            for target in (self._requests, self._responses):
                threading.Thread(target=target, args=(pipe,), name="stall-proxy-pump", daemon=True).start()

    def _requests(self, pipe: _Pipe) -> None:
        """Client to InfluxDB, always forwarded (counted while the connection is stalled)."""
        while True:
            try:
                data = pipe.client.recv(65536)
                if data:
                    pipe.upstream.sendall(data)
            except OSError:
                data = b""
            with self._lock:
                if not data:
                    self._close(pipe)
                    return
                if pipe.stalled and data.startswith((b"POST ", b"GET ")):
                    self.stats["requests_in_stall"] += 1

    def _responses(self, pipe: _Pipe) -> None:
        """InfluxDB to the client, or into ``held`` while the connection is stalled."""
        while True:
            try:
                data = pipe.upstream.recv(65536)
            except OSError:
                data = b""
            with self._lock:
                if not data:
                    if not pipe.stalled:  # a stalled connection's end is decided by the stall's end
                        self._close(pipe)
                    return
                if pipe.stalled:
                    pipe.held.append(data)
                    self.stats["responses_held"] += 1
                    continue
                try:
                    pipe.client.sendall(data)
                except OSError:
                    self._close(pipe)
                    return


# -------------------------------------------------------------------------------------------- accounting


@dataclass
class SourceRow:
    """Accounting of one (machine, sensor): messages published vs. stored, and readings (points)."""

    machine: str
    sensor: str
    messages_published: int = 0
    messages_stored: int = 0
    messages_lost: list[int] = field(default_factory=list)  # seqs
    # Of those, how many the broker lost: the evidence subscriber never got them either (the recorder, or
    # the witness when the scenario has one: see ``account``).
    lost_unseen: int = 0
    messages_duplicated: int = 0  # seqs stored more than once (as different points)
    points_expected: int = 0
    points_stored: int = 0
    checksum_mismatches: list[int] = field(default_factory=list)  # seqs whose stored content differs


@dataclass
class Accounting:
    rows: list[SourceRow]
    published: int  # simulator: messages handed to MQTT and acknowledged by the broker
    unacked: int
    by_kind: dict[str, int]
    expected_by_kind: dict[str, int]  # sum of (max seq + 1) per topic of that kind
    not_seen_by_recorder: int  # published messages the recorder did not get (checksum then from InfluxDB only)

    @property
    def lost(self) -> int:
        return sum(len(r.messages_lost) for r in self.rows) + sum(
            max(0, self.by_kind.get(k, 0) - v) for k, v in self.expected_by_kind.items()
        )

    @property
    def lost_by_broker(self) -> int:
        """Lost messages no subscriber got: acknowledged to the publisher, then lost inside the broker."""
        return sum(r.lost_unseen for r in self.rows) + sum(
            max(0, self.by_kind.get(k, 0) - v) for k, v in self.expected_by_kind.items()
        )

    @property
    def duplicates(self) -> int:
        return sum(r.messages_duplicated for r in self.rows)

    @property
    def checksum_mismatches(self) -> int:
        return sum(len(r.checksum_mismatches) for r in self.rows)

    @property
    def points_expected(self) -> int:
        return sum(r.points_expected for r in self.rows)

    @property
    def points_stored(self) -> int:
        return sum(r.points_stored for r in self.rows)

    @property
    def complete(self) -> bool:
        return (
            self.lost == 0
            and self.duplicates == 0
            and self.checksum_mismatches == 0
            and self.points_stored == self.points_expected
            and self.expected_by_kind == self.by_kind
        )

    def render(self) -> str:
        out = [
            f"published {self.published} messages ({self.by_kind}), unacked {self.unacked}; "
            f"points expected {self.points_expected}, stored {self.points_stored}; lost {self.lost} "
            f"(never forwarded by the broker: {self.lost_by_broker}), "
            f"duplicates {self.duplicates}, checksum mismatches {self.checksum_mismatches}, "
            f"not seen by the recorder {self.not_seen_by_recorder}"
        ]
        for r in self.rows:
            out.append(
                f"  {r.machine}/{r.sensor}: messages {r.messages_stored}/{r.messages_published}, points "
                f"{r.points_stored}/{r.points_expected}, lost seqs {r.messages_lost[:10]}, "
                f"dup {r.messages_duplicated}, checksum mismatches {r.checksum_mismatches[:10]}"
            )
        return "\n".join(out)


def account(
    stats: dict,
    recorded: dict[tuple[str, int], Received],
    influx: Influx,
    duration_s: float,
    witnessed: dict[tuple[str, int], Received] | None = None,
) -> Accounting:
    """Message-by-message comparison of what was published with what InfluxDB holds.

    A message not stored is the broker's loss when the evidence subscriber never got it: the recorder,
    or ``witnessed`` when given, what a witness (a persistent session that was offline across the
    broker's kill, see ``Rig(witness=True)``) received: exactly what the broker kept for its sessions.
    """
    start_ns = int(stats["start_ns"])
    readings = influx.readings()
    stored_proc: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for p in readings:
        stored_proc.setdefault((p["machine"], p["sensor"]), {}).setdefault(int(p["seq"]), []).append(p)
    end_ns = start_ns + int((duration_s + 5) * NS)
    blocks = influx.vibration_blocks(start_ns, end_ns)

    by_topic_rec = _by_source(recorded)
    by_topic_held = by_topic_rec if witnessed is None else _by_source(witnessed)
    machines = sorted(stats["per_machine"])
    rows: list[SourceRow] = []
    expected_by_kind: dict[str, int] = {}
    not_seen = 0
    for machine in machines:
        for sensor in ("vibration", "process"):
            rec = by_topic_rec.get((machine, sensor), {})
            held = by_topic_held.get((machine, sensor), {})
            row = SourceRow(machine, sensor)
            if sensor == "process":
                stored = stored_proc.get((machine, sensor), {})
                n = max([*rec, *held, *stored, -1]) + 1
                for seq in range(n):
                    points = stored.get(seq, [])
                    row.points_expected += 1
                    row.points_stored += len(points)
                    if not points:
                        row.messages_lost.append(seq)
                        row.lost_unseen += seq not in held
                        continue
                    row.messages_stored += 1
                    if len(points) > 1:
                        row.messages_duplicated += 1
                    r = rec.get(seq)
                    if r is None:
                        not_seen += 1
                    elif points[0]["time"] != r.ts_ns or any(points[0].get(k) != v for k, v in r.fields.items()):
                        row.checksum_mismatches.append(seq)
            else:
                stored_blocks = {(t - start_ns) // BLOCK_NS: v for (m, t), v in blocks.items() if m == machine}
                n = max([*rec, *held, *stored_blocks, -1]) + 1
                for seq in range(n):
                    row.points_expected += BLOCK_SAMPLES
                    count, total = stored_blocks.get(seq, (0, 0.0))
                    row.points_stored += count
                    if count == 0:
                        row.messages_lost.append(seq)
                        row.lost_unseen += seq not in held
                        continue
                    row.messages_stored += 1
                    if count > BLOCK_SAMPLES:
                        row.messages_duplicated += 1
                    r = rec.get(seq)
                    if r is None:
                        not_seen += 1
                        if count != BLOCK_SAMPLES:
                            row.checksum_mismatches.append(seq)
                    elif count != r.n or r.ts_ns != start_ns + seq * BLOCK_NS or abs(total - r.total) > 1e-3:
                        # Stored values are the shortest repr of each float32 sample: equal to 1e-7 relative.
                        row.checksum_mismatches.append(seq)
            row.messages_published = n
            expected_by_kind[sensor] = expected_by_kind.get(sensor, 0) + n
            rows.append(row)
    by_kind = {k: int(v) for k, v in stats["by_kind"].items() if k in ("vibration", "process")}
    return Accounting(rows, int(stats["messages"]), int(stats["unacked"]), by_kind, expected_by_kind, not_seen)


def _by_source(received: dict[tuple[str, int], Received]) -> dict[tuple[str, str], dict[int, Received]]:
    out: dict[tuple[str, str], dict[int, Received]] = {}
    for (_topic, seq), rec in received.items():
        out.setdefault((rec.machine, rec.kind), {})[seq] = rec
    return out


# ------------------------------------------------------------------------------------------------ the rig


SIMULATOR_YAML = """\
broker: {{host: 127.0.0.1, port: {port}, client_id: chaos-sim-{tag}, ack_timeout_s: 30}}
machines: {{count: {machines}}}
duration_s: {duration}
speed: {speed}
seed: 7
vibration: {{block_samples: {block}, encoding: f32le}}
process: {{period_s: 1.0}}
faults: []
ground_truth: {{path: null}}
"""


@dataclass
class Recovery:
    """Seconds from bringing the component back to: agent online again, first reading stored after it,
    and every reading the recorder had seen by then stored (the outage's backlog)."""

    online_s: float | None = None
    first_point_s: float | None = None
    backlog_s: float | None = None

    def render(self) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} s"

        return (
            f"agent online {f(self.online_s)}, first new point {f(self.first_point_s)}, "
            f"backlog stored {f(self.backlog_s)}"
        )


class Rig:
    """One scenario's processes. Use as a context manager; everything is stopped at exit."""

    def __init__(
        self,
        workdir: Path,
        machines: int = 2,
        duration_s: float = 24.0,
        speed: float = 1.0,
        persistent_broker: bool = False,
        witness: bool = False,
        stall_proxy: bool = False,
        agent_config: dict | None = None,
        broker_conf: str = "",
    ) -> None:
        """``witness``: a second persistent subscriber that the broker disruptions take offline across the
        kill (evidence of what the broker kept, see ``account``); ``stall_proxy``: the agent reaches
        InfluxDB through a ``StallProxy``; ``agent_config``: merged into the agent's config (nested keys);
        ``broker_conf``: lines added to Mosquitto's config (e.g. a larger ``max_queued_messages``)."""
        self.workdir = workdir
        self.machines = machines
        self.duration_s = duration_s
        self.speed = speed
        self.tag = uuid.uuid4().hex[:8]
        self.agent_id = f"chaos-{self.tag}"
        self.database = f"chaos_{self.tag}"
        self.persistent_broker = persistent_broker
        self.broker_conf = broker_conf
        self.broker: Service | None = None
        self.influxdb: Service | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_starts = 0
        self.simulator: subprocess.Popen[bytes] | None = None
        self.recorder: Recorder | None = None
        self.witness: Recorder | None = None
        self.with_witness = witness
        self.with_stall_proxy = stall_proxy
        self.proxy: StallProxy | None = None
        self.agent_config = agent_config or {}
        self.influx: Influx | None = None
        self._logs: list = []

    # -- lifecycle

    def __enter__(self) -> Rig:
        self.workdir.mkdir(parents=True, exist_ok=True)
        broker_dir = self.workdir / "mosquitto"
        broker_dir.mkdir(exist_ok=True)
        extra = PERSISTENT_BROKER_CONF.format(dir=broker_dir) if self.persistent_broker else ""
        extra += self.broker_conf
        self.broker = devservices.start_mosquitto(broker_dir, extra_conf=extra)
        self.influxdb = devservices.start_influxdb_v1(self.workdir / "influxdb")
        self.influx = Influx(self.influxdb.url, self.database)
        if self.with_stall_proxy:
            self.proxy = StallProxy(self.influxdb.host, self.influxdb.port)
        self.config_path = self._write_agent_config()
        self.recorder = Recorder(self.broker.host, self.broker.port, self.agent_id)
        if not self.recorder.wait_connected(20):
            raise RuntimeError("the recording subscriber could not connect")
        if self.with_witness:
            # Clean start false from the first connect: mosquitto 2.0 writes only such sessions to its
            # persistence file (one that began with clean start is gone after a restart).
            self.witness = Recorder(self.broker.host, self.broker.port, self.agent_id, "witness", clean_start=False)
            if not self.witness.wait_connected(20):
                raise RuntimeError("the witness subscriber could not connect")
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in (self.simulator, self.agent):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for subscriber in (self.recorder, self.witness):
            if subscriber is not None:
                subscriber.close()
        if self.proxy is not None:
            self.proxy.close()
        for svc in (self.broker, self.influxdb):
            if svc is not None:
                svc.stop()
        for f in self._logs:
            f.close()

    def _write_agent_config(self) -> Path:
        assert self.broker is not None and self.influxdb is not None
        data = yaml.safe_load((REPO / "config" / "agent.yaml").read_text())
        data["agent"].update(id=self.agent_id, heartbeat_s=1, log_level="INFO", shutdown_timeout_s=20)
        data["health"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
        data["mqtt"].update(
            host=self.broker.host, port=self.broker.port, reconnect_min_s=0.5, reconnect_max_s=2, keepalive_s=10
        )
        data["storage"].update(
            url=self.proxy.url if self.proxy is not None else self.influxdb.url,
            flush_interval_s=0.5,
            backoff_min_s=0.2,
            backoff_max_s=2,
            timeout_s=5,
        )
        data["storage"]["v1"]["database"] = self.database
        data["storage"]["raw_vibration"]["mode"] = "all"
        data["spool"]["path"] = str(self.workdir / "spool.db")
        # Model paths of the example config are relative to its folder; this copy lives elsewhere.
        inference = data["inference"]
        for entry in [*inference.get("models", []), inference.get("defect") or {}]:
            if entry.get("path"):
                entry["path"] = str((REPO / "config" / entry["path"]).resolve())
        _merge(data, self.agent_config)
        path = self.workdir / "agent.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def start_agent(self, timeout_s: float = 60) -> float:
        """Start ``python -m agent run``; wait until its retained status says online. Returns the seconds."""
        assert self.recorder is not None
        self.agent_starts += 1
        out = (self.workdir / f"agent-{self.agent_starts}.log").open("wb")
        self._logs.append(out)
        t0 = time.monotonic()
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if not self.recorder.wait(lambda r: r.online_since(t0), timeout_s):
            raise RuntimeError(f"agent did not come online within {timeout_s} s:\n{self.agent_log()[-3000:]}")
        return time.monotonic() - t0

    def kill_agent(self) -> None:
        assert self.agent is not None
        self.agent.kill()  # SIGKILL: no drain, no flush, no offline status (the last will says offline)
        self.agent.wait(10)

    def stop_agent(self, timeout_s: float = 60) -> int:
        """SIGTERM (drain, flush, final heartbeat); the exit code."""
        assert self.agent is not None
        self.agent.send_signal(signal.SIGTERM)
        return self.agent.wait(timeout_s)

    def agent_log(self) -> str:
        return "\n".join(
            (self.workdir / f"agent-{i}.log").read_text(errors="replace") for i in range(1, self.agent_starts + 1)
        )

    def start_simulator(self) -> None:
        assert self.broker is not None
        cfg = self.workdir / "simulator.yaml"
        cfg.write_text(
            SIMULATOR_YAML.format(
                port=self.broker.port,
                tag=self.tag,
                machines=self.machines,
                duration=self.duration_s,
                speed=self.speed,
                block=BLOCK_SAMPLES,
            )
        )
        out = (self.workdir / "simulator.log").open("wb")
        self._logs.append(out)
        self.simulator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "simulate",
                "--config",
                str(cfg),
                "--stats-json",
                str(self.workdir / "simulator_stats.json"),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def wait_simulator(self, timeout_s: float) -> dict:
        """Wait for the simulator to end; its stats (it exits 1 when messages stayed unacknowledged)."""
        assert self.simulator is not None
        code = self.simulator.wait(timeout_s)
        path = self.workdir / "simulator_stats.json"
        if not path.exists():
            log_text = (self.workdir / "simulator.log").read_text(errors="replace")
            raise RuntimeError(f"simulator exited {code} without stats:\n{log_text[-3000:]}")
        stats = json.loads(path.read_text())
        stats["exit_code"] = code
        return stats

    def wait_published(self, messages: int, timeout_s: float = 30) -> bool:
        """Until the recorder has seen ``messages`` simulator messages (the stream is flowing)."""
        assert self.recorder is not None
        return self.recorder.wait(lambda r: len(r.messages) >= messages, timeout_s)

    # -- measurements

    def measure_recovery(
        self, since: float, baseline_count: int, backlog: int, online: bool = True, timeout_s: float = 60
    ) -> Recovery:
        """Poll (0.1 s) until a reading beyond ``baseline_count`` is stored and ``backlog`` readings are
        (and, with ``online``, the agent said online again after ``since``)."""
        assert self.recorder is not None and self.influx is not None
        rec = Recovery()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = time.monotonic()
            if rec.online_s is None:
                at = [t for t, s in list(self.recorder.status) if t >= since and s == "online"]
                if at:
                    rec.online_s = at[0] - since
            count = self.influx.reading_count()
            if count is not None:
                if rec.first_point_s is None and count > baseline_count:
                    rec.first_point_s = now - since
                if rec.backlog_s is None and count >= backlog:
                    rec.backlog_s = now - since
            if rec.first_point_s is not None and rec.backlog_s is not None and (rec.online_s is not None or not online):
                break
            time.sleep(0.1)
        return rec

    def wait_stored(self, process_messages: int, timeout_s: float) -> bool:
        """Until InfluxDB holds ``process_messages`` readings and the agent's spool is empty."""
        assert self.influx is not None and self.recorder is not None
        deadline = time.monotonic() + timeout_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = self.influx.reading_count() or 0
            fields = self.recorder.heartbeat.get("fields", {})
            drained = fields.get("spool_depth", 1) == 0
            if count >= process_messages and drained:
                return True
            if count != last:
                last, since = count, time.monotonic()
            elif drained and time.monotonic() - since > 10:
                return False  # spool empty and nothing new for 10 s: what is missing will not come
            time.sleep(0.25)
        return False

    def account(self, stats: dict) -> Accounting:
        assert self.recorder is not None and self.influx is not None
        witnessed = None
        if self.witness is not None:
            # The broker delivers a session's queue in order: once the witness has each topic's last
            # message, it has everything the broker had kept for it.
            last = self.recorder.max_seq()
            witness = self.witness
            if not witness.wait(lambda w: all(w.max_seq().get(t, -1) >= n for t, n in last.items()), 30):
                log("the witness did not receive every topic's last message")
            witnessed = witness.snapshot()
        return account(stats, self.recorder.snapshot(), self.influx, self.duration_s, witnessed)


def _merge(base: dict, overrides: dict) -> None:
    """Merge ``overrides`` into ``base`` in place, section by section."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def counter(fields: dict, name: str, missing: float = 0.0) -> float:
    """A heartbeat's value of ``name`` (a counter's sum over its label sets) or ``name{label=value}``;
    ``missing`` without it (no heartbeat yet: ``{}``)."""
    return float(fields.get(series_field(name), missing))


# -------------------------------------------------------------------------------------------- scenarios

REPORTED_COUNTERS = (
    "ingest.messages",
    "ingest.readings",
    "ingest.blocks",
    "ingest.samples",
    "mqtt.acks",
    "mqtt.acks_stale",
    "mqtt.connects",
    "mqtt.disconnects",
    "spool.appended",
    "spool.dropped",
    "spool.dead_lettered",
    "storage.points_written",
    "storage.write_failures",
    "decode.errors",
    "spool.depth",
)


@dataclass
class ScenarioResult:
    name: str
    accounting: Accounting
    recovery: Recovery
    stats: dict
    counters: dict  # the final heartbeat's fields of the (last) agent process
    agent_exit_code: int | None
    outage_s: float
    wall_s: float
    before: dict = field(default_factory=dict)  # agent kill: the last heartbeat of the killed agent
    sessions_present: list[bool] = field(default_factory=list)  # per agent connect, from the agent log
    killed_at: float | None = None  # time.monotonic() of the kill (broker scenarios)
    notes: list[str] = field(default_factory=list)
    during: dict = field(default_factory=dict)  # the last heartbeat's fields before the fault ended
    fault: dict = field(default_factory=dict)  # the fault's own numbers (proxy counts, messages held ...)

    def render(self) -> str:
        c = {k: counter(self.counters, k) for k in REPORTED_COUNTERS}
        lines = [
            f"=== {self.name}: outage {self.outage_s:.1f} s, wall {self.wall_s:.1f} s, "
            f"agent exit {self.agent_exit_code}, "
            f"simulator exit {self.stats.get('exit_code')} (unacked {self.stats['unacked']}, "
            f"disconnects {self.stats['disconnects']}, retries {self.stats['retries']})",
            self.accounting.render(),
            f"recovery: {self.recovery.render()}",
            f"final heartbeat counters: {c}",
        ]
        if self.before:
            before = {k: counter(self.before, k) for k in REPORTED_COUNTERS}
            lines.append(f"last heartbeat before the fault: {before}")
        if self.during:
            during = {k: counter(self.during, k) for k in REPORTED_COUNTERS}
            lines.append(f"last heartbeat before the fault ended: {during}")
        if self.fault:
            lines.append(f"fault: {self.fault}")
        lines.extend(self.notes)
        return "\n".join(lines)


Disruption = Callable[[Rig, ScenarioResult], None]


def run_scenario(
    name: str,
    workdir: Path,
    disrupt: Disruption,
    lead_s: float = 5.0,
    before_agent: Disruption | None = None,
    **rig_kw: object,
) -> ScenarioResult:
    """Agent up, simulator publishing for ``lead_s``, ``disrupt``, then wait for the end and account."""
    started = time.monotonic()
    result = ScenarioResult(name, None, Recovery(), {}, {}, None, 0.0, 0.0)  # type: ignore[arg-type]
    with Rig(workdir, **rig_kw) as rig:  # type: ignore[arg-type]
        if before_agent is not None:
            before_agent(rig, result)
        rig.start_agent()
        rig.start_simulator()
        if not rig.wait_published(1, 30):
            raise RuntimeError("the simulator published nothing")
        time.sleep(lead_s)
        disrupt(rig, result)
        stats = rig.wait_simulator(rig.duration_s / rig.speed + 120)
        result.stats = stats
        process = int(stats["by_kind"].get("process", 0))
        # When nothing was stored after the recovery, waiting long only delays the verdict.
        store_timeout_s = 120 if result.recovery.first_point_s is not None else 10
        if not rig.wait_stored(process, store_timeout_s):
            result.notes.append(f"InfluxDB did not reach the published reading count within {store_timeout_s} s")
        stop_ns = time.time_ns()
        result.agent_exit_code = rig.stop_agent()
        assert rig.recorder is not None
        # The final heartbeat (published at stop, retained) reaches the recorder shortly after.
        rig.recorder.wait(lambda r: int(r.heartbeat.get("time_ns", 0)) >= stop_ns, 10)
        result.counters = dict(rig.recorder.heartbeat.get("fields", {}))
        result.accounting = rig.account(stats)
        recorded = rig.recorder.snapshot()
        if rig.witness is not None:
            # Both sides of the broker's loss: acknowledged and forwarded live to the recorder, yet not in
            # the sessions it restored (the witness never got them).
            result.fault["recorded_not_witnessed"] = len(recorded.keys() - rig.witness.snapshot().keys())
        for row in result.accounting.rows:
            for seq in row.messages_lost:
                got = next(
                    (r for r in recorded.values() if (r.machine, r.kind, r.seq) == (row.machine, row.sensor, seq)), None
                )
                if got is None:
                    when = "never"
                elif result.killed_at is None:
                    when = "live"
                else:
                    when = f"{got.arrived - result.killed_at:+.3f} s from the kill"
                result.notes.append(f"lost {row.machine}/{row.sensor} seq {seq}: reached the recorder {when}")
        result.notes.append(f"recorder redeliveries: {rig.recorder.redelivered}")
        log_text = rig.agent_log()
        result.sessions_present = [m == "True" for m in re.findall(r"\(session present: (\w+)\)", log_text)]
        result.notes.append(f"agent connects, session present: {result.sessions_present}")
        for needle in ("resumes with", "session present", "ended:", "InfluxDB write failed", "writes succeed again"):
            hits = [line for line in log_text.splitlines() if needle in line]
            if hits:
                result.notes.append(f"agent log ({len(hits)}x '{needle}'): {hits[0][-160:]}")
    result.wall_s = time.monotonic() - started
    return result


def kill_broker(outage_s: float = 3.0, hold_s: float = 3.0, pause_publisher: bool = True) -> Disruption:
    """kill -9 the broker while it holds messages for the agent, restart it on the same port (and
    persistence file) after ``outage_s``.

    To make sure the broker holds a backlog for the agent when it dies, the agent is frozen (SIGSTOP)
    for ``hold_s`` before the kill: the broker keeps accepting the simulator's messages and queues them
    (or has them in flight, unacknowledged) for the agent's session. The agent is thawed (SIGCONT) right
    after the kill, so it sees the connection drop as it would in production.

    Mosquitto acknowledges a PUBLISH before its next autosave has written it, so a message that arrives
    in the last milliseconds before a kill can be lost by the broker whatever the subscriber does. With
    ``pause_publisher`` the simulator is also frozen for the last second before the kill (and thawed once
    the broker is back), so that the broker's autosave has caught up and every loss would be the agent's;
    without it, such broker losses happen and are counted.
    """

    def disrupt(rig: Rig, result: ScenarioResult) -> None:
        assert rig.broker is not None and rig.broker.process is not None and rig.recorder is not None
        assert rig.influx is not None and rig.agent is not None and rig.simulator is not None
        if rig.witness is not None:
            rig.witness.pause()  # from now on the broker queues for the witness what it holds for the agent
        rig.agent.send_signal(signal.SIGSTOP)
        held_from = rig.recorder.count()
        time.sleep(hold_s)
        if pause_publisher:
            rig.simulator.send_signal(signal.SIGSTOP)
            time.sleep(1.0)
        held = rig.recorder.count() - held_from
        rig.broker.process.kill()
        killed = result.killed_at = time.monotonic()
        rig.broker.process.wait(10)
        rig.agent.send_signal(signal.SIGCONT)
        rig.broker.stop()  # the process is gone: this only closes its output file
        result.fault["held"] = held
        result.notes.append(f"messages published while the agent was frozen, before the broker was killed: {held}")
        log(f"broker killed (-9) holding about {held} messages for the frozen agent; restarting in {outage_s} s")
        time.sleep(outage_s)
        backlog = rig.recorder.count("process")
        baseline = rig.influx.reading_count() or 0
        rig.broker.start()
        t0 = time.monotonic()
        if rig.witness is not None:
            rig.witness.resume()
        if pause_publisher:
            rig.simulator.send_signal(signal.SIGCONT)
        result.outage_s = t0 - killed
        result.recovery = rig.measure_recovery(t0, baseline, backlog)
        log(f"broker back: {result.recovery.render()}")

    return disrupt


def stop_influxdb(outage_s: float = 8.0, kill: bool = False) -> Disruption:
    """Stop InfluxDB (SIGTERM, or with ``kill`` SIGKILL: no shutdown, writes in flight cut off) under load,
    start it again on the same port and data after ``outage_s``."""

    def disrupt(rig: Rig, result: ScenarioResult) -> None:
        assert rig.influxdb is not None and rig.recorder is not None and rig.influx is not None
        baseline = rig.influx.reading_count() or 0
        stopped = time.monotonic()
        if kill:
            assert rig.influxdb.process is not None
            rig.influxdb.process.kill()
            rig.influxdb.process.wait(10)
        rig.influxdb.stop()  # after a kill this only closes its output file
        log(f"InfluxDB {'killed (-9)' if kill else 'stopped'}; restarting in {outage_s} s")
        time.sleep(outage_s)
        rig.influxdb.start()
        t0 = time.monotonic()
        result.outage_s = t0 - stopped
        backlog = rig.recorder.count("process")
        result.recovery = rig.measure_recovery(t0, baseline, backlog, online=False)
        log(f"InfluxDB back: {result.recovery.render()}")

    return disrupt


def stall_influxdb(stall_s: float = 8.0, end: str = "drop", recovery_timeout_s: float = 60.0) -> Disruption:
    """Stall InfluxDB (``Rig(stall_proxy=True)``) for ``stall_s`` under load, then end the stall by
    ``StallProxy`` ``end``: ``release``, ``drop`` or ``hang``.

    The writes sent during the stall reach InfluxDB, which applies them, but their answers never reach
    the writer (released too late, or dropped): it must time out and write the same batch again, which
    may store nothing twice (same series and timestamps). Meanwhile the agent keeps acknowledging
    messages into its spool. ``result.before``/``result.during`` hold the heartbeats at the stall's start
    and end.
    """
    ends = {"release": StallProxy.release, "drop": StallProxy.drop, "hang": StallProxy.hang}

    def disrupt(rig: Rig, result: ScenarioResult) -> None:
        assert rig.proxy is not None and rig.recorder is not None and rig.influx is not None
        result.before = dict(rig.recorder.heartbeat.get("fields", {}))
        rig.proxy.stall()
        stalled = time.monotonic()
        log(f"InfluxDB stalled (responses held); ending it ({end}) in {stall_s} s")
        time.sleep(stall_s)
        result.during = dict(rig.recorder.heartbeat.get("fields", {}))
        baseline = rig.influx.reading_count() or 0
        ends[end](rig.proxy)
        t0 = time.monotonic()
        result.outage_s = t0 - stalled
        result.fault = dict(rig.proxy.stats)
        backlog = rig.recorder.count("process")
        result.recovery = rig.measure_recovery(t0, baseline, backlog, online=False, timeout_s=recovery_timeout_s)
        log(f"stall ended ({end}): {result.recovery.render()}; proxy {rig.proxy.stats}")

    return disrupt


def kill_agent(outage_s: float = 2.0) -> Disruption:
    """kill -9 the agent mid-stream; start it again (same config, spool and client id) after ``outage_s``."""

    def disrupt(rig: Rig, result: ScenarioResult) -> None:
        assert rig.recorder is not None and rig.influx is not None
        result.before = dict(rig.recorder.heartbeat.get("fields", {}))
        rig.kill_agent()
        killed = time.monotonic()
        log(f"agent killed (-9); restarting in {outage_s} s")
        time.sleep(outage_s)
        baseline = rig.influx.reading_count() or 0
        t0 = time.monotonic()
        backlog = rig.recorder.count("process")
        rig.start_agent()
        result.outage_s = t0 - killed
        result.recovery = rig.measure_recovery(t0, baseline, backlog)
        log(f"agent back: {result.recovery.render()}")

    return disrupt


def _stop_influxdb_before_agent(rig: Rig, result: ScenarioResult) -> None:
    assert rig.influxdb is not None
    rig.influxdb.stop()
    result.notes.append("InfluxDB stopped before the agent started")


def start_influxdb_late(recovery_timeout_s: float = 20.0) -> Disruption:
    """InfluxDB was down when the agent started (so its CREATE DATABASE failed); start it now."""

    def disrupt(rig: Rig, result: ScenarioResult) -> None:
        assert rig.influxdb is not None and rig.recorder is not None
        rig.influxdb.start()
        t0 = time.monotonic()
        result.outage_s = float("nan")
        backlog = rig.recorder.count("process")
        result.recovery = rig.measure_recovery(t0, 0, backlog, online=False, timeout_s=recovery_timeout_s)
        log(f"InfluxDB up: {result.recovery.render()}")

    return disrupt


SCENARIOS: dict[str, tuple[Disruption, dict]] = {
    "broker_kill": (kill_broker(), {"persistent_broker": True}),
    # The kill while the simulator keeps publishing: a message in mosquitto's window between PUBACK and
    # autosave can be lost by the broker; the witness tells those from the agent's losses.
    "broker_kill_streaming": (
        kill_broker(pause_publisher=False),
        {"persistent_broker": True, "witness": True, "duration_s": 16.0},
    ),
    # Control, report only: the same with an agent whose session ends with its connection (session expiry
    # 0): the messages the broker held for it are gone after the restart while the witness has them: the
    # agent's loss.
    "broker_kill_streaming_no_session": (
        kill_broker(pause_publisher=False),
        {
            "persistent_broker": True,
            "witness": True,
            "duration_s": 16.0,
            "agent_config": {"mqtt": {"session_expiry_s": 0}},
        },
    ),
    # Control, report only: the same kill with the devservices default (no persistence). The messages the
    # broker held for the frozen agent die with it (and the simulator, acknowledged, does not resend them).
    "broker_kill_without_persistence": (kill_broker(), {"persistent_broker": False}),
    "influxdb_stop": (stop_influxdb(), {}),
    "influxdb_kill": (stop_influxdb(outage_s=5.0, kill=True), {"duration_s": 16.0}),
    "influxdb_stall_release": (stall_influxdb(end="release"), {"stall_proxy": True, "duration_s": 18.0}),
    "influxdb_stall_drop": (stall_influxdb(end="drop"), {"stall_proxy": True, "duration_s": 18.0}),
    # Control, report only: a writer without a usable timeout (storage.timeout_s 3600) behind a server
    # that never answers the writes of the stall: it waits on the first of them while the spool grows.
    "influxdb_stall_without_timeout": (
        stall_influxdb(end="hang", recovery_timeout_s=15.0),
        {"stall_proxy": True, "duration_s": 18.0, "agent_config": {"storage": {"timeout_s": 3600}}},
    ),
    "agent_kill": (kill_agent(), {}),
    "influxdb_down_at_agent_start": (
        start_influxdb_late(),
        {"before_agent": _stop_influxdb_before_agent, "duration_s": 12.0},
    ),
}


def run(name: str, workdir: Path, **overrides: object) -> ScenarioResult:
    disrupt, kw = SCENARIOS[name]
    return run_scenario(name, workdir, disrupt, **{**kw, **overrides})
