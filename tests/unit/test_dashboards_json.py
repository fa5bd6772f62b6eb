"""The Grafana provisioning files and dashboards are well formed and name only what ``agent.schema`` defines.

No service is needed: the JSON structure is checked (unique panel ids, the provisioned datasource uid on
every panel, target, variable and annotation, a grid position that fits and overlaps no other panel), and
every InfluxQL query is parsed for the measurements, fields and tags it names. Whether each query returns
data is checked against a filled InfluxDB by ``tests/integration/test_dashboards.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import schema
from agent.decode.topic import TopicTemplate

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
DATASOURCE_FILE = DASHBOARDS / "provisioning" / "datasources" / "influxdb.yaml"
PROVIDER_FILE = DASHBOARDS / "provisioning" / "dashboards" / "pdm.yaml"
JSON_FILES = sorted((DASHBOARDS / "json").glob("*.json"))
GRAFANA_MACROS = {"timeFilter", "__interval", "__interval_ms"}

# Source tags: the names in braces of the default topic template (config/agent.yaml).
SOURCE_TAGS = set(TopicTemplate("factory/{site}/{line}/{machine}/{sensor}").names)
MODEL_TAGS = {schema.TAG_MODEL_ID, schema.TAG_MODEL_VERSION}


@dataclass(frozen=True)
class Names:
    """What one measurement may be queried for: its fields, field-name prefixes and tags (from the schema)."""

    fields: frozenset[str]
    tags: frozenset[str]
    prefixes: tuple[str, ...] = ()
    data_fields: bool = False
    """Fields named by the data (reading values, feature names): selected through a SHOW FIELD KEYS variable."""


SCHEMA: dict[str, Names] = {
    schema.READING: Names(frozenset({schema.READING_SEQ_FIELD}), frozenset(SOURCE_TAGS), data_fields=True),
    schema.VIBRATION: Names(frozenset({schema.VIBRATION_FIELD}), frozenset(SOURCE_TAGS | {schema.TAG_CHANNEL})),
    schema.FEATURES: Names(frozenset(), frozenset(SOURCE_TAGS | MODEL_TAGS), data_fields=True),
    schema.SCORE: Names(
        frozenset({schema.SCORE_FIELD, schema.THRESHOLD_FIELD, schema.ANOMALOUS_FIELD, schema.WINDOW_START_FIELD}),
        frozenset(SOURCE_TAGS | MODEL_TAGS),
    ),
    schema.DEFECT: Names(
        frozenset({schema.DEFECT_PROBABILITY_FIELD}),
        frozenset(SOURCE_TAGS | MODEL_TAGS | {schema.DEFECT_CLASS_TAG}),
        prefixes=(schema.DEFECT_PROBABILITY_PREFIX,),
    ),
    schema.INSPECTION: Names(
        frozenset({schema.DEFECT_PROBABILITY_FIELD, schema.IMAGE_SHA256_FIELD, schema.INSPECTION_DEFECT_FIELD}),
        frozenset(SOURCE_TAGS | MODEL_TAGS | {schema.INSPECTION_CLASS_TAG}),
        prefixes=(schema.DEFECT_PROBABILITY_PREFIX,),
    ),
    schema.ALERT: Names(
        frozenset(
            {
                schema.ALERT_SCORE_FIELD,
                schema.ALERT_THRESHOLD_FIELD,
                schema.ALERT_EVENT_FIELD,
                schema.ALERT_SEQ_FIELD,
                schema.ALERT_ACTIVE_FIELD,
                schema.ALERT_DEFECT_FIELD,
                schema.ALERT_ACKED_FIELD,
                schema.ALERT_SILENCED_FIELD,
                schema.ALERT_FLAPPING_FIELD,
            }
        ),
        frozenset(
            SOURCE_TAGS | MODEL_TAGS | {schema.ALERT_STATE_TAG, schema.ALERT_TYPE_TAG, schema.ALERT_SEVERITY_TAG}
        ),
    ),
    schema.ALERT_COMMAND: Names(
        frozenset({schema.COMMAND_BY_FIELD, schema.COMMAND_DETAIL_FIELD}),
        frozenset(SOURCE_TAGS | {schema.COMMAND_TAG, schema.COMMAND_RESULT_TAG}),
    ),
    schema.AGENT: Names(
        frozenset(schema.AGENT_FIELDS), frozenset({schema.TAG_AGENT_ID}), prefixes=schema.AGENT_FIELD_PREFIXES
    ),
}


def _datasource_uid() -> str:
    config = yaml.safe_load(DATASOURCE_FILE.read_text())
    (source,) = config["datasources"]
    return str(source["uid"])


def _code(path: Path) -> str:
    """A YAML or env file without its comments."""
    return "\n".join(line.split("#", 1)[0].strip() for line in path.read_text().splitlines())


def _load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))


@dataclass(frozen=True)
class Query:
    dashboard: dict[str, Any]
    where: str
    text: str


def _queries(dashboard: dict[str, Any]) -> list[Query]:
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            text = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            out.append(Query(dashboard, f"variable ${var['name']}", text))
    for ann in dashboard.get("annotations", {}).get("list", []):
        if ann.get("datasource", {}).get("type") == "influxdb":
            out.append(Query(dashboard, f"annotation {ann['name']!r}", ann.get("query") or ann["target"]["query"]))
    for panel in _all_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            out.append(
                Query(dashboard, f"panel {panel['id']} {panel.get('title')!r} {target['refId']}", target["query"])
            )
    return out


ALL = [_load(path) for path in JSON_FILES]
QUERIES = [q for d in ALL for q in _queries(d)]


def _qid(q: Query) -> str:
    return f"{q.dashboard['uid']}: {q.where}"


# --- InfluxQL names ----------------------------------------------------------------------------------------


@dataclass
class Statement:
    """The names one SELECT (or SHOW) statement uses, its subqueries resolved separately."""

    source: str | None
    """Measurement name, or None when reading from a subquery."""
    names: list[str] = field(default_factory=list)
    """Quoted identifiers used as fields or tags (SELECT, WHERE, GROUP BY)."""
    field_regexes: list[str] = field(default_factory=list)
    aliases: set[str] = field(default_factory=set)
    group_tags: list[str] = field(default_factory=list)
    subqueries: list[Statement] = field(default_factory=list)


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_REGEX = re.compile(r"/((?:[^/\\]|\\.)*)/")
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'")


def _innermost_subquery(text: str) -> tuple[int, int] | None:
    """(start, end) of the first ``(SELECT ...)`` that contains no other subquery."""
    for match in re.finditer(r"\(\s*SELECT\b", text, flags=re.IGNORECASE):
        depth = 0
        for i in range(match.start(), len(text)):
            if text[i] == "(":
                depth += 1
            elif text[i] == ")":
                depth -= 1
                if depth == 0:
                    inner = text[match.start() + 1 : i]
                    if not re.search(r"\(\s*SELECT\b", inner, flags=re.IGNORECASE):
                        return match.start(), i + 1
                    break
    return None


def parse(text: str, subs: list[Statement] | None = None) -> Statement:
    """The names of an InfluxQL statement (the dashboards' dialect: every name double-quoted).

    Subqueries are parsed innermost first and replaced by a placeholder that indexes ``subs``.
    """
    text = text.replace("$timeFilter", "time > 0").replace("$__interval_ms", "1000").replace("$__interval", "1s")
    subs = [] if subs is None else subs
    while (span := _innermost_subquery(text)) is not None:
        subs.append(parse(text[span[0] + 1 : span[1] - 1], subs))
        text = f"{text[: span[0]]}__SUBQUERY_{len(subs) - 1}__{text[span[1] :]}"
    show = re.match(r'\s*SHOW\s+(TAG VALUES|FIELD KEYS)\s+FROM\s+"([^"]+)"(.*)', text, flags=re.IGNORECASE | re.S)
    if show:
        statement = Statement(source=show.group(2))
        rest = _STRING.sub("''", show.group(3))
        key = re.match(r'\s*WITH KEY\s*=\s*"([^"]+)"(.*)', rest, flags=re.IGNORECASE | re.S)
        if key:
            statement.group_tags.append(key.group(1))
            rest = key.group(2)
        statement.names += _where_names(rest)
        return statement
    select = re.match(r"\s*SELECT\s+(.*?)\s+FROM\s+(\S+)(.*)", text, flags=re.IGNORECASE | re.S)
    assert select, f"not a SELECT or SHOW statement: {text}"
    columns, source, rest = select.groups()
    sub = re.fullmatch(r"__SUBQUERY_(\d+)__", source)
    statement = Statement(source=None if sub else _unquote(source))
    if sub:
        statement.subqueries.append(subs[int(sub.group(1))])
    for alias in re.findall(r'\bAS\s+"([^"]+)"', columns, flags=re.IGNORECASE):
        statement.aliases.add(alias)
    columns = re.sub(r'\bAS\s+"[^"]+"', "", columns, flags=re.IGNORECASE)
    statement.field_regexes += _REGEX.findall(columns)
    statement.names += _QUOTED.findall(_REGEX.sub("", columns))
    group = re.search(r"\bGROUP BY\b(.*?)(\bfill\(|\bORDER BY\b|\bLIMIT\b|$)", rest, flags=re.IGNORECASE | re.S)
    if group:
        statement.group_tags += _QUOTED.findall(group.group(1))
        rest = rest[: group.start()]
    statement.names += _where_names(re.split(r"\bORDER BY\b|\bLIMIT\b", rest, flags=re.IGNORECASE)[0])
    return statement


def _unquote(name: str) -> str:
    return name[1:-1] if name.startswith('"') and name.endswith('"') else name


def _where_names(where: str) -> list[str]:
    """Quoted names on the left of a comparison (values are single-quoted strings or /regexes/)."""
    where = _REGEX.sub("//", _STRING.sub("''", where))
    return _QUOTED.findall(where)


def check_names(statement: Statement, variables: dict[str, dict[str, Any]]) -> list[str]:
    """Problems with the names a statement uses; empty when they are all in the schema."""
    problems: list[str] = []
    for sub in statement.subqueries:
        problems += check_names(sub, variables)
    if statement.source is None:
        # Reading a subquery: its output columns are its aliases, its plain selected names and its GROUP BY tags.
        available = set().union(*(s.aliases | set(s.names) | set(s.group_tags) for s in statement.subqueries))
        problems += [f"{n!r} is not a column of the subquery" for n in statement.names if n not in available]
        return problems
    names = SCHEMA.get(statement.source)
    if names is None:
        return [f"measurement {statement.source!r} is not in agent.schema"]
    for name in statement.names:
        if name not in names.fields | names.tags | statement.aliases:
            problems.append(f"{name!r} is not a field or tag of {statement.source!r} in agent.schema")
    for tag in statement.group_tags:
        if tag not in names.tags:
            problems.append(f"GROUP BY/WITH KEY {tag!r} is not a tag of {statement.source!r}")
    for regex in statement.field_regexes:
        problems += _check_field_regex(regex, statement.source, names, variables)
    return problems


def _check_field_regex(regex: str, measurement: str, names: Names, variables: dict[str, dict[str, Any]]) -> list[str]:
    used = re.findall(r"\$(\w+)", regex.replace("$/", "/").rstrip("$"))
    if used:
        # A field chosen from the data: the variable must list the field keys of this very measurement.
        problems = []
        for name in used:
            var = variables.get(name, {})
            expected = f'SHOW FIELD KEYS FROM "{measurement}"'
            if not (names.data_fields and var.get("query") == expected):
                problems.append(f"field regex /{regex}/: ${name} is not a {expected} variable")
        return problems
    known = set(names.fields) | {f"{prefix}x" for prefix in names.prefixes}
    if not any(re.search(regex, name) for name in known):
        return [f"field regex /{regex}/ matches no field of {measurement!r} in agent.schema"]
    alternatives = re.fullmatch(r"\^\(([\w|]+)\)\$", regex)
    if alternatives:
        return [
            f"field {name!r} of /{regex}/ is not a field of {measurement!r} in agent.schema"
            for name in alternatives.group(1).split("|")
            if name not in names.fields
        ]
    return []


# --- tests ---------------------------------------------------------------------------------------------------


def test_the_datasource_is_influxql_with_a_fixed_uid_and_its_settings_from_the_environment() -> None:
    config = yaml.safe_load(DATASOURCE_FILE.read_text())
    (source,) = config["datasources"]
    assert source["type"] == "influxdb" and source["uid"] == "pdm-influxdb"
    assert source["jsonData"]["version"] == "InfluxQL"
    assert source["url"] == "${PDM_INFLUX_URL}" and source["jsonData"]["dbName"] == "${PDM_INFLUX_DATABASE}"
    provider = yaml.safe_load(PROVIDER_FILE.read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "${PDM_DASHBOARDS_DIR}"
    # Every variable the provisioning files use has a default in grafana.env.
    used = {name for path in (DATASOURCE_FILE, PROVIDER_FILE) for name in re.findall(r"\$\{(\w+)\}", _code(path))}
    defaults = dict(line.split("=", 1) for line in _code(DASHBOARDS / "grafana.env").splitlines() if line)
    assert used <= set(defaults), used - set(defaults)
    assert defaults["PDM_INFLUX_DATABASE"] == "pdm"  # the database of config/agent.yaml


def test_there_are_the_three_dashboards_with_unique_uids() -> None:
    assert [p.name for p in JSON_FILES] == ["agent_operations.json", "fleet_overview.json", "machine_detail.json"]
    uids = [d["uid"] for d in ALL]
    assert sorted(uids) == ["pdm-agent-operations", "pdm-fleet-overview", "pdm-machine-detail"]
    for d in ALL:
        assert 36 <= d["schemaVersion"] <= 41, d["uid"]
        assert d["title"] and "pdm" in d["tags"]


@pytest.mark.parametrize("dashboard", ALL, ids=[d["uid"] for d in ALL])
def test_panels_have_unique_ids_the_provisioned_datasource_and_a_grid_position(dashboard: dict[str, Any]) -> None:
    uid = _datasource_uid()
    panels = list(_all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {dashboard['uid']}"
    occupied: dict[tuple[int, int], int] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in ("h", "w", "x", "y")), panel["id"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["id"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in occupied, f"panel {panel['id']} overlaps panel {occupied[(x, y)]}"
                occupied[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "influxdb", "uid": uid}, panel["id"]
        assert panel["title"] and panel.get("description"), f"panel {panel['id']} needs a title and a description"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["id"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["id"]
            assert target["rawQuery"] is True and target["query"].strip(), panel["id"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"] == {"type": "influxdb", "uid": uid}, var["name"]
    for ann in dashboard["annotations"]["list"]:
        assert ann["datasource"] == {"type": "influxdb", "uid": uid}, ann["name"]


@pytest.mark.parametrize("dashboard", ALL, ids=[d["uid"] for d in ALL])
def test_every_variable_a_query_uses_is_defined_and_every_defined_one_is_used(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    texts = [q.text for q in _queries(dashboard)]
    panels = list(_all_panels(dashboard["panels"]))
    used = {name for text in texts for name in re.findall(r"\$(\w+)", text)}
    assert used - GRAFANA_MACROS <= defined, used - GRAFANA_MACROS - defined
    elsewhere = {p.get("repeat") for p in panels} | {n for p in panels for n in re.findall(r"\$(\w+)", p["title"])}
    assert defined <= used | elsewhere, defined - used - elsewhere


@pytest.mark.parametrize("query", QUERIES, ids=[_qid(q) for q in QUERIES])
def test_every_measurement_field_and_tag_a_query_names_is_in_the_schema(query: Query) -> None:
    variables = {v["name"]: v for v in query.dashboard["templating"]["list"]}
    problems = check_names(parse(query.text), variables)
    assert not problems, f"{_qid(query)}: {problems}\n{query.text}"


def test_the_name_check_catches_a_misspelled_name() -> None:
    assert check_names(parse('SELECT mean("scroe") FROM "anomaly_score" WHERE $timeFilter'), {})
    assert check_names(parse('SELECT last("x") FROM "anomaly_scores"'), {})
    assert check_names(parse('SELECT max("a") FROM (SELECT last("score") AS "b" FROM "alert")'), {})
    assert check_names(parse('SELECT last(/^(ingest_messages|ingest_mesages)$/) FROM "agent"'), {})
    assert check_names(parse('SELECT count("score") FROM "alert" GROUP BY "machien"'), {})
    assert not check_names(
        parse('SELECT max("b") FROM (SELECT last("score") AS "b" FROM "alert" GROUP BY "machine")'), {}
    )


def test_the_agent_fields_are_the_ones_the_heartbeat_writes() -> None:
    """``schema.AGENT_FIELDS`` and its prefixes follow how ``agent/health/selfmetrics.py`` names metrics."""
    selfmetrics = pytest.importorskip("agent.health.selfmetrics")
    from agent.metrics import Metrics

    metrics = Metrics()  # counters and unlabelled gauges are fields from the start
    metrics.observe("storage.write_seconds", 0.01)  # the recent quantiles, once there are observations
    metrics.observe("inference.seconds", 0.001, model="vibration-anomaly")
    fields = selfmetrics.agent_fields(metrics.collect())
    assert set(schema.AGENT_FIELDS) <= set(fields), set(schema.AGENT_FIELDS) - set(fields)
    for prefix in schema.AGENT_FIELD_PREFIXES:
        assert f"{prefix}model_vibration_anomaly" in fields, prefix


def test_the_docs_explain_every_panel() -> None:
    docs = (REPO / "docs" / "dashboards.md").read_text()
    for dashboard in ALL:
        assert dashboard["title"] in docs, dashboard["title"]
        for panel in _all_panels(dashboard["panels"]):
            if panel["type"] != "row":
                assert f"| {panel['title']} |" in docs, (
                    f"{dashboard['uid']}: panel {panel['title']!r} is not in the docs"
                )
