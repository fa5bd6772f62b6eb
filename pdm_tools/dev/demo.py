"""The end-to-end demo: a real broker, a real InfluxDB, the gateway simulator and the agent, then a summary.

``make demo`` runs ``scripts/demo.py``, which calls ``run_demo``; the end-to-end integration test calls
it too, with a shorter, accelerated scenario. Services given in the environment (``PDM_MQTT_HOST``,
``PDM_MQTT_PORT``, ``PDM_INFLUX_URL``) are used as they are; otherwise Mosquitto and InfluxDB 1.x are
started on free ports in a temporary folder and stopped at the end. The agent and the simulator run as
separate processes (``pdm-agent run`` / ``pdm-agent simulate``), exactly as a user would start them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

from agent import schema
from agent.storage.influx_v1 import InfluxV1Sink
from pdm_tools.dev import services as devservices

REPO = Path(__file__).resolve().parents[2]  # the repository: the demo runs from a checkout (config/, models/)
NS = 1_000_000_000


@dataclass
class ReceivedAlert:
    topic: str
    body: dict

    @property
    def machine(self) -> str:
        return str(self.body["machine"])


@dataclass
class Fault:
    machine: str
    kind: str
    start_ns: int
    end_ns: int | None


@dataclass(frozen=True)
class AdapterScores:
    """How one machine's vibration windows were scored by one path: the base model or its adapter."""

    machine: str
    adapter: str  # "" = the base model
    windows: int
    over_threshold: int

    @property
    def fraction(self) -> float:
        return self.over_threshold / self.windows if self.windows else 0.0


@dataclass
class DemoReport:
    messages_published: int
    messages_received: int
    readings_received: int
    decode_errors: int
    readings_stored: int
    vibration_samples_stored: int
    windows_scored: int
    scores_stored: int
    alerts: list[ReceivedAlert]
    faults: list[Fault]
    matched: dict[str, list[ReceivedAlert]] = field(default_factory=dict)
    false_alerts: list[ReceivedAlert] = field(default_factory=list)
    detection_delay_s: dict[str, float] = field(default_factory=dict)
    agent_exit_code: int | None = None
    scores_by_adapter: list[AdapterScores] = field(default_factory=list)
    """Vibration windows per machine and model path (base or adapter), with adaptation enabled."""

    @property
    def ok(self) -> bool:
        return (
            self.agent_exit_code == 0
            and self.readings_stored == self.readings_received > 0
            and all(self.matched.get(f"{f.machine}:{f.kind}") for f in self.faults)
            and not self.false_alerts
        )

    def render(self) -> str:
        lines = [
            "",
            "=== pdm-agent demo summary ===",
            f"messages published by the simulator : {self.messages_published}",
            f"messages received by the agent      : {self.messages_received} ({self.decode_errors} rejected)",
            f"process readings received           : {self.readings_received}",
            f"process readings stored (InfluxQL)  : {self.readings_stored}",
            f"raw vibration samples stored        : {self.vibration_samples_stored}",
            f"windows scored (agent counter)      : {self.windows_scored}",
            f"scores stored (InfluxQL)            : {self.scores_stored}",
            f"alerts received by a subscriber     : {len(self.alerts)}",
        ]
        for alert in self.alerts:
            b = alert.body
            defect = b.get("defect")
            verdict = f", defect {defect['defect']} (p={defect['probability']:.2f})" if defect else ""
            lines.append(
                f"  - {b['state']:<6} {b['reason']:<12} {b['machine']}/{b['sensor']} {b['severity']} "
                f"score {b['score']:.3g} (threshold "
                f"{b['threshold']:.3g}, {b['model']['id']} {b['model']['version']}){verdict}, "
                f"window ends {b['window']['end']}"
            )
        lines.append("injected faults:")
        for f in self.faults:
            key = f"{f.machine}:{f.kind}"
            hits = self.matched.get(key, [])
            delay = self.detection_delay_s.get(key)
            verdict = f"ALERTED ({len(hits)} alert(s), first {delay:.1f} s after onset)" if hits else "MISSED"
            lines.append(f"  - {f.machine} {f.kind}: {verdict}")
        lines.append(f"alerts on healthy machines         : {len(self.false_alerts)}")
        if self.scores_by_adapter:
            lines.append("vibration windows over the threshold, by machine and model path:")
            for row in self.scores_by_adapter:
                path = f"adapter {row.adapter}" if row.adapter else "base model"
                lines.append(
                    f"  - {row.machine} {path:<28}: {row.over_threshold:>4} of {row.windows:>4} "
                    f"({100 * row.fraction:.1f} %)"
                )
        if not self.scores_by_adapter:  # the adaptation demo judges its own result
            lines.append(f"result                             : {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


class _Listener:
    """A separate MQTT subscriber: alerts, the agent's status and heartbeat, as an alert consumer sees them."""

    def __init__(self, host: str, port: int, agent_id: str) -> None:
        self.alerts: list[ReceivedAlert] = []
        self.heartbeat: dict = {}
        self.online = threading.Event()
        self._base = f"pdm/{agent_id}"
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-listener-{os.getpid()}")
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason_code: object, properties: object
    ) -> None:
        client.subscribe([(f"{self._base}/alerts/#", 1), (f"{self._base}/status", 1), (f"{self._base}/heartbeat", 1)])

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        if "/alerts/" in msg.topic:
            self.alerts.append(ReceivedAlert(msg.topic, body))
        elif msg.topic.endswith("/heartbeat"):
            self.heartbeat = body
        elif msg.topic.endswith("/status") and body.get("state") == "online":
            self.online.set()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@contextmanager
