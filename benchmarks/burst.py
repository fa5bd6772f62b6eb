"""Burst: a QoS 1 burst of small process readings, the agent vs a bare batcher, time until all are in InfluxDB.

``bench_burst`` publishes ``messages`` process readings (one ``fields`` message each, 100 machines, as in
``benchmarks/workload.py``; 50,000 in the full run) to Mosquitto as fast as the harness publisher can
(QoS 1, 1000 in flight) while the subscriber under test runs, and measures from just before the first
``publish`` until InfluxDB holds every reading (``count("seq")`` of ``reading`` polled every
``POLL_S``). Side by side, in the same run:

- **agent**: a fresh agent subprocess (``benchmarks/harness.AgentProcess``: the shipped config, every stage
  on) with a persistent MQTT session (``session_expiry_s`` ``SESSION_EXPIRY_S``, the shipped
  ``clean_start`` false) and its own database;
- **bare batcher**: ``BareBatcher``, a minimal paho subscriber (MQTT 5, QoS 1, persistent session,
  automatic PUBACK) that formats each reading as line protocol in its callback and POSTs batches of
  ``batch`` lines, or what it has every ``flush_s`` seconds, to ``/write`` with ``urllib`` from a second
  thread: what a hand-written forwarder would do, without a durable spool.

Attempts alternate the order (agent first, then bare first, ...), so both see the same background load;
the best attempt of each counts. Duplicates: every reading has a unique (machine, seq) and a unique
timestamp per machine, so ``count("seq") - count(distinct("seq"))`` per machine is the number of readings
stored twice under different timestamps, and ``min``/``max`` of ``seq`` per machine show the set is
exactly ``0 .. per_machine - 1`` (a redelivered message with the same timestamp overwrites its own point:
idempotent, so it cannot be told apart and does no harm). Persistent sessions are removed after each
attempt (``drop_session``), so the broker does not queue later phases' messages for a subscriber that left.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.health.selfmetrics import series_field
from benchmarks.harness import AgentProcess, Publisher
from benchmarks.workload import Event, Fleet

POLL_S = 0.1  # how often InfluxDB is asked how many readings it holds
SESSION_EXPIRY_S = 600  # persistent sessions of both subscribers (removed after each attempt)
TOPIC_FILTER = "factory/#"


# -- InfluxDB v1 over plain HTTP (no agent code: the measuring side stays independent of the agent) --------


def influx_query(url: str, db: str, q: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The ``series`` of the first statement's result (empty when there is none)."""
    query = urllib.parse.urlencode({"db": db, "q": q, "epoch": "ns"})
    with urllib.request.urlopen(f"{url}/query?{query}", timeout=timeout_s) as response:
        body = json.loads(response.read())
    result = (body.get("results") or [{}])[0]
    if "error" in result:
        raise RuntimeError(f"InfluxDB query {q!r}: {result['error']}")
    return list(result.get("series") or [])


