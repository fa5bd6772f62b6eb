"""The decode stage's one error type: a stable ``code`` for counters, a specific ``detail`` for people.

Codes (see ``docs/contracts.md``): ``topic``, ``too_large``, ``not_utf8``, ``json``, ``not_object``,
``version``, ``timestamp``, ``value``, ``shape``, ``encoding``, ``rate``, ``name`` (a field name, channel
or topic level that InfluxDB cannot store, ``agent.schema.name_problem``), ``too_many_fields`` (more
fields in one message than ``DecodeLimits.max_fields``), ``field_keys`` (a field name new to its machine
beyond the limits of distinct names, ``agent.decode.fieldkeys``); Sparkplug B (``agent.decode.sparkplug_b``):
``protobuf`` (not a Sparkplug payload), ``unsupported`` (a metric type that is not stored: DataSet,
Template, strings, arrays), ``not_born`` (data of an edge node before its NBIRTH), ``alias`` (an alias no
birth declared); camera images (``agent.decode.image``, codes of ``agent.images.codec``): ``empty``,
``unsupported_format``, ``bad_dimensions``, ``truncated``, ``corrupt`` (and ``too_large``). They label the
``decode.errors`` counter and appear in the dead-letter message, so they never change meaning.
"""

from __future__ import annotations

import math
from typing import Final, Literal, get_args

DecodeErrorCode = Literal[
    "topic",
    "too_large",
    "not_utf8",
    "json",
    "not_object",
    "version",
    "timestamp",
    "value",
    "shape",
    "encoding",
    "rate",
    "name",
    "too_many_fields",
    "field_keys",
    "protobuf",
    "unsupported",
    "not_born",
    "alias",
    "empty",
    "unsupported_format",
    "bad_dimensions",
    "truncated",
    "corrupt",
]

CODES: Final[frozenset[str]] = frozenset(get_args(DecodeErrorCode))


class DecodeError(Exception):
    """A message that cannot become readings; permanent (redelivery would fail the same way).

    >>> str(DecodeError("value", "field 'temperature' is NaN"))
    "value: field 'temperature' is NaN"
    """

    def __init__(self, code: DecodeErrorCode, detail: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown decode error code {code!r}")
        super().__init__(code, detail)
        self.code: DecodeErrorCode = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


def quote(value: object, limit: int = 48) -> str:
    """``repr`` of untrusted input, shortened so that an error message never echoes a whole payload.

    >>> quote("x" * 100, limit=10)
    "'xxxxxxxxxx'… (100 chars)"
    """
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} chars)"
    text = repr(value)
    return text if len(text) <= limit + 2 else text[:limit] + "…"


def non_finite_name(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def describe_json(x: object) -> str:
    """How a JSON value is called in an error message."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return f"a boolean ({'true' if x else 'false'})"
    if isinstance(x, str):
        return f"a string {quote(x)}"
    if isinstance(x, list):
        return "an array"
    if isinstance(x, dict):
        return "an object"
    if isinstance(x, float) and not math.isfinite(x):
        return non_finite_name(x)
    return quote(x)