def _services(workdir: Path) -> Iterator[tuple[str, int, str]]:
    """(mqtt host, mqtt port, influx url): from the environment, or started here and stopped after."""
    with ExitStack() as stack:
        host = os.environ.get("PDM_MQTT_HOST")
        if host:
            port = int(os.environ.get("PDM_MQTT_PORT", "1883"))
        else:
            broker = devservices.start_mosquitto(workdir / "mosquitto")
            stack.callback(broker.stop)
            host, port = broker.host, broker.port
        url = os.environ.get("PDM_INFLUX_URL")
        if not url:
            influx = devservices.start_influxdb_v1(workdir / "influxdb")
            stack.callback(influx.stop)
            url = influx.url
        yield host, port, url


def _agent_config(
    path: Path, host: str, port: int, url: str, database: str, workdir: Path, overrides: Mapping[str, object]
) -> str:
    data = yaml.safe_load((REPO / "config" / "agent.yaml").read_text())
    data.update(overrides)
    agent_id = f"demo-{os.getpid()}"
    data["agent"].update(id=agent_id, heartbeat_s=2, log_level="INFO")
    data["health"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    data["mqtt"].update(host=host, port=port)
    data["storage"].update(url=url, flush_interval_s=0.5)
    data["storage"]["v1"]["database"] = database
    data["spool"]["path"] = str(workdir / "spool.db")
    # The copy lives in the work dir: make the example's relative model paths absolute.
    for model in [*data["inference"]["models"], data["inference"]["defect"]]:
        model["path"] = str((REPO / "config" / model["path"]).resolve())
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return agent_id


def _count(sink: InfluxV1Sink, query: str) -> int:
    rows = sink.query(query)
    total = 0
    for series in rows:
        for values in series.get("values", []):
            total += int(values[1] or 0)
    return total


def run_demo(
    duration_s: float = 60.0,
    speed: float = 1.0,
    simulator_config: Path = REPO / "config" / "simulator.yaml",
    workdir: Path | None = None,
    log: Callable[[str], None] = print,
    agent_overrides: Mapping[str, Mapping[str, object]] | None = None,
) -> DemoReport:
    """Run the whole scenario and return what was measured (the caller prints ``report.render()``).

    ``agent_overrides``: sections of the agent's config replaced on top of ``config/agent.yaml``.
    """
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pdm-demo-")))
        host, port, url = stack.enter_context(_services(workdir))
        database = f"pdm_demo_{os.getpid()}"
        config_path = workdir / "agent.yaml"
        agent_id = _agent_config(config_path, host, port, url, database, workdir, agent_overrides or {})
        log(f"demo: broker mqtt://{host}:{port}, InfluxDB {url} database {database}, work dir {workdir}")

        listener = _Listener(host, port, agent_id)
        stack.callback(listener.close)
        agent_log = (workdir / "agent.log").open("w")
        stack.callback(agent_log.close)
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config_path)],
            stdout=agent_log,
            stderr=subprocess.STDOUT,
        )
        stack.callback(_kill_if_running, agent)
        if not listener.online.wait(60):
            raise RuntimeError(f"the agent did not come online; see {workdir / 'agent.log'}")
        log("demo: agent online; starting the gateway simulator")

        truth = workdir / "ground_truth.jsonl"
        sim = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "simulate",
                "--config",
                str(simulator_config),
                "--host",
                host,
                "--port",
                str(port),
                "--duration",
                str(duration_s),
                "--speed",
                str(speed),
                "--ground-truth",
                str(truth),
                "--stats-json",
                str(workdir / "simulator_stats.json"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if sim.returncode != 0:
            raise RuntimeError(f"simulator failed ({sim.returncode}): {sim.stderr[-2000:]}")
        stats = json.loads((workdir / "simulator_stats.json").read_text())
        log(f"demo: simulator done, {stats['messages']} messages published; stopping the agent")

        _wait_until_drained(listener, stats["messages"], timeout_s=60)
        agent.send_signal(signal.SIGTERM)
        exit_code = agent.wait(60)
        time.sleep(0.5)  # the final heartbeat is retained; give the listener a moment to receive it

        fields = listener.heartbeat.get("fields", {})  # heartbeat v2: flat, counters summed over their labels
        sink = InfluxV1Sink(
            url=url, database=database, retention_policy=None, username=None, password=None, timeout_s=30
        )
        report = DemoReport(
            messages_published=int(stats["messages"]),
            messages_received=int(fields.get("ingest_messages", 0)),
            readings_received=int(fields.get("ingest_readings", 0)),
            decode_errors=int(fields.get("decode_errors", 0)),
            readings_stored=_count(sink, f'SELECT count("seq") FROM "{schema.READING}"'),
            vibration_samples_stored=_count(
                sink, f'SELECT count("{schema.VIBRATION_FIELD}") FROM "{schema.VIBRATION}"'
            ),
            windows_scored=int(fields.get("windows_scored", 0)),
            scores_stored=_count(sink, f'SELECT count("{schema.SCORE_FIELD}") FROM "{schema.SCORE}"'),
            alerts=list(listener.alerts),
            faults=_read_truth(truth),
            agent_exit_code=exit_code,
        )
        _match(report)
        if (agent_overrides or {}).get("adaptation"):
            report.scores_by_adapter = _scores_by_adapter(sink)
        if not report.ok:
            log(f"demo: agent log tail:\n{(workdir / 'agent.log').read_text()[-3000:]}")
        return report
    raise AssertionError("unreachable")


def _scores_by_adapter(sink: InfluxV1Sink) -> list[AdapterScores]:
    """Vibration windows over and under their threshold, per machine and per model path (base or adapter)."""
    rows = sink.query(
        f'SELECT "{schema.SCORE_FIELD}", "{schema.THRESHOLD_FIELD}" FROM "{schema.SCORE}" '
        f'WHERE "sensor" = \'vibration\' GROUP BY "machine", "{schema.TAG_ADAPTER}"'
    )
    out = []
    for series in rows:
        tags = series.get("tags", {})
        values = series.get("values", [])
        over = sum(1 for _, score, threshold in values if score > threshold)
        out.append(AdapterScores(tags.get("machine", ""), tags.get(schema.TAG_ADAPTER, ""), len(values), over))
    return sorted(out, key=lambda a: (a.machine, a.adapter != "", a.adapter))


def _kill_if_running(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def _wait_until_drained(listener: _Listener, published: int, timeout_s: float) -> None:
    """Until the agent's heartbeat shows it received everything and its spool is empty."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = listener.heartbeat.get("fields", {})
        if fields.get("ingest_messages", 0) >= published and fields.get("spool_depth", 1) == 0:
            return
        time.sleep(0.5)


def _read_truth(path: Path) -> list[Fault]:
    faults = []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            faults.append(Fault(d["machine"], d["kind"], int(d["start_ns"]), d.get("end_ns")))
    return faults


def _parse_time(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * NS)


def _match(report: DemoReport) -> None:
    """An alert matches a fault of its machine when its window ends after the fault's onset."""
    for alert in report.alerts:
        if alert.body["state"] != "new":
            continue
        end_ns = _parse_time(alert.body["window"]["end"])
        hit = next(
            (
                f
                for f in report.faults
                if f.machine == alert.machine
                and end_ns >= f.start_ns
                and (f.end_ns is None or _parse_time(alert.body["window"]["start"]) <= f.end_ns + 30 * NS)
            ),
            None,
        )
        if hit is None:
            report.false_alerts.append(alert)
            continue
        key = f"{hit.machine}:{hit.kind}"
        report.matched.setdefault(key, []).append(alert)
        delay = (end_ns - hit.start_ns) / NS
        report.detection_delay_s[key] = min(report.detection_delay_s.get(key, delay), delay)
