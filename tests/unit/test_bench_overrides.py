"""``benchmarks/run.py --set``: dotted keys set on the shipped config, a typo refused rather than measured."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.harness import apply_overrides


def _config() -> dict[str, Any]:
    return {"storage": {"raw_vibration": {"mode": "around_alerts", "release_points_s": 50000.0}}, "agent": {}}


def test_a_dotted_key_replaces_that_value_only() -> None:
    data = _config()
    apply_overrides(data, {"storage.raw_vibration.release_points_s": None})
    assert data == {"storage": {"raw_vibration": {"mode": "around_alerts", "release_points_s": None}}, "agent": {}}


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("storage.raw_vibraton.mode", "no section 'raw_vibraton'"),
        ("storage.raw_vibration.release_point_s", "no key 'release_point_s'"),
        ("storage.raw_vibration.mode.deeper", "no section 'mode'"),
    ],
)
def test_a_key_the_config_does_not_have_is_refused(key: str, message: str) -> None:
    data = _config()
    with pytest.raises(KeyError, match=message):
        apply_overrides(data, {key: 1})
    assert data == _config()
