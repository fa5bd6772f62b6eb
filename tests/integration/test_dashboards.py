"""Every Grafana panel query runs against a real InfluxDB 1.6.7 filled by the simulator and the agent.

The scenario is the demo's, short and accelerated: three machines, an outer-race defect on m02 from 10 s
(so there are anomalous windows, an alert, defect classifications and raw vibration around the alert),
a few malformed messages (so the error counters exist), and the agent's heartbeat every second (so the
self-metrics have enough points for rates). The agent runs in-process, built by the composition root
from ``config/agent.yaml``; the simulator runs as ``pdm-agent simulate``, as a user starts it.

Each query of the dashboards (panel targets, annotations, template variables) is one test case: Grafana's
macros and variables are substituted as Grafana does it (``render``), the query runs, and an error or an
empty answer fails the case — a panel that would show "No data" on a healthy installation is a bug. The
names each query uses are checked against ``agent/schema.py`` by ``tests/unit/test_dashboards_json.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml

from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.storage.influx_v1 import InfluxV1Sink
from pdm_tools.dev.services import Service

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "dashboards" / "json"
NS = 1_000_000_000

SIM_DURATION_S = 36.0
SIM_SPEED = 2.0
SCENARIO = """\
machines: {count: 3}
seed: 11
faults:
  - {machine: m02, kind: bearing_outer, start_s: 10, severity: 1.0}
"""
# Malformed payloads published before the simulator starts: they must show on the errors panel.
BAD_PAYLOADS = (b"{not json", b'{"v": 1, "value": "NaN"}')
CAMERA_IMAGES = 12  # from `pdm-agent simulate camera`, for the inspection panel
INTERVAL = "5s"  # $__interval: a few points per panel over this short run (the datasource's minimum is 1s)
# The machine a user opens in the machine detail dashboard: the one with the fault (the saved default is the
# first machine, whose healthy windows have no defect class, raw vibration or alert to show).
CHOSEN = {"machine": ["m02"]}


@dataclass(frozen=True)
class TimeRange:
    """An absolute dashboard time range, in epoch nanoseconds."""

    start_ns: int
    end_ns: int

    def time_filter(self) -> str:
        """``$timeFilter`` as Grafana renders an absolute range (milliseconds)."""
        return f"time >= {self.start_ns // 1_000_000}ms and time <= {self.end_ns // 1_000_000}ms"


@dataclass(frozen=True)
class DashboardQuery:
    """One InfluxQL query of a dashboard: a panel target, an annotation or a template variable."""

    dashboard: dict[str, Any]
    where: str
    """E.g. ``panel 3 "Anomaly score" target A``."""
    query: str

    @property
    def id(self) -> str:
        return f"{self.dashboard['uid']}: {self.where}"


def load_dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # the panels of a collapsed row


def all_queries(dashboards: list[dict[str, Any]]) -> list[DashboardQuery]:
    out: list[DashboardQuery] = []
    for d in dashboards:
        for var in d.get("templating", {}).get("list", []):
            if var["type"] == "query":
                out.append(DashboardQuery(d, f"variable ${var['name']}", _query_text(var["query"])))
        for ann in d.get("annotations", {}).get("list", []):
            if ann.get("datasource", {}).get("type") == "influxdb":
                out.append(DashboardQuery(d, f"annotation {ann['name']!r}", ann.get("query") or ann["target"]["query"]))
        for panel in _panels(d.get("panels", [])):
            for target in panel.get("targets", []):
                where = f"panel {panel['id']} {panel.get('title', '')!r} target {target['refId']}"
                out.append(DashboardQuery(d, where, target["query"]))
    return out


def _query_text(query: str | dict[str, Any]) -> str:
    return query if isinstance(query, str) else str(query["query"])


# --- Grafana's interpolation (public/app/plugins/datasource/influxdb, Grafana 10/11) ---------------------

_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|{}\[\]/]")


def _regex_escape(value: str) -> str:
    """Grafana's ``escapeRegex`` for values interpolated into an InfluxQL regex."""
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


