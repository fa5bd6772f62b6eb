"""Encode readings as inbound payloads (JSON schema v1): the inverse of ``agent.decode.json_v1``.

Pure functions used by the simulator and by tests. Timestamps are written as ``"ts_ns"`` (integer epoch
nanoseconds) because it is the only form that round-trips exactly. Keys appear in a fixed order
(``v``, ``ts_ns``, ``seq``, then the shape's keys) and the JSON is compact, so equal inputs give equal
bytes.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

SCHEMA_VERSION = 1

BlockEncoding = Literal["json", "f32le", "i16le"]
BLOCK_ENCODINGS: tuple[BlockEncoding, ...] = ("json", "f32le", "i16le")

_I16_MIN, _I16_MAX = -32768, 32767


def encode_scalar(value: float, ts_ns: int | None = None, seq: int | None = None) -> bytes:
    """``{"v":1,"ts_ns":..,"seq":..,"value":..}``; without ``ts_ns`` the agent uses the arrival time."""
    payload = _header(ts_ns, seq)
    payload["value"] = _finite("value", value)
    return _dump(payload)


def encode_fields(fields: Mapping[str, float], ts_ns: int | None = None, seq: int | None = None) -> bytes:
    """``{"v":1,"ts_ns":..,"seq":..,"fields":{name: value}}``: several values of one timestamp."""
    if not fields:
        raise ValueError("fields: at least one field is required")
    payload = _header(ts_ns, seq)
    out: dict[str, float] = {}
    for name, value in fields.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"fields: names must be non-empty strings, got {name!r}")
        out[name] = _finite(f"fields.{name}", value)
    payload["fields"] = out
    return _dump(payload)


def encode_block(
    samples: np.ndarray,
    rate_hz: float,
    ts_ns: int | None = None,
    seq: int | None = None,
    encoding: BlockEncoding = "f32le",
    scale: float | None = None,
    channel: str | None = None,
) -> bytes:
    """A block of equally spaced samples; ``ts_ns`` is the time of the first sample.

    ``samples``: shape ``(n,)``, n >= 1. ``"json"`` writes a ``samples`` list (float32 values, exact),
    ``"f32le"`` base64 of little-endian float32, ``"i16le"`` base64 of little-endian int16 with
    value = int16 * ``scale`` (required; values that do not fit in int16 are refused, not clipped).
    """
    arr = np.asarray(samples)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"samples: expected a non-empty 1-D array, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"samples: expected numbers, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("samples: values must be finite")
    payload = _header(ts_ns, seq)
    payload["rate_hz"] = _positive("rate_hz", rate_hz)
    if channel is not None:
        if not isinstance(channel, str) or not channel:
            raise ValueError(f"channel: expected a non-empty string, got {channel!r}")
        payload["channel"] = channel
    if encoding == "json":
        if scale is not None:
            raise ValueError("scale: only used with encoding i16le")
        payload["samples"] = [float(x) for x in _as_f32(arr)]
    elif encoding == "f32le":
        if scale is not None:
            raise ValueError("scale: only used with encoding i16le")
        payload["encoding"] = "f32le"
        payload["data"] = _b64(_as_f32(arr).astype("<f4").tobytes())
    elif encoding == "i16le":
        if scale is None:
            raise ValueError("scale: required with encoding i16le")
        step = _positive("scale", scale)
        counts = np.rint(arr.astype(np.float64) / step)
        if counts.min() < _I16_MIN or counts.max() > _I16_MAX:
            raise ValueError(f"samples: range [{arr.min()}, {arr.max()}] does not fit int16 with scale {step}")
        payload["encoding"] = "i16le"
        payload["scale"] = step
        payload["data"] = _b64(counts.astype("<i2").tobytes())
    else:
        raise ValueError(f"encoding: expected one of {', '.join(BLOCK_ENCODINGS)}, got {encoding!r}")
    return _dump(payload)


def _header(ts_ns: int | None, seq: int | None) -> dict[str, object]:
    payload: dict[str, object] = {"v": SCHEMA_VERSION}
    if ts_ns is not None:
        payload["ts_ns"] = _integer("ts_ns", ts_ns)
    if seq is not None:
        payload["seq"] = _integer("seq", seq)
    return payload


def _integer(name: str, value: object) -> int:
    # numpy integers are accepted (callers compute times with numpy); bool is an int subclass: refuse it.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(value)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name}: must be finite, got {out}")
    return out


def _positive(name: str, value: object) -> float:
    out = _finite(name, value)
    if out <= 0:
        raise ValueError(f"{name}: must be > 0, got {out}")
    return out


def _as_f32(arr: np.ndarray) -> np.ndarray:
    # Large float64 values would become inf in float32, which the decoder refuses: refuse them here.
    if np.max(np.abs(arr.astype(np.float64))) > np.finfo(np.float32).max:
        raise ValueError("samples: values overflow float32")
    return arr.astype(np.float32)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _dump(payload: Mapping[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
