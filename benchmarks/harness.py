"""Benchmark harness: the agent as a subprocess, its heartbeat and alerts, a paced publisher, /proc readings.

The agent runs exactly as a user starts it (``python -m agent run --config FILE``), from a copy of
``config/agent.yaml`` with the broker, database, spool and a short heartbeat filled in; every stage
stays on (decode, spool, windows and features, both anomaly models, the defect classifier, the
commissioning baselines, InfluxDB writes with ``raw_vibration: every_n``, alerts).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import schema
from agent.alerts.rules import AlertRule
from agent.config.loader import load_config
from agent.health.selfmetrics import series_field
from agent.storage.influx_v1 import InfluxV1Sink
from benchmarks.workload import Event

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PERF_TO_EPOCH_NS = time.time_ns() - time.perf_counter_ns()
"""``time.perf_counter()`` (the publisher's and the listener's clock) to the agents' ``time.time_ns()``:
``epoch_ns = perf_s * 1e9 + PERF_TO_EPOCH_NS`` (same machine; the offset drifts by far less than a second)."""


# -- /proc -----------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all threads), from ``/proc/<pid>/stat``."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)


SERVICE_PIDS: dict[str, int] = {}  # name -> pid of the broker and database, for their CPU use


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds of the running child processes of ``pid`` (the agent's writer process)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[1]) == pid:  # ppid
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def cpu_snapshot(agent_pid: int) -> dict[str, float]:
    """CPU seconds of the agent, its child processes and the services, and machine busy/total jiffies."""
    snap = {
        "agent": cpu_seconds(agent_pid),
        "agent_children": children_cpu_seconds(agent_pid),
        "time": time.perf_counter(),
    }
    for name, pid in SERVICE_PIDS.items():
        with contextlib.suppress(OSError):  # the service stopped meanwhile
            snap[name] = cpu_seconds(pid)
    snap["machine_busy"], snap["machine_total"] = machine_cpu()
    return snap


def cpu_usage(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Between two snapshots: % of one core per process, and % of the whole machine busy."""
    wall = max(b["time"] - a["time"], 1e-9)
    out = {f"{k}_cpu_pct": 100 * (b[k] - a[k]) / wall for k in a if k not in ("time", "machine_busy", "machine_total")}
    out["machine_busy_pct"] = (
        100 * (b["machine_busy"] - a["machine_busy"]) / max(b["machine_total"] - a["machine_total"], 1)
    )
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak resident set) of process ``pid`` in kB, from ``/proc/<pid>/status``."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# -- the agent subprocess --------------------------------------------------------------------------------


@dataclass
class ReceivedAlert:
    arrived: float  # time.perf_counter() at arrival in the listener
    topic: str
    body: dict


CONFIG_OVERRIDES: dict[str, Any] = {}
"""Dotted config keys set on top of the shipped ``config/agent.yaml`` for every agent of a run (``run.py --set``,
for A/B experiments; the report lists them: a run with any is not a run of the shipped config)."""


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set each dotted ``key`` (e.g. ``storage.raw_vibration.release_points_s``) of ``data`` in place; a key
    whose parent sections do not exist is refused (a typo must not pass as a measured setting)."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = data
        for name in parents:
            if not isinstance(section.get(name), dict):
                raise KeyError(f"--set {key}: no section {name!r} in config/agent.yaml")
            section = section[name]
        if leaf not in section:
            raise KeyError(f"--set {key}: no key {leaf!r} in config/agent.yaml")
        section[leaf] = value


