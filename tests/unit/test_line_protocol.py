"""Line protocol formatting: escaping and value types, against strings known to be accepted by InfluxDB."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from agent.storage import line_protocol
from agent.storage.line_protocol import format_field_value, format_point


def test_doctests_pass() -> None:
    result = doctest.testmod(line_protocol)
    assert result.attempted > 0
    assert result.failed == 0


def test_escaping_matches_the_influxdb_documentation_example() -> None:
    # From the InfluxDB line protocol reference ("Special characters" / escaping examples).
    line = format_point(
        "measurement with quo⚡es and emoji",
        {"tag key with sp🚀ces": 'tag,value,with"commas"'},
        {"field_k\\ey": 'string field value, only " need be esc🍭ped'},
        1,
    )
    assert line == (
        'measurement\\ with\\ quo⚡es\\ and\\ emoji,tag\\ key\\ with\\ sp🚀ces=tag\\,value\\,with"commas" '
        'field_k\\ey="string field value, only \\" need be esc🍭ped" 1'
    )


@pytest.mark.parametrize(
    ("measurement", "expected"),
    [
        ("cpu", "cpu"),
        ("cpu load", "cpu\\ load"),
        ("cpu,total", "cpu\\,total"),
        ("cpu=x", "cpu=x"),  # equals signs need no escaping in a measurement
    ],
)
def test_measurement_escapes_commas_and_spaces_only(measurement: str, expected: str) -> None:
    assert format_point(measurement, {}, {"v": 1.0}, 5) == f"{expected} v=1.0 5"


def test_tag_keys_values_and_field_keys_escape_commas_equals_and_spaces() -> None:
    line = format_point("m", {"k ey,=": "v al,=ue"}, {"f ie,=ld": 2}, 7)
    assert line == "m,k\\ ey\\,\\==v\\ al\\,\\=ue f\\ ie\\,\\=ld=2i 7"


def test_string_field_escapes_quotes_and_backslashes() -> None:
    assert format_point("m", {}, {"s": 'a "b" c\\d'}, 1) == 'm s="a \\"b\\" c\\\\d" 1'


def test_tags_are_sorted_by_key_and_empty_values_left_out() -> None:
    line = format_point("m", {"sensor": "s", "machine": "m1", "line": "", "area": "a"}, {"v": 1.0}, 1)
    assert line == "m,area=a,machine=m1,sensor=s v=1.0 1"


def test_fields_keep_their_order() -> None:
    assert format_point("m", {}, {"z": 1.0, "a": 2.0}, 1) == "m z=1.0,a=2.0 1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, "1.0"),
        (0.1 + 0.2, "0.30000000000000004"),  # repr precision: round-trips exactly
        (-2.5, "-2.5"),
        (1e-7, "1e-07"),
        (1e20, "1e+20"),
        (123, "123i"),
        (-9223372036854775808, "-9223372036854775808i"),
        (True, "true"),
        (False, "false"),
        (np.float64(0.5), "0.5"),
        (np.float32(0.5), "0.5"),
        (np.int64(42), "42i"),
        (np.bool_(True), "true"),
        ("", '""'),
    ],
)
def test_field_value_types(value: object, expected: str) -> None:
    assert format_field_value(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_non_finite_fields_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        format_point("m", {}, {"v": value}, 1)


@pytest.mark.parametrize(
    ("measurement", "tags", "fields", "time_ns", "message"),
    [
        ("m", {}, {}, 1, "at least one field"),
        ("", {}, {"v": 1.0}, 1, "empty measurement"),
        ("m", {"": "x"}, {"v": 1.0}, 1, "empty"),
        ("m", {}, {"": 1.0}, 1, "empty"),
        ("m\nx", {}, {"v": 1.0}, 1, "line break"),
        ("m", {"t": "a\nb"}, {"v": 1.0}, 1, "line break"),
        ("m", {}, {"s": "a\nb"}, 1, "line break"),
        ("m", {"t": "ends\\"}, {"v": 1.0}, 1, "backslash"),
        ("m", {}, {"v": 2**63}, 1, "int64"),
        ("m", {}, {"v": None}, 1, "unsupported"),
        ("m", {}, {"v": 1.0}, 1.5, "integer nanoseconds"),
        ("m", {}, {"v": 1.0}, True, "integer nanoseconds"),
    ],
)
def test_invalid_points_are_refused(
    measurement: str, tags: dict[str, str], fields: dict[str, object], time_ns: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        format_point(measurement, tags, fields, time_ns)  # type: ignore[arg-type]


def test_numpy_timestamps_are_accepted() -> None:
    assert format_point("m", {}, {"v": 1.0}, np.int64(1732575600250000000)) == "m v=1.0 1732575600250000000"
