"""InfluxDB line protocol formatting (pure).

``measurement[,tag=value...] field=value[,field=value...] timestamp_ns``, as accepted by InfluxDB 1.x
(``/write``), 2.x/3.x (``/api/v2/write``) and VictoriaMetrics. Escaping follows the reference:

- measurement: comma and space;
- tag keys, tag values and field keys: comma, equals sign and space;
- string field values: double quote and backslash (the value is in double quotes).

Newlines cannot be escaped in line protocol and a backslash at the end of a name or before an escaped
character would escape the wrong thing: such names (``agent.schema.name_problem``, the rule the decoder
shares) are refused with ``ValueError``, as are non-finite floats and empty field sets
(the caller counts the rejection). Tags with an empty value are left out (InfluxDB has no empty tags);
tags are sorted by key, as InfluxDB recommends for write performance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np

from agent import schema

FieldValue = float | int | bool | str

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ "})
_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})


def _check_name(kind: str, name: str) -> None:
    problem = schema.name_problem(name)
    if problem is not None:
        raise ValueError(f"empty {kind}" if not name else f"{kind} {name[:80]!r} {problem}")


@lru_cache(maxsize=4096)
def escape_measurement(name: str) -> str:
    r"""Escape a measurement name.

    >>> escape_measurement("cpu load,total")
    'cpu\\ load\\,total'
    """
    _check_name("measurement", name)
    return name.translate(_MEASUREMENT_ESCAPES)


@lru_cache(maxsize=65536)
def escape_key(name: str) -> str:
    r"""Escape a tag key, tag value or field key.

    >>> escape_key("a b,c=d")
    'a\\ b\\,c\\=d'
    """
    _check_name("tag or field name", name)
    return name.translate(_KEY_ESCAPES)


def format_tags(tags: Mapping[str, str]) -> str:
    r"""The tag part of a line, including its leading comma; sorted by key, empty values left out.

    >>> format_tags({"sensor": "vib x", "machine": "m1", "empty": ""})
    ',machine=m1,sensor=vib\\ x'
    >>> format_tags({})
    ''
    """
    return "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in sorted(tags.items()) if v != "")


def format_field_value(value: FieldValue) -> str:
    r"""One field value: floats with ``repr`` precision, ints as ``123i``, bools, quoted strings.

    >>> [format_field_value(v) for v in (1.5, 0.1, 1e-07, 3, True, False)]
    ['1.5', '0.1', '1e-07', '3i', 'true', 'false']
    >>> print(format_field_value('say "hi" \\ bye'))
    "say \"hi\" \\ bye"
    >>> format_field_value(float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: non-finite float nan
    """
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        number = int(value)
        if not INT64_MIN <= number <= INT64_MAX:
            raise ValueError(f"integer {number} does not fit in int64")
        return f"{number}i"
    if isinstance(value, float | np.floating):
        real = float(value)
        if not math.isfinite(real):
            raise ValueError(f"non-finite float {real}")
        return repr(real)
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise ValueError(f"string field value {value[:40]!r} contains a line break")
        return f'"{value.translate(_STRING_ESCAPES)}"'
    raise ValueError(f"unsupported field value type {type(value).__name__}")


def format_fields(fields: Mapping[str, FieldValue]) -> str:
    """The field part of a line (without surrounding spaces), in the mapping's order.

    >>> format_fields({"temperature": 61.2, "seq": 7})
    'temperature=61.2,seq=7i'
    """
    if not fields:
        raise ValueError("a point needs at least one field")
    parts = []
    for key, value in fields.items():
        try:
            parts.append(f"{escape_key(key)}={format_field_value(value)}")
        except ValueError as exc:
            raise ValueError(f"field {key!r}: {exc}") from None
    return ",".join(parts)


def format_point(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, FieldValue],
    time_ns: int | np.integer,
) -> str:
    r"""One line of line protocol (without the trailing newline).

    >>> format_point("reading", {"sensor": "process", "machine": "m 1"}, {"value": 61.2, "seq": 7},
    ...              1732575600250000000)
    'reading,machine=m\\ 1,sensor=process value=61.2,seq=7i 1732575600250000000'
    >>> format_point("alert", {}, {"event_id": 'a"b'}, 1)
    'alert event_id="a\\"b" 1'
    >>> format_point("reading", {}, {}, 1)
    Traceback (most recent call last):
    ...
    ValueError: a point needs at least one field
    >>> format_point("reading", {}, {"value": float("inf")}, 1)
    Traceback (most recent call last):
    ...
    ValueError: field 'value': non-finite float inf
    """
    if isinstance(time_ns, bool) or not isinstance(time_ns, int | np.integer):
        raise ValueError(f"timestamp must be integer nanoseconds, not {type(time_ns).__name__}")
    return f"{escape_measurement(measurement)}{format_tags(tags)} {format_fields(fields)} {int(time_ns)}"