@dataclass
class AgentProcess:
    """One agent subprocess with its own database, spool and id; ``start``/``stop``; heartbeat counters."""

    workdir: Path
    mqtt_host: str
    mqtt_port: int
    influx_url: str
    name: str
    heartbeat_s: float = 0.5
    raw_vibration: str = "every_n"  # storage.raw_vibration.mode; every_n stores one block in 10
    command: list[str] | None = None  # default: [python, -m, agent]; experiments run a patched agent
    # MQTT 5 session expiry: 0 (the default) ends the session with the connection, so that no agent of the run
    # leaves a session queueing the later phases' messages; > 0 lets ``stop(keep_session=True)`` and ``start``
    # work off what the broker queued meanwhile (the backlog drain), and ``stop()`` then ends the session.
    session_expiry_s: int = 0
    process: subprocess.Popen[bytes] | None = None
    counters: dict[str, float] = field(default_factory=dict)
    counters_at: float = 0.0  # perf_counter() when the last heartbeat arrived
    # The agent's clock (time.time() seconds) when it took the last heartbeat's counters. Rates come from these:
    # a heartbeat can arrive late and bunched with the next ones while the agent works at its limit.
    counters_time_s: float = 0.0
    history: list[tuple[float, float]] = field(default_factory=list)  # (counters_time_s, ingest.messages)
    alerts: list[ReceivedAlert] = field(default_factory=list)
    _online: threading.Event = field(default_factory=threading.Event)
    _started_clock: float = 0.0  # time.time() at the last start: older (retained) heartbeats are not this process's
    _session_open: bool = False  # started with a session expiry, and that session not yet ended
    _heartbeat: threading.Condition = field(default_factory=threading.Condition)
    _client: mqtt.Client | None = None

    @property
    def agent_id(self) -> str:
        return f"bench-{self.name}-{os.getpid()}"

    @property
    def database(self) -> str:
        return f"bench_{self.name}_{os.getpid()}".replace("-", "_")

    @property
    def config(self) -> dict[str, Any]:
        """The config this agent runs with (``write_config``'s document)."""
        return self._config

    @property
    def every_n(self) -> int:
        return int(self._config["storage"]["raw_vibration"]["every_n"])

    def write_config(self) -> Path:
        data = yaml.safe_load((REPO / "config" / "agent.yaml").read_text())
        data["agent"].update(id=self.agent_id, heartbeat_s=self.heartbeat_s, log_level="WARNING")
        data["health"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
        data["mqtt"].update(host=self.mqtt_host, port=self.mqtt_port, session_expiry_s=self.session_expiry_s)
        data["storage"].update(url=self.influx_url)
        data["storage"]["raw_vibration"].update(mode=self.raw_vibration, every_n=10)
        data["storage"]["v1"]["database"] = self.database
        # Each run its own folder: the state files kept beside the spool by default (alert state, commissioning
        # baselines, known field names, remembered subscriptions) would otherwise be shared by every agent of
        # the benchmark and restore one run's open events and fitted baselines into the next.
        data["spool"]["path"] = str(self.workdir / f"run-{self.name}" / "spool.db")
        for model in [*data["inference"]["models"], data["inference"]["defect"]]:
            model["path"] = str((REPO / "config" / model["path"]).resolve())
        apply_overrides(data, CONFIG_OVERRIDES)
        self._config = data
        path = self.workdir / f"agent-{self.name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def alert_rule(self, alert_type: str) -> AlertRule:
        """The alert rule of ``alert_type`` in the config this agent runs with (loaded as the agent loads it)."""
        return load_config(self.write_config()).alerts.rulebook().rule(alert_type)

    def feature_spec(self, model_id: str) -> dict:
        """The ``feature_spec`` of the configured model ``model_id`` (window and hop in samples)."""
        self.write_config()
        for model in self._config["inference"]["models"]:
            manifest = json.loads((Path(model["path"]) / "manifest.json").read_text())
            if manifest["model_id"] == model_id:
                return dict(manifest["feature_spec"])
        raise KeyError(f"no configured model has id {model_id!r}")

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the agent process (again, after ``stop``: same config, spool and id; its counters start at 0)."""
        config = self.write_config()
        self._online.clear()
        with self._heartbeat:
            self.counters, self.counters_at, self.counters_time_s = {}, 0.0, 0.0
            self._started_clock = time.time()
        self._session_open = self.session_expiry_s > 0
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-listener-{self.name}-{os.getpid()}")
        client.on_connect = lambda c, *_: c.subscribe(f"pdm/{self.agent_id}/#", qos=1)
        client.on_message = self._on_message
        client.connect(self.mqtt_host, self.mqtt_port)
        client.loop_start()
        self._client = client
        self._log = (self.workdir / f"agent-{self.name}.log").open("a")
        self.process = subprocess.Popen(
            [*(self.command or [sys.executable, "-m", "agent"]), "run", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        if not self._online.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"agent {self.name} did not come online; see {self._log.name}")
        # The status is published on CONNACK, the subscription follows: let it be granted.
        self.wait_heartbeat(timeout_s=5)
        time.sleep(0.3)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if "/alerts/" in msg.topic:
            self.alerts.append(ReceivedAlert(now, msg.topic, json.loads(msg.payload)))
        elif msg.topic.endswith("/heartbeat"):
            with self._heartbeat:
                beat = json.loads(msg.payload)
                if beat["time_ns"] / 1e9 < self._started_clock:
                    return  # the retained heartbeat of an earlier process of this agent (before a restart)
                self.counters = beat.get("fields", {})  # heartbeat v2: flat fields
                self.counters_at = now
                self.counters_time_s = beat["time_ns"] / 1e9
                self.history.append(
                    (self.counters_time_s, float(self.counters.get(series_field("ingest.messages"), 0.0)))
                )
                self._heartbeat.notify_all()
        elif msg.topic.endswith("/status") and b'"online"' in msg.payload:
            self._online.set()

    def wait_heartbeat(self, timeout_s: float) -> dict[str, float]:
        """The counters of the next heartbeat (or the last ones after ``timeout_s``)."""
        with self._heartbeat:
            seen = self.counters_at
            self._heartbeat.wait_for(lambda: self.counters_at > seen, timeout_s)
            return dict(self.counters)

    def counter(self, name: str) -> float:
        """The last heartbeat's ``name`` (a counter summed over its labels) or ``name{label=value}``."""
        return float(self.counters.get(series_field(name), 0.0))

    def wait_caught_up(self, messages: int, timeout_s: float, spool_below: int = 5000) -> float | None:
        """Seconds until the agent received ``messages`` and its spool is below ``spool_below`` lines."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            self.wait_heartbeat(timeout_s=2 * self.heartbeat_s + 1)
            if self.counter("ingest.messages") >= messages and self.counter("spool.depth") < spool_below:
                return time.perf_counter() - started
        return None

    def cpu_s(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    def memory_kb(self) -> dict[str, int]:
        assert self.process is not None
        return memory_kb(self.process.pid)

    def stop(self, timeout_s: float = 60.0, keep_session: bool = False) -> int | None:
        """SIGTERM (the agent drains and flushes its spool), wait; returns the exit code. With a session expiry,
        the broker's session of the agent ends too unless ``keep_session`` (it then queues for the next start)."""
        code = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait(10)
        elif self.process is not None:
            code = self.process.returncode
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
            self._client = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
        if self._session_open and not keep_session:
            try:
                self.end_session()
            except (OSError, RuntimeError) as exc:  # not to hide why the run is stopping (the broker may be gone)
                print(
                    f"could not end the MQTT session of agent {self.name} ({exc}); the broker keeps it for "
                    f"{self.session_expiry_s} s",
                    file=sys.stderr,
                )
        return code

    def end_session(self) -> None:
        """End the agent's MQTT session at the broker (and what it queued): a clean start with its client id and
        no expiry, then a disconnect."""
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"pdm-agent-{self.agent_id}", protocol=mqtt.MQTTv5
        )
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0
        client.connect(self.mqtt_host, self.mqtt_port, clean_start=True, properties=properties)
        client.loop_start()
        try:
            deadline = time.monotonic() + 10
            while not client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not client.is_connected():
                raise RuntimeError(f"could not connect as the agent {self.name} to end its session")
            self._session_open = False
        finally:
            client.disconnect()
            client.loop_stop()

    def stored(self) -> dict[str, int]:
        """Readings (process points) and raw vibration samples the agent stored in InfluxDB."""
        sink = InfluxV1Sink(self.influx_url, self.database, None, None, None, timeout_s=120)
        try:
            return {
                "readings": _count(sink, f'SELECT count("seq") FROM "{schema.READING}"'),
                "samples": _count(sink, f'SELECT count("{schema.VIBRATION_FIELD}") FROM "{schema.VIBRATION}"'),
            }
        finally:
            sink.close()

    def log_tail(self, chars: int = 2000) -> str:
        path = self.workdir / f"agent-{self.name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _count(sink: InfluxV1Sink, query: str) -> int:
    total = 0
    for series in sink.query(query):
        for values in series.get("values", []):
            total += int(values[1] or 0)
    return total


