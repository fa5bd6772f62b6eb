from pathlib import Path

import pytest

from agent.cli import main
from agent.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "agent.yaml"


def test_example_config_loads_with_models_resolved_next_to_the_repo():
    config = load_config(EXAMPLE, environ={})
    assert config.storage.api == "v1"
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
    data = {"storage": {"api": "v2", "v2": {"token": "${TOKEN}"}}, "mqtt": {"password": "${PW:-fallback}"}}
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
