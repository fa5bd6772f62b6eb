"""Decoder of inbound payloads, JSON schema version 1 (``docs/contracts.md``): bytes in, records out.

Pure: no I/O, no clock (the arrival time is an argument). Strict, so that publisher mistakes surface as
a specific ``DecodeError`` on the dead-letter topic instead of as odd data in InfluxDB: unknown keys,
duplicate keys, booleans and non-finite values are refused. Shapes:

- a bare JSON number, or ``{"value": x}``: a scalar ``Reading`` (field ``value``);
- ``{"fields": {name: x, ...}}``: a ``Reading`` with several fields of one timestamp;
- ``{"samples": [...], "rate_hz": r}`` or ``{"data": "<base64>", "encoding": "f32le"|"i16le",
  "scale": s (i16le only), "rate_hz": r}``: a ``SampleBlock`` (optional ``"channel"``, default ``value``).

Common keys: ``"v"`` (only 1; missing means 1), ``"ts"`` (epoch seconds or RFC 3339 with an offset) or
``"ts_ns"`` (integer epoch nanoseconds), ``"seq"`` (integer). Without a timestamp the arrival time is used.
"""

from __future__ import annotations

import binascii
import difflib
import json
import math
import re
import sys
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Final

import numpy as np
import pybase64

from agent import schema
from agent.decode.base import DecodeLimits, DecoderContext
from agent.decode.errors import DecodeError, DecodeErrorCode, describe_json, non_finite_name, quote
from agent.decode.timestamps import parse_timestamp
from agent.records import Decoded, Message, Reading, SampleBlock, Source

SCHEMA_VERSION: Final = 1


_COMMON_KEYS: Final = ("v", "ts", "ts_ns", "seq")
# The key that selects a shape, and the keys that shape allows besides the common ones.
_SHAPE_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "value": ("value",),
    "fields": ("fields",),
    "samples": ("samples", "rate_hz", "channel"),
    "data": ("data", "encoding", "scale", "rate_hz", "channel"),
}
_SHAPE_NAMES: Final = {
    "value": "a scalar reading",
    "fields": "a fields reading",
    "samples": "a sample block",
    "data": "an encoded sample block",
}
_ALLOWED_KEYS: Final = frozenset(_COMMON_KEYS).union(*_SHAPE_KEYS.values())
_ALLOWED_LIST: Final = ", ".join(sorted(_ALLOWED_KEYS))

_ENCODINGS: Final[dict[str, str]] = {"f32le": "<f4", "i16le": "<i2"}

# Field keys InfluxDB refuses or the agent writes itself (``seq`` is stored beside the fields).
_RESERVED_FIELDS: Final = frozenset({"time", "seq"})
_MAX_NAME_CHARS: Final = 128
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f]")

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

_MISSING: Final = object()


DEFAULT_LIMITS: Final = DecodeLimits()


def decode(source: Source, payload: bytes, received_ns: int, limits: DecodeLimits = DEFAULT_LIMITS) -> list[Decoded]:
    """The readings of one message; raises ``DecodeError`` with a stable code and a specific detail."""
    size = len(payload)
    if size > limits.max_payload_bytes:
        raise DecodeError("too_large", f"payload is {size:,} bytes, limit {limits.max_payload_bytes:,}")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(
            "not_utf8",
            f"payload is not valid UTF-8: byte {exc.start} (0x{payload[exc.start]:02x}): {exc.reason}",
        ) from None
    doc = _parse_json(text)
    if isinstance(doc, dict):
        return [_decode_object(source, doc, received_ns, limits)]
    if isinstance(doc, int | float) and not isinstance(doc, bool):
        return [Reading(source, received_ns, {"value": _number(doc, "the payload")})]
    if isinstance(doc, bool):
        raise DecodeError("value", f"the payload is {describe_json(doc)}, not a number")
    raise DecodeError("not_object", f"payload is {describe_json(doc)}; expected a JSON object or a number")