# -- publisher and bare subscriber ------------------------------------------------------------------------


class Publisher:
    """A fast paho publisher (MQTT 3.1.1, QoS 1, up to 1000 messages in flight)."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"bench-pub-{name}-{os.getpid()}",
            protocol=mqtt.MQTTv311,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect(host, port, keepalive=60)
        self.client.loop_start()
        self.published = 0

    def publish(self, events: list[Event], speed: float | None, sent_at: dict | None = None) -> float:
        """Publish ``events`` at ``t_s / speed`` (None: as fast as possible); returns the wall seconds taken.

        ``sent_at`` receives ``perf_counter()`` just before each vibration block's publish, by ``(j, k)``.
        Returns once the broker acknowledged every message.
        """
        start = time.perf_counter()
        info = None
        for event in events:
            if speed is not None:
                ahead = start + event.t_s / speed - time.perf_counter()
                if ahead > 0.002:
                    time.sleep(ahead)
            if sent_at is not None and event.block is not None:
                sent_at[event.block] = time.perf_counter()
            info = self.client.publish(event.topic, event.payload, qos=1)
        if info is not None:
            info.wait_for_publish(120)
        self.published += len(events)
        return time.perf_counter() - start

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class BareSubscriber:
    """A paho subscriber (MQTT 5, QoS 1, automatic acknowledgement) that only counts and timestamps."""

    def __init__(self, host: str, port: int, topic: str = "factory/#", persistent: bool = False) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self._subscribed = threading.Event()
        suffix = "backlog" if persistent else "live"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{suffix}-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        properties = None
        if persistent:
            # The broker keeps the session, and queues QoS 1 messages, while the client is away.
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 600
        self.client.connect(host, port, clean_start=not persistent, properties=properties)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("bare subscriber: no SUBACK")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if self.count == 0:
            self.first = now
        self.count += 1
        self.last = now

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.count < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.count >= count

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
