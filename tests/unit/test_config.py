import json
import typing
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from agent.cli import main
from agent.config import Config, ConfigError, json_schema, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "agent.yaml"


def test_example_config_loads_with_models_resolved_next_to_the_repo():
    config = load_config(EXAMPLE, environ={})
    assert config.storage.type == "influx_v1"
    assert [m.path for m in config.inference.models] == [
        REPO / "models" / "vibration_anomaly",
        REPO / "models" / "process_anomaly",
    ]
    assert config.mqtt.protocol == "5"


def test_every_key_of_the_example_config_is_commented():
    for number, line in enumerate(EXAMPLE.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or stripped.endswith(":"):
            continue
        assert "#" in line, f"config/agent.yaml line {number} has no comment: {line!r}"


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ({"mqtt": {"prot": 1}}, "mqtt.prot", "unknown key"),
        ({"mqtt": {"port": "1883"}}, "mqtt.port", "expected an integer"),
        ({"mqtt": {"port": 70000}}, "mqtt.port", "1..65535"),
        ({"mqtt": {"protocol": "4"}}, "mqtt.protocol", "must be one of"),
        ({"mqtt": {"topic_template": "factory/{machine}"}}, "mqtt.topic_template", "{sensor}"),
        ({"storage": {"batch_size": 0}}, "storage.batch_size", "must be > 0"),
        ({"storage": {"v1": {"create_database": "yes"}}}, "storage.v1.create_database", "true or false"),
        ({"storage": {"raw_vibration": {"mode": "some"}}}, "storage.raw_vibration.mode", "must be one of"),
        ({"inference": {"models": [{"path": "m", "sensors": []}]}}, "inference.models[0].sensors", "at least one"),
        ({"inference": {"models": [{"sensors": ["x"]}]}}, "inference.models[0].path", "is required"),
        ({"inference": {"models": {"path": "m"}}}, "inference.models", "expected a list"),
        ({"agent": {"id": "a/b"}}, "agent.id", "topic level"),
        ({"alerts": []}, "alerts", "expected a mapping"),
        ({"storage": {"require_tls": True}}, "storage.require_tls", "not https://"),
        ({"commissioning": {"channels": []}}, "commissioning.channels", "at least one"),
        ({"commissioning": {"commissioning_steps": 10}}, "commissioning", "smoothing_steps"),
        ({"inference": {"defect": {"default_rpm": 0}}}, "inference.defect.default_rpm", "must be > 0"),
    ],
)
def test_invalid_values_are_refused_with_key_path_and_reason(data, path, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    assert info.value.path == path
    assert reason in info.value.reason


def test_secrets_come_from_the_environment():
    data = {"storage": {"type": "influx_v2", "v2": {"token": "${TOKEN}"}}, "mqtt": {"password": "${PW:-fallback}"}}
    config = parse_config(data, environ={"TOKEN": "s3cret"})
    assert config.storage.v2.token == "s3cret"
    assert config.mqtt.password == "fallback"


def test_missing_environment_variable_names_the_key_and_not_a_value():
    with pytest.raises(ConfigError) as info:
        parse_config({"storage": {"v1": {"password": "${INFLUX_PW}"}}}, environ={})
    assert str(info.value) == "storage.v1.password: environment variable INFLUX_PW is not set"


def test_validate_config_command_exits_0_or_1_with_the_reason(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("agent:\n  id: line-7\n")
    assert main(["validate-config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  url: influx:8086\n")
    assert main(["validate-config", str(bad)]) == 1
    assert "storage.url: must start with http:// or https://" in capsys.readouterr().err


def test_unparseable_yaml_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_alert_rules_per_type_and_their_validation():
    config = parse_config(
        {"alerts": {"default": {"raise_n": 3, "raise_m": 5}, "types": {"commissioning-baseline": {"clear_after": 30}}}}
    )
    book = config.alerts.rulebook()
    assert (book.rule("vibration-anomaly").raise_n, book.rule("vibration-anomaly").raise_m) == (3, 5)
    # A type's rule is the default with its own keys replaced.
    assert (book.rule("commissioning-baseline").clear_after, book.rule("commissioning-baseline").raise_n) == (30, 3)
    with pytest.raises(ConfigError, match=r"alerts.types.vib.raise_n: expected an integer"):
        parse_config({"alerts": {"types": {"vib": {"raise_n": 2.5}}}})
    with pytest.raises(ConfigError, match=r"alerts.types.vib.clear: unknown key"):
        parse_config({"alerts": {"types": {"vib": {"clear": 2}}}})
    with pytest.raises(ConfigError) as info:
        parse_config({"alerts": {"types": {"vib": {"enter": 1.0, "exit": 1.5}}}})
    assert info.value.path == "alerts.types.vib" and "exit" in info.value.reason
    with pytest.raises(ConfigError, match=r"alerts.default.raise_k: unknown key"):
        parse_config({"alerts": {"default": {"raise_k": 3}}})
    with pytest.raises(ConfigError, match=r"alerts.types: expected a mapping"):
        parse_config({"alerts": {"types": ["vib"]}})


# --- every problem at once, with its key path ----------------------------------------------------------------

THREE_ERRORS = """\
mqtt:
  port: "1883"
storage:
  type: v2
inference:
  models:
    - path: ../models/vibration_anomaly
      sensors: ["vibration*"]
    - path: ../models/process_anomaly
      sensors: []
"""


def test_every_error_of_a_file_is_reported_at_once_in_the_order_of_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(THREE_ERRORS)
    with pytest.raises(ConfigError) as info:
        load_config(bad, environ={})
    assert info.value.errors == [
        ("mqtt.port", "expected an integer, got '1883'"),
        ("storage.type", "must be one of 'influx_v1', 'influx_v2', got 'v2'"),
        ("inference.models[1].sensors", "needs at least one item"),
    ]
    assert (info.value.path, info.value.reason) == info.value.errors[0]
    assert str(info.value).splitlines() == [f"{path}: {reason}" for path, reason in info.value.errors]


def test_config_validate_prints_every_error_with_its_key_path(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(THREE_ERRORS)
    assert main(["config", "validate", str(bad)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{bad}: invalid configuration (3 errors)",
        "  mqtt.port: expected an integer, got '1883'",
        "  storage.type: must be one of 'influx_v1', 'influx_v2', got 'v2'",
        "  inference.models[1].sensors: needs at least one item",
    ]
    good = tmp_path / "good.yaml"
    good.write_text("agent:\n  id: line-7\n")
    assert main(["config", "validate", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"


def test_cross_field_checks_are_reported_with_the_other_errors():
    data = {
        "mqtt": {"reconnect_min_s": 5, "reconnect_max_s": 1, "require_tls": True},
        "storage": {"v1": {"database": 5}},
        "inference": {"models": [{"path": "a", "sensors": ["x"]}, {"model_id": "m", "sensors": ["y"]}]},
        "adaptation": {"auto": {"enabled": True}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    assert [path for path, _ in info.value.errors] == [
        "mqtt.reconnect_max_s",
        "mqtt.require_tls",
        "storage.v1.database",
        "inference.models[1].model_id",
        "adaptation.auto.enabled",
    ]


def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    bad = tmp_path / "agent.yaml"
    bad.write_text("agent:\n  id: edge-01\nmqtt:\n  port: [1883\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.path == ""
    assert str(info.value).startswith(f"{bad}:5:1: not valid YAML")


def test_a_missing_file_is_named():
    with pytest.raises(ConfigError, match=r"cannot read /no/such/agent\.yaml: No such file"):
        load_config("/no/such/agent.yaml")


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ({"mqtt": {"qos": True}}, "mqtt.qos", "expected an integer, got true"),
        ({"mqtt": {"subscriptions": "a/#"}}, "mqtt.subscriptions", "expected a list, got 'a/#'"),
        ({"mqtt": {"decoder": {"type": "json_v2"}}}, "mqtt.decoder.type", "must be one of 'image', 'json_v1'"),
        ({"storage": {"api": "v1"}}, "storage.api", "renamed to type"),
        ({"storage": {"timeout_s": float("nan")}}, "storage.timeout_s", "expected a finite number"),
        (
            {"inference": {"models": [{"type": "x", "path": "m", "sensors": ["v"]}]}},
            "inference.models[0].type",
            "one of",
        ),
        ({"inference": {"defect": {"type": "anomaly"}}}, "inference.defect.type", "must be one of 'classifier'"),
        ({"inference": {"models": [{"path": "m", "sensors": ["v", 3]}]}}, "inference.models[0].sensors[1]", "string"),
        ({"mqtt": {"protocl": "5"}}, "mqtt.protocl", "did you mean protocol?"),
        ({"spool": {"path": 5}}, "spool.path", "expected a path string, got 5"),
        ([], "", "expected a mapping, got a list"),
    ],
)
def test_more_invalid_values_are_refused_with_key_path_and_reason(data, path, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    assert info.value.path == path
    assert reason in info.value.reason


def test_a_wrong_secret_is_never_shown_in_the_error():
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"password": 123456789}, "storage": {"v2": {"token": ["s3cret"]}}}, environ={})
    assert info.value.errors == [
        ("mqtt.password", "expected a string, got a number"),
        ("storage.v2.token", "expected a string, got a list"),
    ]
    assert "123456789" not in str(info.value)


def test_registry_keys_default_and_env_references_reach_lists_paths_and_choices(tmp_path):
    config = parse_config(
        {
            "agent": {"log_level": "${LEVEL:-DEBUG}"},
            "storage": {"type": "${SINK}"},
            "spool": {"path": "${RUN}/spool.db"},
            "inference": {"models": [{"path": "m", "sensors": ["${SENSOR}*"]}]},
        },
        base_dir=tmp_path,
        environ={"SINK": "influx_v2", "RUN": "run", "SENSOR": "vib"},
    )
    assert (config.agent.log_level, config.storage.type) == ("DEBUG", "influx_v2")
    assert config.spool.path == tmp_path / "run" / "spool.db"
    entry = config.inference.models[0]
    assert (entry.type, entry.sensors, entry.path) == ("anomaly", ("vib*",), tmp_path / "m")
    assert (config.mqtt.decoder.type, config.inference.defect.type) == ("json_v1", "classifier")


def test_the_example_config_sets_the_registry_keys():
    config = load_config(EXAMPLE, environ={})
    assert config.mqtt.decoder.type == "json_v1"
    assert [m.type for m in config.inference.models] == ["anomaly", "anomaly"]
    assert config.inference.defect.type == "classifier"
    assert config.alerts.rulebook().rule("vibration-anomaly").clear_after == 25


# --- descriptions and the JSON Schema -----------------------------------------------------------------------


def _models(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
    yield model
    for field in model.model_fields.values():
        for inner in _nested(field.annotation):
            yield from _models(inner)


def _nested(annotation: object) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _nested(arg)


def test_every_field_of_every_section_has_a_description():
    models = set(_models(Config))
    assert len(models) >= 15
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items() if not f.description]
    assert missing == []


def test_every_property_of_the_json_schema_has_a_description():
    schema = json_schema()
    objects = [schema, *schema["$defs"].values()]
    missing = [
        f"{o['title']}.{name}" for o in objects for name, p in o["properties"].items() if not p.get("description")
    ]
    assert missing == []
    assert all(o["additionalProperties"] is False for o in objects)


def test_config_schema_command_prints_the_json_schema_of_every_section(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "pdm-agent configuration"
    assert set(schema["properties"]) == set(Config.model_fields) >= {"agent", "mqtt", "storage", "inference", "alerts"}
    storage = schema["$defs"]["StorageSection"]["properties"]["type"]
    assert storage["enum"] == ["influx_v1", "influx_v2"] and storage["default"] == "influx_v1"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_the_example_config_is_valid_against_the_schema_and_the_shipped_schema_is_current():
    schema = json_schema()
    shipped = json.loads((REPO / "config" / "agent.schema.json").read_text())
    assert shipped == schema, "regenerate it: pdm-agent config schema > config/agent.schema.json"
    assert EXAMPLE.read_text().startswith("# yaml-language-server: $schema=agent.schema.json\n")
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(EXAMPLE.read_text()))


def test_the_old_validate_config_spelling_still_works(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("storage:\n  type: influx_v2\n")
    assert main(["validate-config", str(good)]) == 0


def test_an_integer_may_come_from_an_environment_reference_but_not_from_a_plain_string():
    config = parse_config({"mqtt": {"port": "${MQTT_PORT:-1884}"}, "health": {"port": "${H}"}}, environ={"H": "0"})
    assert (config.mqtt.port, config.health.port) == (1884, 0)
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"port": "${P}"}, "health": {"port": "9108"}}, environ={"P": "88x3"})
    assert info.value.errors == [
        ("mqtt.port", "${P} gives '88x3', not an integer"),
        ("health.port", "expected an integer, got '9108'"),
    ]
    with pytest.raises(ConfigError, match=r"mqtt.port: must be in 1..65535, got 70000"):
        parse_config({"mqtt": {"port": "${P}"}}, environ={"P": "70000"})