def _format(values: list[str], var: dict[str, Any]) -> str:
    """A variable's value in a query: raw if single-valued, else regex-escaped, several as ``(a|b)``."""
    if not var.get("multi") and not var.get("includeAll"):
        return values[0]
    escaped = [_regex_escape(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def _options(rows: list[dict[str, Any]], query: str, regex: str) -> list[str]:
    """The values a variable query offers: column ``value`` of SHOW TAG VALUES, else the first column."""
    column = 1 if query.lower().lstrip().startswith("show tag values") else 0
    values = sorted({str(v[column]) for s in rows for v in s.get("values", [])})
    if regex:
        pattern = re.compile(regex[1:-1] if regex.startswith("/") and regex.endswith("/") else regex)
        values = [v for v in values if pattern.search(v)]
    return values


def _substitute(query: str, values: dict[str, str], time_range: TimeRange, interval: str) -> str:
    query = query.replace("$timeFilter", time_range.time_filter())
    query = query.replace("$__interval_ms", str(_duration_ms(interval))).replace("$__interval", interval)
    for name in sorted(values, key=len, reverse=True):
        value = values[name]
        query = query.replace(f"${{{name}}}", value).replace(f"[[{name}]]", value)
        query = value.join(re.split(rf"\${re.escape(name)}\b", query))
    return query


def _duration_ms(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[unit]


def variable_values(
    dashboard: dict[str, Any],
    time_range: TimeRange,
    interval: str,
    run: Callable[[str], list[dict[str, Any]]],
    chosen: Mapping[str, list[str]],
) -> dict[str, str]:
    """Each template variable's interpolated value, as the dashboard loads with its saved selections.

    Variables are resolved in order (a variable's query may use the ones before it). ``chosen`` overrides
    a saved selection (what a user picks); without either, the first option (Grafana's behaviour). A
    selection the database does not offer fails: Grafana would silently show something else.
    """
    values: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            query = _substitute(_query_text(var["query"]), values, time_range, interval)
            options = _options(run(query), query, var.get("regex", ""))
        elif var["type"] in ("custom", "constant", "interval"):
            options = [o["value"] for o in var.get("options", [])] or [str(var["query"])]
        else:
            continue
        assert options, f"variable ${var['name']} offers nothing"
        current = chosen.get(var["name"]) or var.get("current", {}).get("value") or options[:1]
        selected = current if isinstance(current, list) else [current]
        if "$__all" in selected:
            selected = options
        missing = [v for v in selected if v not in options]
        assert not missing, f"variable ${var['name']}: saved selection {missing} not among {options}"
        values[var["name"]] = _format(selected, var)
    return values


def render(
    query: DashboardQuery,
    time_range: TimeRange,
    interval: str,
    run: Callable[[str], list[dict[str, Any]]],
    chosen: Mapping[str, list[str]],
) -> str:
    """The InfluxQL Grafana sends for ``query`` on the dashboard as saved (or ``chosen``), over ``time_range``."""
    values = variable_values(query.dashboard, time_range, interval, run, chosen)
    return _substitute(query.query, values, time_range, interval)


@dataclass(frozen=True)
class Filled:
    sink: InfluxV1Sink
    time_range: TimeRange


def _image_model(workdir: Path) -> Path:
    """A tiny seeded image classifier of the shipped contract (the inspection panel needs classified images)."""
    from agent.images.preprocess import ImageSpec
    from pdm_tools.datasets.neu import CLASS_NAMES
    from pdm_tools.images.cnn import Cnn
    from pdm_tools.images.export import write_model_dir

    model_dir = workdir / "surface_defect"
    net = Cnn.init((4, 8), len(CLASS_NAMES), seed=2)
    write_model_dir(net.to_onnx(32, CLASS_NAMES), model_dir, ImageSpec(32), CLASS_NAMES)
    return model_dir


def _agent_config(mosquitto: Service, influx: Service, database: str, workdir: Path, agent_id: str):
    data = yaml.safe_load((REPO / "config" / "agent.yaml").read_text())
    data["camera"].update(enabled=True, model={"type": "image-classifier", "path": str(_image_model(workdir))})
    data["agent"].update(id=agent_id, heartbeat_s=1)
    data["mqtt"].update(host=mosquitto.host, port=mosquitto.port)
    data["storage"].update(url=influx.url, flush_interval_s=0.2)
    data["storage"]["v1"]["database"] = database
    data["spool"]["path"] = str(workdir / "spool.db")
    return parse_config(data, base_dir=REPO / "config", environ={})


def _publish_bad_payloads(mosquitto: Service) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dashboards-bad-{uuid.uuid4().hex[:6]}")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        for payload in BAD_PAYLOADS:
            client.publish("factory/site1/line1/m01/process", payload, qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def fill(mosquitto: Service, influx: Service, database: str, workdir: Path) -> Filled:
    """Run the agent and the simulator until InfluxDB holds everything; the time range that covers it."""
    agent_id = f"dash-{uuid.uuid4().hex[:8]}"
    began_ns = time.time_ns()
    agent = build_agent(_agent_config(mosquitto, influx, database, workdir, agent_id))
    agent.start()
    try:
        assert agent.mqtt.wait_subscribed(30), "the agent did not subscribe"
        _publish_bad_payloads(mosquitto)
        scenario = workdir / "simulator.yaml"
        scenario.write_text(SCENARIO)
        stats_path = workdir / "simulator_stats.json"
        sim = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "simulate",
                "--config",
                str(scenario),
                "--host",
                mosquitto.host,
                "--port",
                str(mosquitto.port),
                "--duration",
                str(SIM_DURATION_S),
                "--speed",
                str(SIM_SPEED),
                "--stats-json",
                str(stats_path),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert sim.returncode == 0, sim.stderr[-2000:]
        camera = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "simulate",
                "camera",
                "--host",
                mosquitto.host,
                "--port",
                str(mosquitto.port),
                "--count",
                str(CAMERA_IMAGES),
                "--rate",
                "50",
                "--size",
                "64",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert camera.returncode == 0, camera.stderr[-2000:]
        expected = json.loads(stats_path.read_text())["messages"] + len(BAD_PAYLOADS) + CAMERA_IMAGES
        deadline = time.monotonic() + 90
        while agent.metrics.get("ingest.messages") < expected or agent.spool.depth() > 0:
            assert time.monotonic() < deadline, f"the agent did not drain: {agent.summary()}"
            time.sleep(0.5)
        time.sleep(3)  # a few more heartbeats after the last reading
    finally:
        agent.stop()
    # Device time runs ahead of the wall clock at speed > 1: the range ends after the last simulated second.
    end_ns = max(time.time_ns(), began_ns + int(SIM_DURATION_S * NS)) + 60 * NS
    sink = InfluxV1Sink(url=influx.url, database=database, retention_policy=None, username=None, password=None)
    return Filled(sink=sink, time_range=TimeRange(began_ns - 60 * NS, end_ns))


@pytest.fixture(scope="module")
def filled(mosquitto: Service, influxdb_v1: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    database = f"t_dashboards_{uuid.uuid4().hex[:8]}"
    result = fill(mosquitto, influxdb_v1, database, tmp_path_factory.mktemp("dashboards"))
    yield result
    result.sink.close()


DASHBOARDS = load_dashboards()
QUERIES = all_queries(DASHBOARDS)


def test_every_dashboard_has_queries() -> None:
    assert {d["uid"] for d in DASHBOARDS} == {"pdm-fleet-overview", "pdm-machine-detail", "pdm-agent-operations"}
    assert len(QUERIES) >= 20


@pytest.mark.parametrize("query", QUERIES, ids=[q.id for q in QUERIES])
def test_panel_query_returns_data(filled: Filled, query: DashboardQuery) -> None:
    chosen = CHOSEN if query.dashboard["uid"] == "pdm-machine-detail" else {}
    rendered = render(query, filled.time_range, INTERVAL, filled.sink.query, chosen)
    series = filled.sink.query(rendered)
    rows = sum(len(s.get("values", [])) for s in series)
    assert rows > 0, f"{query.id}: no data for\n{rendered}"