def _parse_json(text: str) -> Any:
    try:
        # NaN/Infinity literals (which Python's json accepts) become floats here so that the value check
        # can name the field; every number is checked for finiteness, which also catches 1e999 -> inf.
        if text.startswith("\ufeff"):  # as json.loads says it (JSONDecoder.decode does not check)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _JSON.decode(text)
    except json.JSONDecodeError as exc:
        if not text.strip():
            raise DecodeError("json", "payload is empty") from None
        raise DecodeError("json", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except ValueError:
        # Python refuses to convert integer literals longer than sys.get_int_max_str_digits() (4300 by
        # default, a guard against quadratic-time parsing) with a plain ValueError, not a JSONDecodeError.
        raise DecodeError(
            "json", f"a number in the payload has more than {sys.get_int_max_str_digits():,} digits"
        ) from None
    except RecursionError:
        raise DecodeError("json", "JSON is nested too deeply") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DecodeError("shape", f"duplicate key {quote(key)}")
            seen.add(key)
    return out


# One decoder for every message (``json.loads`` with options builds a new one per call).
_JSON = json.JSONDecoder(parse_constant=float, object_pairs_hook=_unique_keys)


def _decode_object(source: Source, doc: dict[str, Any], received_ns: int, limits: DecodeLimits) -> Decoded:
    # The version first: another version may have other keys.
    if "v" in doc:
        _check_version(doc["v"])
    for key in doc:
        if key not in _ALLOWED_KEYS:
            close = difflib.get_close_matches(key, _ALLOWED_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DecodeError("shape", f"unknown key {quote(key)}{hint}; allowed keys: {_ALLOWED_LIST}")
    kinds = [key for key in _SHAPE_KEYS if key in doc]
    if not kinds:
        raise DecodeError("shape", "payload has none of 'value', 'fields', 'samples', 'data'; give exactly one")
    if len(kinds) > 1:
        raise DecodeError(
            "shape",
            f"payload has both {kinds[0]!r} and {kinds[1]!r}; give exactly one of value, fields, samples, data",
        )
    kind = kinds[0]
    allowed = _COMMON_KEYS + _SHAPE_KEYS[kind]
    for key in doc:
        if key not in allowed:
            raise DecodeError(
                "shape",
                f"key {key!r} does not apply to {_SHAPE_NAMES[kind]} (its keys: {', '.join(allowed)})",
            )

    time_ns = parse_timestamp(doc, received_ns, limits)
    seq = _seq(doc.get("seq", _MISSING))
    if kind == "value":
        return Reading(source, time_ns, {"value": _number(doc["value"], "value")}, seq)
    if kind == "fields":
        return Reading(source, time_ns, _fields(doc["fields"], limits.max_fields), seq)

    rate_hz = _rate(doc.get("rate_hz", _MISSING))
    channel = _channel(doc.get("channel", "value"))
    samples = _samples_list(doc["samples"], limits) if kind == "samples" else _samples_data(doc, limits)
    samples.flags.writeable = False  # part of a frozen record
    return SampleBlock(source, time_ns, rate_hz, samples, channel, seq)


def _check_version(v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise DecodeError("version", f"'v' must be the integer {SCHEMA_VERSION}, got {describe_json(v)}")
    if v != SCHEMA_VERSION:
        raise DecodeError(
            "version", f"payload version {quote(v)} is not supported; this agent reads version {SCHEMA_VERSION}"
        )


# --- values ---------------------------------------------------------------------------------------------


def _number(x: object, what: str) -> float:
    if type(x) is float:  # the common case first
        if math.isfinite(x):
            return x
        raise DecodeError("value", f"{what} is {non_finite_name(x)}; values must be finite")
    if isinstance(x, int) and not isinstance(x, bool):
        try:
            return float(x)
        except OverflowError:
            raise DecodeError(
                "value", f"{what} is an integer of {len(str(abs(x)))} digits, too large for a double"
            ) from None
    raise DecodeError("value", f"{what} is {describe_json(x)}, not a number")


def _fields(raw: object, max_fields: int) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise DecodeError("shape", f"'fields' must be an object of name: number, got {describe_json(raw)}")
    if not raw:
        raise DecodeError("shape", "'fields' is empty")
    if len(raw) > max_fields:
        raise DecodeError("too_many_fields", f"'fields' has {len(raw):,} fields; the limit is {max_fields:,}")
    _check_field_names(tuple(raw))
    out: dict[str, float] = {}
    for name, value in raw.items():
        # The common case inline; the error message is only built for a value that needs one.
        if type(value) is float and math.isfinite(value):
            out[name] = value
        else:
            out[name] = _number(value, f"field {quote(name)}")
    return out


@lru_cache(maxsize=4096)
def _check_field_names(names: tuple[str, ...]) -> None:
    """Raise for the first field name that cannot be stored; cached per set of names, which a source sends
    in every message (a cached call costs one lookup; a refused set raises again each time)."""
    for name in names:
        _check_name(name, "field name")
        if name in _RESERVED_FIELDS:
            raise DecodeError("shape", f"field name {name!r} is reserved")
        if name.startswith("_"):
            raise DecodeError("shape", f"field name {quote(name)} starts with '_', which InfluxDB reserves")


def _channel(raw: object) -> str:
    if not isinstance(raw, str):
        raise DecodeError("shape", f"'channel' must be a string, got {describe_json(raw)}")
    _check_name(raw, "'channel'")
    return raw


def _check_name(name: str, what: str) -> None:
    fault = _name_fault(name)
    if fault is not None:
        code, problem = fault
        raise DecodeError(code, f"{what} {problem}" if not name else f"{what} {quote(name)} {problem}")


@lru_cache(maxsize=8192)
def _name_fault(name: str) -> tuple[DecodeErrorCode, str] | None:
    """Why ``name`` is refused (error code, reason) or None; cached: a source sends the same names in every
    message, and this runs for each of them."""
    if not name:
        return "shape", "is empty"
    if len(name) > _MAX_NAME_CHARS:
        return "shape", f"is longer than {_MAX_NAME_CHARS} characters"
    if _CONTROL_CHARS.search(name):
        return "shape", "contains a control character"
    problem = schema.name_problem(name)
    if problem is not None:
        return "name", f"{problem}; InfluxDB cannot store it"
    return None


def _seq(raw: object) -> int | None:
    if raw is _MISSING:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise DecodeError("shape", f"'seq' must be an integer, got {describe_json(raw)}")
    if not _INT64_MIN <= raw <= _INT64_MAX:
        raise DecodeError("shape", f"'seq' {quote(raw)} does not fit a 64-bit integer")
    return raw


def _rate(raw: object) -> float:
    if raw is _MISSING:
        raise DecodeError("rate", "a sample block needs 'rate_hz' (samples per second)")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise DecodeError("rate", f"'rate_hz' must be a number, got {describe_json(raw)}")
    try:
        rate = float(raw)
    except OverflowError:
        rate = math.inf
    if not (math.isfinite(rate) and rate > 0):
        raise DecodeError("rate", f"'rate_hz' must be a positive finite number, got {describe_json(raw)}")
    return rate


# --- sample blocks ---------------------------------------------------------------------------------------


def _samples_list(raw: object, limits: DecodeLimits) -> np.ndarray:
    if not isinstance(raw, list):
        raise DecodeError("shape", f"'samples' must be an array of numbers, got {describe_json(raw)}")
    n = len(raw)
    if n == 0:
        raise DecodeError("shape", "'samples' is empty")
    if n > limits.max_samples:
        raise DecodeError("too_large", f"'samples' has {n:,} items, limit {limits.max_samples:,}")
    # One C-speed pass over the types: numpy would silently turn true into 1.0 and "1" into 1.0.
    if not set(map(type, raw)) <= {float, int}:
        for i, x in enumerate(raw):
            _number(x, f"samples[{i}]")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.asarray(raw, dtype=np.float32)
    except OverflowError:  # a Python int beyond a double
        for i, x in enumerate(raw):
            _number(x, f"samples[{i}]")
        raise

    def describe(i: int) -> str:
        before = float(raw[i])
        if math.isfinite(before):
            return f"= {before:g} is outside the float32 range (±3.4e38)"
        return f"is {non_finite_name(before)}; values must be finite"

    _check_finite(out, describe)
    return out


def _samples_data(doc: dict[str, Any], limits: DecodeLimits) -> np.ndarray:
    data = doc["data"]
    if not isinstance(data, str):
        raise DecodeError("encoding", f"'data' must be a base64 string, got {describe_json(data)}")
    if "encoding" not in doc:
        raise DecodeError("encoding", "'data' needs an 'encoding': one of " + ", ".join(_ENCODINGS))
    encoding = doc["encoding"]
    if not isinstance(encoding, str):
        raise DecodeError("encoding", f"'encoding' must be a string, got {describe_json(encoding)}")
    if encoding not in _ENCODINGS:
        raise DecodeError("encoding", f"unknown encoding {quote(encoding)}; known encodings: {', '.join(_ENCODINGS)}")
    scale = _scale(doc) if encoding == "i16le" else None
    if scale is None and "scale" in doc:
        raise DecodeError("encoding", f"'scale' applies only to encoding 'i16le', not {encoding!r}")
    try:
        raw = pybase64.b64decode(data, validate=True)  # SIMD: a block's data in ~1 us (the stdlib: ~40 us)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError("encoding", f"'data' is not valid base64 (standard alphabet, padded): {exc}") from None
    dtype = np.dtype(_ENCODINGS[encoding])
    if not raw:
        raise DecodeError("shape", "'data' is empty")
    if len(raw) % dtype.itemsize:
        raise DecodeError(
            "encoding",
            f"'data' decodes to {len(raw):,} bytes, not a multiple of {dtype.itemsize} ({encoding})",
        )
    n = len(raw) // dtype.itemsize
    if n > limits.max_samples:
        raise DecodeError("too_large", f"'data' holds {n:,} samples, limit {limits.max_samples:,}")
    values = np.frombuffer(raw, dtype=dtype)
    if scale is None:
        out = values.astype(np.float32)  # a copy in native byte order
        _check_finite(out, _non_finite_sample(out))
        return out
    # int16 -> float64 (exact), times scale, one rounding to float32.
    with np.errstate(over="ignore"):
        out = (values.astype(np.float64) * scale).astype(np.float32)
    _check_finite(out, lambda i: f"= {int(values[i])} × scale {scale:g} is outside the float32 range (±3.4e38)")
    return out


def _scale(doc: dict[str, Any]) -> float:
    if "scale" not in doc:
        raise DecodeError("encoding", "encoding 'i16le' needs 'scale' (sample = int16 value × scale)")
    raw = doc["scale"]
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise DecodeError("encoding", f"'scale' must be a number, got {describe_json(raw)}")
    try:
        scale = float(raw)
    except OverflowError:
        scale = math.inf
    if not (math.isfinite(scale) and scale > 0):
        raise DecodeError("encoding", f"'scale' must be a positive finite number, got {describe_json(raw)}")
    return scale


def _check_finite(out: np.ndarray, describe: Callable[[int], str]) -> None:
    finite = np.isfinite(out)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise DecodeError("value", f"samples[{i}] {describe(i)}")


def _non_finite_sample(out: np.ndarray) -> Callable[[int], str]:
    return lambda i: f"is {non_finite_name(float(out[i]))}; values must be finite"


# --- messages --------------------------------------------------------------------------------------------


class JsonV1Decoder:
    """``mqtt.decoder.type: json_v1``: tags from the topic template, records from the JSON payload."""

    def __init__(self, context: DecoderContext) -> None:
        self._template = context.topic_template
        self._limits = context.limits
        self._field_keys = context.field_keys
        # By default wider than the template (``factory/#``): wrong topics arrive and are dead-lettered.
        self._subscriptions = context.subscriptions or (context.topic_template.catch_all(context.outbound_base),)

    def subscriptions(self) -> tuple[str, ...]:
        return self._subscriptions

    def decode(self, message: Message) -> list[Decoded]:
        source = self._template.match(message.topic)
        items = decode(source, message.payload, message.received_ns, self._limits)
        if self._field_keys is not None:
            for item in items:
                if isinstance(item, Reading):
                    self._field_keys.admit(source.machine, item.fields)
        return items
