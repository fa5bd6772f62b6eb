"""Simulator config: the shipped YAML loads, errors name the key path, command-line flags override."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from pdm_tools.simulator.cli import add_arguments, build_config, main, parse_fault
from pdm_tools.simulator.config import SimulatorConfig, SimulatorConfigError, config_from_dict, load_config
from pdm_tools.simulator.machine import Fault, MachineProfile

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "simulator.yaml"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_shipped_example_config_loads_as_the_documented_demo() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.machines.names() == ("m01", "m02", "m03", "m04")
    assert cfg.duration_s == 60 and cfg.qos == 1 and cfg.vibration.encoding == "f32le"
    assert cfg.vibration.block_samples == 2048 and cfg.process.period_s == 1.0
    assert cfg.faults == (Fault("m02", "bearing_outer", start_s=20.0, severity=0.8, ramp_s=30.0),)
    assert cfg.topics.topic("m02", "vibration") == "factory/site1/line1/m02/vibration"


def test_empty_document_gives_the_defaults() -> None:
    assert config_from_dict({}) == SimulatorConfig()


@pytest.mark.parametrize(
    ("document", "path", "reason"),
    [
        ({"brokr": {}}, "brokr", "unknown key"),
        ({"broker": {"hots": "x"}}, "broker.hots", "unknown key"),
        ({"broker": {"port": 0}}, "broker.port", "must be in 1..65535"),
        ({"broker": {"port": "1883"}}, "broker.port", "expected an integer"),
        ({"broker": []}, "broker", "expected a mapping"),
        ({"topics": {"site": "a/b"}}, "topics.site", "one topic level"),
        ({"speed": 0}, "speed", "must be > 0"),
        ({"duration_s": True}, "duration_s", "expected a finite number"),
        ({"vibration": {"encoding": "i16le"}}, "vibration.scale", "required with encoding i16le"),
        ({"vibration": {"encoding": "f64"}}, "vibration.encoding", "must be one of 'json', 'f32le', 'i16le'"),
        ({"machines": {"count": 0}}, "machines.count", "must be in 1..99"),
        ({"machines": {"defaults": {"rpmm": 1}}}, "machines.defaults.rpmm", "unknown key"),
        ({"machines": {"profiles": {"m09": {}}}}, "machines.profiles.m09", "no such machine"),
        ({"machines": {"profiles": {"m02": {"rpm": -1}}}}, "machines.profiles.m02.rpm", "must be > 0"),
        ({"faults": {"machine": "m01"}}, "faults", "expected a list"),
        ({"faults": [{"machine": "m01", "kind": "imbalance"}]}, "faults[0].start_s", "required"),
        (
            {
                "faults": [
                    {"machine": "m01", "kind": "imbalance", "start_s": 1},
                    {"machine": "m01", "kind": "x", "start_s": 1},
                ]
            },
            "faults[1].kind",
            "expected one of",
        ),
        (
            {"faults": [{"machine": "m01", "kind": "dropout", "start_s": 1}]},
            "faults[0].sensor",
            "needs sensor",
        ),
        (
            {"faults": [{"machine": "m07", "kind": "imbalance", "start_s": 1}]},
            "faults[0].machine",
            "no such machine",
        ),
        (
            {"faults": [{"machine": "m01", "kind": "imbalance", "start_s": 1, "when": 2}]},
            "faults[0].when",
            "unknown",
        ),
        ({"ground_truth": {"topic": "gt/#"}}, "ground_truth.topic", "wildcards"),
    ],
)
def test_invalid_config_error_names_the_key_path(document: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(SimulatorConfigError) as info:
        config_from_dict(document)
    assert info.value.path == path
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{path}: ")


def test_every_error_is_reported_at_once_with_its_key_path() -> None:
    document = {
        "broker": {"port": 0, "hots": "x"},
        "speed": 0,
        "faults": [{"machine": "m01", "kind": "x", "start_s": 1}, {"kind": "imbalance", "severity": "high"}],
    }
    with pytest.raises(SimulatorConfigError) as info:
        config_from_dict(document)
    assert [path for path, _ in info.value.errors] == [
        "broker.port",
        "broker.hots",
        "speed",
        "faults[0].kind",
        "faults[1].machine",
        "faults[1].start_s",
        "faults[1].severity",
    ]
    assert str(info.value).splitlines()[0] == "broker.port: must be in 1..65535, got 0"


def test_unreadable_file_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "sim.yaml"
    bad.write_text("broker: [unclosed\n")
    with pytest.raises(SimulatorConfigError, match=r"sim\.yaml"):
        load_config(bad)


def test_machine_defaults_and_profiles_set_fields() -> None:
    cfg = config_from_dict(
        {
            "machines": {
                "count": 2,
                "vary": False,
                "defaults": {"rate_hz": 25600},
                "profiles": {"m02": {"rpm": 2960}},
            }
        }
    )
    assert cfg.profiles() == (
        MachineProfile(name="m01", rate_hz=25600.0),
        MachineProfile(name="m02", rate_hz=25600.0, rpm=2960.0),
    )


def test_flags_override_the_config_file() -> None:
    args = parse(
        "--config", str(EXAMPLE), "--host", "broker.local", "--port", "11883", "--duration", "5",
        "--speed", "50", "--machines", "3", "--seed", "9", "--ground-truth", "gt.jsonl",
        "--fault", "m03:dropout@process:1:2",
    )  # fmt: skip
    cfg = build_config(args)
    assert (cfg.broker.host, cfg.broker.port, cfg.duration_s, cfg.speed, cfg.seed) == (
        "broker.local",
        11883,
        5,
        50,
        9,
    )
    assert cfg.machines.names() == ("m01", "m02", "m03")
    assert cfg.ground_truth.path == "gt.jsonl"
    assert cfg.faults[1] == Fault("m03", "dropout", start_s=1.0, end_s=2.0, sensor="process")


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(SimulatorConfigError, match=r"^--port: port: must be in 1\.\.65535"):
        build_config(parse("--port", "70000"))
    # The demo's fault is on m02: one machine is not enough.
    with pytest.raises(SimulatorConfigError, match=r"^--machines: faults\[0\]\.machine: no such machine 'm02'"):
        build_config(parse("--config", str(EXAMPLE), "--machines", "1"))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("m02:bearing_outer:20", Fault("m02", "bearing_outer", 20.0)),
        ("m02:bearing_outer:20::0.8", Fault("m02", "bearing_outer", 20.0, severity=0.8)),
        ("m01:overheating:5:50:1:15", Fault("m01", "overheating", 5.0, end_s=50.0, ramp_s=15.0)),
        ("m04:sensor_stuck@vibration:3", Fault("m04", "sensor_stuck", 3.0, sensor="vibration")),
    ],
)
def test_fault_flag_syntax(spec: str, expected: Fault) -> None:
    assert parse_fault(spec) == expected


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("m02:bearing_outer", "expected MACHINE:KIND"),
        ("m02:bearing_outer:soon", "start_s: expected a number"),
        ("m02:dropout:1", "sensor: dropout needs sensor"),
        ("m02:imbalance:5:4", "end_s: must be after start_s"),
    ],
)
def test_bad_fault_flag_is_explained(spec: str, reason: str) -> None:
    with pytest.raises(SimulatorConfigError, match=f"^--fault: {reason}"):
        parse_fault(spec)


def test_main_refuses_bad_config_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(parse("--speed", "0")) == 2
    assert "invalid configuration: --speed: speed: must be > 0" in capsys.readouterr().err


def test_main_refuses_an_invalid_config_file_with_exit_code_1(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "simulator.yaml"
    bad.write_text("broker:\n  port: 0\n", encoding="utf-8")
    assert main(parse("--config", str(bad))) == 1  # like pdm-agent run: the file was read and found wanting
    assert "invalid configuration: broker.port" in capsys.readouterr().err