def influx_post(url: str, path: str, params: dict[str, str], data: bytes, timeout_s: float = 60.0) -> None:
    request = urllib.request.Request(f"{url}{path}?{urllib.parse.urlencode(params)}", data=data, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


def stored_readings(url: str, db: str) -> int:
    """``count("seq")`` of ``reading`` (0 while the database or the measurement does not exist yet)."""
    try:
        series = influx_query(url, db, 'SELECT count("seq") FROM "reading"')
    except RuntimeError as exc:
        if "database not found" in str(exc):
            return 0
        raise
    return sum(int(v[1] or 0) for s in series for v in s.get("values", []))


def wait_stored(
    url: str, db: str, expected: int, t0: float, timeout_s: float, alive: Callable[[], bool] = lambda: True
) -> tuple[float | None, int]:
    """Seconds from ``t0`` (``perf_counter``) until ``count("seq") >= expected``, polled every ``POLL_S``
    (None after ``timeout_s`` or once ``alive()`` is false), and the last count."""
    count = 0
    while time.perf_counter() - t0 < timeout_s:
        count = stored_readings(url, db)
        if count >= expected:
            return time.perf_counter() - t0, count
        if not alive():
            break
        time.sleep(POLL_S)
    return None, count


def check_stored(url: str, db: str, machines: int, per_machine: int) -> dict[str, Any]:
    """Stored readings, duplicates (same seq stored under two timestamps) and whether each machine holds exactly
    the sequence numbers ``0 .. per_machine - 1``."""
    series = influx_query(
        url,
        db,
        'SELECT count("seq"), count(distinct("seq")), min("seq"), max("seq") FROM "reading" GROUP BY "machine"',
        timeout_s=120,
    )
    stored = distinct = exact = 0
    for s in series:
        for _, count, unique, low, high in s.get("values", []):
            stored += int(count or 0)
            distinct += int(unique or 0)
            exact += int(unique == per_machine and low == 0 and high == per_machine - 1)
    return {
        "stored": stored,
        "distinct": distinct,
        "duplicates": stored - distinct,
        "machines_stored": len(series),
        "machines_exact": exact,
        "complete": stored == distinct == machines * per_machine and exact == machines,
    }


# -- MQTT sessions -----------------------------------------------------------------------------------------


def drop_session(host: str, port: int, client_id: str) -> None:
    """End a persistent session left by ``client_id``: connect with a clean start and no expiry, disconnect."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0
    client.connect(host, port, clean_start=True, properties=properties)
    client.loop_start()
    connected.wait(10)
    client.disconnect()
    client.loop_stop()


class BurstAgent(AgentProcess):
    """The harness agent with a persistent session (the shipped ``clean_start`` false and a session expiry)."""

    session_expiry_s: int = SESSION_EXPIRY_S

    @property
    def client_id(self) -> str:
        return f"bench-agent-{self.name}-{os.getpid()}"

    def write_config(self) -> Path:
        path = super().write_config()
        data = self._config
        data["mqtt"].update(session_expiry_s=self.session_expiry_s, client_id=self.client_id)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


# -- the bare batcher --------------------------------------------------------------------------------------


class BareBatcher:
    """paho (MQTT 5, QoS 1, persistent session, automatic PUBACK) → line protocol → ``/write`` in batches.

    The paho callback parses the JSON payload and formats one line per reading (tags from the topic levels,
    sorted as the agent writes them, ``seq`` as an integer field, the device timestamp in ns); a writer
    thread POSTs ``batch`` lines as soon as it has them, or whatever it has every ``flush_s`` seconds.
    """

    def __init__(
        self, host: str, port: int, influx_url: str, db: str, name: str, batch: int = 5000, flush_s: float = 1.0
    ) -> None:
        self.influx_url, self.db, self.batch, self.flush_s = influx_url, db, batch, flush_s
        self.host, self.port = host, port
        self.client_id = f"bench-batcher-{name}-{os.getpid()}"
        self.received = 0
        self.last_received = 0.0
        self.written = 0
        self.posts = 0
        self.errors: list[str] = []
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._stop = False
        influx_post(influx_url, "/query", {"q": f'CREATE DATABASE "{db}"'}, b"")
        self._writer = threading.Thread(target=self._write_loop, name="bare-batcher-writer", daemon=True)
        self._writer.start()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(TOPIC_FILTER, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect(host, port, clean_start=False, properties=properties)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("bare batcher: no SUBACK")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            _, site, line, machine, sensor = msg.topic.split("/")
            body = json.loads(msg.payload)
            fields = ",".join(f"{k}={float(v)!r}" for k, v in body["fields"].items())
            text = (
                f"reading,line={line},machine={machine},sensor={sensor},site={site} "
                f"{fields},seq={int(body['seq'])}i {int(body['ts_ns'])}"
            )
        except (ValueError, KeyError, TypeError) as exc:
            self.errors.append(f"{msg.topic}: {exc!r}")
            return
        with self._cond:
            self._lines.append(text)
            self.received += 1
            self.last_received = time.perf_counter()
            if len(self._lines) >= self.batch:
                self._cond.notify()

    def _write_loop(self) -> None:
        deadline = time.monotonic() + self.flush_s
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stop or len(self._lines) >= self.batch, max(deadline - time.monotonic(), 0)
                )
                lines, self._lines = self._lines[: self.batch], self._lines[self.batch :]
                stop = self._stop and not self._lines
            if lines:
                self._post(lines)
            if len(lines) < self.batch:  # a timed flush (or the last one): the next one a period from now
                deadline = time.monotonic() + self.flush_s
            if stop and not lines:
                return

    def _post(self, lines: list[str]) -> None:
        data = ("\n".join(lines) + "\n").encode()
        for attempt in range(5):
            try:
                influx_post(self.influx_url, "/write", {"db": self.db, "precision": "ns"}, data)
                self.written += len(lines)
                self.posts += 1
                return
            except OSError as exc:  # urllib.error.URLError and HTTPError are OSErrors
                self.errors.append(f"write attempt {attempt + 1}: {exc!r}")
                time.sleep(0.5 * 2**attempt)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._writer.join(60)
        drop_session(self.host, self.port, self.client_id)


# -- the phase ---------------------------------------------------------------------------------------------


def burst_events(machines: int, messages: int) -> tuple[Fleet, list[Event]]:
    """``messages`` process readings, ``messages / machines`` per machine, consecutive per machine."""
    if messages % machines:
        raise ValueError(f"the burst of {messages} must split evenly over {machines} machines")
    fleet = Fleet(machines, 0)
    events = fleet.events(0.0, messages / machines / fleet.process_hz)
    if len(events) != messages:
        raise AssertionError(f"the fleet gave {len(events)} messages, not {messages}")
    return fleet, events


def _publish(host: str, port: int, name: str, events: list[Event]) -> tuple[float, float]:
    """Publish ``events`` as fast as possible; (``perf_counter`` before the first publish, seconds taken)."""
    pub = Publisher(host, port, name)
    try:
        t0 = time.perf_counter()
        return t0, pub.publish(events, speed=None)
    finally:
        pub.close()


def run_agent(
    services: tuple[str, int, str], workdir: Path, name: str, events: list[Event], machines: int, timeout_s: float
) -> dict[str, Any]:
    host, port, url = services
    n = len(events)
    agent = BurstAgent(workdir, host, port, url, name)
    agent.start()
    try:
        t0, publish_s = _publish(host, port, name, events)

        received: list[float] = []

        def alive() -> bool:  # also notes when the heartbeat first shows every message received (0.5 s steps)
            if not received and agent.counter("ingest.messages") >= n:
                received.append(agent.counters_at - t0)
            return agent.process is not None and agent.process.poll() is None

        stored_s, count = wait_stored(url, agent.database, n, t0, timeout_s, alive)
        alive()
        received_s = received[0] if received else None
        counters = dict(agent.counters)
        memory = agent.memory_kb() if agent.process is not None and agent.process.poll() is None else {}
    finally:
        code = agent.stop()
        drop_session(host, port, agent.client_id)
    check = check_stored(url, agent.database, machines, n // machines)

    def total(prefix: str) -> float:
        return float(counters.get(series_field(prefix), 0.0))

    return {
        "subscriber": "agent",
        "database": agent.database,
        "publish_s": publish_s,
        "publish_msgs_per_s": n / publish_s,
        "received_s": received_s,
        "stored_s": stored_s,
        "stored_at_timeout": count if stored_s is None else None,
        "readings_per_s": n / stored_s if stored_s else None,
        "messages_received": total("ingest.messages"),
        "decode_errors": total("decode.errors"),
        "spool_dropped": total("spool.dropped"),
        "peak_rss_mb": memory.get("VmHWM", 0) / 1024 or None,
        "exit_code": code,
        **check,
        "log_tail": agent.log_tail(1500) if stored_s is None or code not in (0, None) else "",
    }


def run_bare(
    services: tuple[str, int, str], name: str, events: list[Event], machines: int, timeout_s: float
) -> dict[str, Any]:
    host, port, url = services
    n = len(events)
    db = f"bench_{name}_{os.getpid()}".replace("-", "_")
    batcher = BareBatcher(host, port, url, db, name)
    try:
        t0, publish_s = _publish(host, port, name, events)
        stored_s, count = wait_stored(url, db, n, t0, timeout_s)
        received_s = batcher.last_received - t0 if batcher.received >= n else None
    finally:
        batcher.close()
    check = check_stored(url, db, machines, n // machines)
    return {
        "subscriber": "bare_batcher",
        "database": db,
        "publish_s": publish_s,
        "publish_msgs_per_s": n / publish_s,
        "received_s": received_s,
        "stored_s": stored_s,
        "stored_at_timeout": count if stored_s is None else None,
        "readings_per_s": n / stored_s if stored_s else None,
        "messages_received": batcher.received,
        "decode_errors": len(batcher.errors),
        "errors": batcher.errors[:5],
        "posts": batcher.posts,
        **check,
    }


def bench_burst(
    services: tuple[str, int, str],
    workdir: Path,
    messages: int,
    machines: int = 100,
    attempts: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Agent vs bare batcher on the same burst, ``attempts`` times alternating the order; best of each."""
    fleet, events = burst_events(machines, messages)
    timeout_s = 60.0 + messages / 200  # a subscriber slower than 200 readings/s is reported as not complete
    runs: dict[str, list[dict[str, Any]]] = {"agent": [], "bare_batcher": []}
    for attempt in range(attempts):
        order = ("agent", "bare_batcher") if attempt % 2 == 0 else ("bare_batcher", "agent")
        for who in order:
            name = f"burst-{'agent' if who == 'agent' else 'bare'}-{attempt}"
            if who == "agent":
                r = run_agent(services, workdir, name, events, machines, timeout_s)
            else:
                r = run_bare(services, name, events, machines, timeout_s)
            r["attempt"] = attempt
            runs[who].append(r)
            log(
                f"burst {who} #{attempt}: stored {r['stored']:,}/{messages:,} (duplicates {r['duplicates']}) in "
                + (
                    f"{r['stored_s']:.2f} s = {r['readings_per_s']:,.0f} readings/s"
                    if r["stored_s"]
                    else "-- (timeout)"
                )
                + f"; published in {r['publish_s']:.2f} s"
            )

    def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
        done = [r for r in rows if r["readings_per_s"]]
        return max(done, key=lambda r: r["readings_per_s"]) if done else rows[0]

    agent, bare = best(runs["agent"]), best(runs["bare_batcher"])
    ratio = (
        agent["readings_per_s"] / bare["readings_per_s"] if agent["readings_per_s"] and bare["readings_per_s"] else None
    )
    return {
        "messages": messages,
        "machines": machines,
        "per_machine": messages // machines,
        "payload_bytes_mean": sum(len(e.payload) for e in events) / len(events),
        "fleet": fleet.describe(),
        "attempts": attempts,
        "poll_s": POLL_S,
        "agent": agent,
        "bare": bare,
        "runs": runs,
        "ratio_agent_over_bare": ratio,
        # Every attempt of both, not only the best: zero loss and no duplicates must hold each time.
        "all_complete": all(r["complete"] for rows in runs.values() for r in rows),
        "duplicates_max": max(r["duplicates"] for rows in runs.values() for r in rows),
    }
