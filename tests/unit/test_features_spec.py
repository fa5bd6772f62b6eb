"""FeatureSpec: names, validation, strict dict round trip and a stable hash."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest

from agent.features.spec import FEATURE_CODE_VERSION, FeatureSpec

VIB = FeatureSpec(
    kind="vibration",
    window_samples=4096,
    hop_samples=2048,
    channels=("value",),
    band_edges_hz=(0, 100, 500, 1000, 2000, 3000, 5000),
)
PROC = FeatureSpec(kind="process", window_samples=60, hop_samples=10, channels=("temperature", "current", "pressure"))


def test_vibration_feature_names_are_stats_then_one_band_per_edge_pair() -> None:
    assert VIB.feature_names() == (
        "rms",
        "peak",
        "crest_factor",
        "kurtosis",
        "skewness",
        "std",
        "mean",
        "band_0_100hz",
        "band_100_500hz",
        "band_500_1000hz",
        "band_1000_2000hz",
        "band_2000_3000hz",
        "band_3000_5000hz",
    )
    assert VIB.n_features == 13


def test_vibration_without_bands_has_only_the_seven_stats() -> None:
    spec = dataclasses.replace(VIB, band_edges_hz=())
    assert spec.feature_names() == ("rms", "peak", "crest_factor", "kurtosis", "skewness", "std", "mean")


def test_process_feature_names_are_grouped_per_channel_in_spec_order() -> None:
    stats = ("mean", "std", "slope", "min", "max", "last")
    assert PROC.feature_names() == tuple(f"{ch}_{s}" for ch in ("temperature", "current", "pressure") for s in stats)
    assert PROC.feature_names()[:3] == ("temperature_mean", "temperature_std", "temperature_slope")


@pytest.mark.parametrize("spec", [VIB, PROC])
def test_feature_names_are_valid_influxdb_field_names(spec: FeatureSpec) -> None:
    for name in spec.feature_names():
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name), name


def test_band_edges_are_normalised_to_floats_so_int_and_float_specs_are_equal() -> None:
    as_float = dataclasses.replace(VIB, band_edges_hz=(0.0, 100.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0))
    assert as_float == VIB
    assert VIB.band_edges_hz == as_float.band_edges_hz
    assert all(type(e) is float for e in VIB.band_edges_hz)
    assert VIB.spec_hash() == as_float.spec_hash()


@pytest.mark.parametrize("spec", [VIB, PROC])
def test_dict_round_trip_gives_an_equal_spec_with_the_same_hash(spec: FeatureSpec) -> None:
    d = json.loads(json.dumps(spec.to_dict()))
    back = FeatureSpec.from_dict(d)
    assert back == spec
    assert back.spec_hash() == spec.spec_hash()


def test_to_dict_contains_every_field_including_the_version() -> None:
    assert VIB.to_dict() == {
        "kind": "vibration",
        "window_samples": 4096,
        "hop_samples": 2048,
        "channels": ["value"],
        "band_edges_hz": [0.0, 100.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0],
        "version": FEATURE_CODE_VERSION,
    }


def test_spec_hash_is_sha256_of_the_canonical_json_and_stable_across_releases() -> None:
    # A changed value here means every shipped model manifest stops matching: bump
    # FEATURE_CODE_VERSION on purpose instead of changing the canonical form by accident.
    assert VIB.canonical_json() == (
        '{"band_edges_hz":[0.0,100.0,500.0,1000.0,2000.0,3000.0,5000.0],"channels":["value"],'
        '"hop_samples":2048,"kind":"vibration","version":1,"window_samples":4096}'
    )
    assert VIB.spec_hash() == "4e04b60620285a2007bc2c09afe15966961f67728a4a4ecacde94055d43346d6"
    assert re.fullmatch(r"[0-9a-f]{64}", PROC.spec_hash())


@pytest.mark.parametrize(
    "changes",
    [
        {"window_samples": 8192},
        {"hop_samples": 1024},
        {"channels": ("x",)},
        {"band_edges_hz": (0, 100, 500, 1000, 2000, 3000, 5120)},
        {"band_edges_hz": ()},
        {"version": FEATURE_CODE_VERSION + 1},
    ],
)
def test_spec_hash_changes_when_any_vibration_field_changes(changes: dict[str, Any]) -> None:
    assert dataclasses.replace(VIB, **changes).spec_hash() != VIB.spec_hash()


@pytest.mark.parametrize(
    "changes",
    [
        {"channels": ("temperature", "pressure", "current")},  # order is part of the feature layout
        {"channels": ("temperature", "current")},
        {"window_samples": 61},
        {"hop_samples": 11},
    ],
)
def test_spec_hash_changes_when_any_process_field_changes(changes: dict[str, Any]) -> None:
    assert dataclasses.replace(PROC, **changes).spec_hash() != PROC.spec_hash()


def test_spec_hash_changes_with_the_kind() -> None:
    vib = FeatureSpec("vibration", 60, 10, ("temperature",))
    proc = FeatureSpec("process", 60, 10, ("temperature",))
    assert vib.spec_hash() != proc.spec_hash()


def test_from_dict_rejects_unknown_keys_naming_them() -> None:
    d = VIB.to_dict() | {"window_s": 1.0}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['window_s'\]"):
        FeatureSpec.from_dict(d)


def test_from_dict_rejects_missing_required_keys_naming_them() -> None:
    d = VIB.to_dict()
    del d["hop_samples"]
    with pytest.raises(ValueError, match=r"missing required key.*hop_samples"):
        FeatureSpec.from_dict(d)


def test_from_dict_defaults_version_and_band_edges() -> None:
    spec = FeatureSpec.from_dict(
        {"kind": "process", "window_samples": 60, "hop_samples": 10, "channels": ["temperature"]}
    )
    assert spec.version == FEATURE_CODE_VERSION
    assert spec.band_edges_hz == ()


def test_from_dict_rejects_a_non_mapping() -> None:
    with pytest.raises(ValueError, match="must be a mapping"):
        FeatureSpec.from_dict([("kind", "process")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "audio"}, "kind must be one of"),
        ({"window_samples": 0}, "window_samples"),
        ({"window_samples": 1}, "window_samples"),
        ({"window_samples": 4096.0}, "window_samples"),
        ({"window_samples": True}, "window_samples"),
        ({"window_samples": 1 << 30}, "window_samples"),
        ({"hop_samples": 0}, "hop_samples"),
        ({"hop_samples": 4097}, "hop_samples"),
        ({"hop_samples": "2048"}, "hop_samples"),
        ({"channels": "value"}, "channels must be a list"),
        ({"channels": []}, "channels must not be empty"),
        ({"channels": ["x", "y"]}, "exactly one channel"),
        ({"channels": ["a-b"]}, "channel names"),
        ({"channels": ["_x"]}, "channel names"),
        ({"channels": ["1x"]}, "channel names"),
        ({"channels": [3]}, "channels must be a tuple of strings"),
        ({"band_edges_hz": [100, 100, 500]}, "strictly increasing"),
        ({"band_edges_hz": [500, 100]}, "strictly increasing"),
        ({"band_edges_hz": [100]}, "at least two edges"),
        ({"band_edges_hz": [-10, 100]}, "non-negative"),
        ({"band_edges_hz": [0, 12.5]}, "whole"),
        ({"band_edges_hz": [0, float("inf")]}, "finite"),
        ({"band_edges_hz": [0, True]}, "band_edges_hz"),
        ({"band_edges_hz": "0,100"}, "band_edges_hz must be a list"),
        ({"version": 0}, "version"),
        ({"version": "1"}, "version"),
    ],
)
def test_from_dict_rejects_invalid_values_with_the_field_name(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureSpec.from_dict(VIB.to_dict() | changes)


def test_process_spec_rejects_band_edges() -> None:
    with pytest.raises(ValueError, match="only allowed for kind 'vibration'"):
        FeatureSpec.from_dict(PROC.to_dict() | {"band_edges_hz": [0, 100]})


def test_process_spec_rejects_duplicate_channels() -> None:
    with pytest.raises(ValueError, match="duplicate channels"):
        dataclasses.replace(PROC, channels=("temperature", "temperature"))


def test_constructor_rejects_a_list_of_channels() -> None:
    with pytest.raises(ValueError, match="tuple of strings"):
        FeatureSpec("process", 60, 10, ["temperature"])  # type: ignore[arg-type]


def test_hop_equal_to_window_is_allowed() -> None:
    assert dataclasses.replace(VIB, hop_samples=4096).hop_samples == 4096


def test_spec_is_frozen_and_hashable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        VIB.hop_samples = 1  # type: ignore[misc]
    assert {VIB: 1}[FeatureSpec.from_dict(VIB.to_dict())] == 1


def test_a_spec_of_another_code_version_loads_but_is_not_supported() -> None:
    future = dataclasses.replace(VIB, version=FEATURE_CODE_VERSION + 1)
    assert not future.is_supported
    assert VIB.is_supported
    with pytest.raises(ValueError, match="not supported by this agent's feature code"):
        future.require_supported()
    VIB.require_supported()
