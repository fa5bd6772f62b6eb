"""Timestamps of inbound payloads: epoch seconds, epoch nanoseconds or RFC 3339 text, checked against
the arrival time. Pure; shared by the payload decoders (``json_v1``, and any decoder with the same keys)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Final

from agent.decode.base import DecodeLimits
from agent.decode.errors import DecodeError, describe_json, non_finite_name, quote
from agent.records import NS_PER_S

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_RFC3339: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))?"
)


def parse_timestamp(doc: dict[str, Any], received_ns: int, limits: DecodeLimits) -> int:
    """The time of a payload from its ``ts`` or ``ts_ns`` key, else the arrival time; ``DecodeError`` if absurd."""
    if "ts" in doc and "ts_ns" in doc:
        raise DecodeError("timestamp", "payload has both 'ts' and 'ts_ns'; give one")
    if "ts_ns" in doc:
        raw = doc["ts_ns"]
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise DecodeError("timestamp", f"'ts_ns' must be an integer (epoch nanoseconds), got {describe_json(raw)}")
        ns, unit_ns = raw, 1
    elif "ts" in doc:
        raw = doc["ts"]
        if isinstance(raw, str):
            ns, unit_ns = _parse_rfc3339(raw), 0
        elif isinstance(raw, bool) or not isinstance(raw, int | float):
            raise DecodeError(
                "timestamp", f"'ts' must be epoch seconds or an RFC 3339 string, got {describe_json(raw)}"
            )
        elif isinstance(raw, float) and not math.isfinite(raw):
            raise DecodeError("timestamp", f"'ts' is {non_finite_name(raw)}")
        else:
            ns, unit_ns = _seconds_to_ns(raw), NS_PER_S
    else:
        return received_ns

    latest_ns = received_ns + int(limits.max_future_s * NS_PER_S)
    if ns < limits.min_time_ns:
        raise DecodeError(
            "timestamp",
            f"timestamp {format_time(ns)} is before {_short(format_time(limits.min_time_ns))}"
            + _unit_hint(raw, unit_ns, limits.min_time_ns, latest_ns),
        )
    if ns > latest_ns:
        raise DecodeError(
            "timestamp",
            f"timestamp {format_time(ns)} is {_seconds_text(ns - received_ns)} after its arrival "
            f"(limit {limits.max_future_s:g} s)" + _unit_hint(raw, unit_ns, limits.min_time_ns, latest_ns),
        )
    return ns


def _seconds_to_ns(seconds: int | float) -> int:
    """Epoch seconds to nanoseconds, reading a float as the decimal the publisher wrote.

    >>> _seconds_to_ns(1732575600.1)  # float arithmetic would give ...600099999744
    1732575600100000000
    """
    if isinstance(seconds, int):
        return seconds * NS_PER_S
    # repr() is the shortest decimal that reads back as the same double: the publisher's digits.
    return int((Decimal(repr(seconds)) * NS_PER_S).to_integral_value(ROUND_HALF_EVEN))


def _parse_rfc3339(text: str) -> int:
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise DecodeError("timestamp", f"'ts' {quote(text)} is not an RFC 3339 time such as '2024-11-25T23:00:00.25Z'")
    year, month, day, hour, minute, second, frac, zulu, sign, off_h, off_m = m.groups()
    if zulu is None and sign is None:
        raise DecodeError("timestamp", f"'ts' {quote(text)} has no UTC offset; add 'Z' or an offset such as '+01:00'")
    try:
        offset = timedelta(0) if zulu else timedelta(hours=int(off_h), minutes=int(off_m))
        tz = timezone(-offset if sign == "-" else offset)
        dt = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz)
    except ValueError as exc:
        raise DecodeError("timestamp", f"'ts' {quote(text)} is not a valid time: {exc}") from None
    whole_s = (dt - _EPOCH) // timedelta(seconds=1)
    frac_ns = int((frac or "")[:9].ljust(9, "0"))  # digits beyond nanoseconds are dropped
    return whole_s * NS_PER_S + frac_ns


def _unit_hint(raw: object, unit_ns: int, lo_ns: int, hi_ns: int) -> str:
    """A hint when the number would be a plausible time in another unit (ms sent as ``ts``, ...)."""
    if not unit_ns or isinstance(raw, bool) or not isinstance(raw, int | float):
        return ""
    for name, ns_per_unit in (
        ("seconds", NS_PER_S),
        ("milliseconds", 10**6),
        ("microseconds", 10**3),
        ("nanoseconds", 1),
    ):
        if ns_per_unit != unit_ns and lo_ns <= raw * ns_per_unit <= hi_ns:
            return f"; the value looks like epoch {name}"
    return ""


def format_time(ns: int) -> str:
    """RFC 3339 UTC with as many fraction digits as needed; never fails (for error messages).

    >>> format_time(946_684_800_250_000_000)
    '2000-01-01T00:00:00.25Z'
    """
    whole, frac = divmod(ns, NS_PER_S)
    try:
        dt = _EPOCH + timedelta(seconds=whole)
    except OverflowError:
        return f"{_seconds_text(ns)} since 1970"
    text = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    if frac:
        text += f".{frac:09d}".rstrip("0")
    return text + "Z"


def _seconds_text(ns: int) -> str:
    """Seconds for a message; also for integers beyond a float (a ``ts`` of hundreds of digits).

    >>> _seconds_text(-10**330)
    '-1.00e+321 s'
    """
    try:
        seconds = ns / NS_PER_S
    except OverflowError:
        return f"{Decimal(ns) / NS_PER_S:.3g} s"
    return f"{seconds:,.0f} s" if abs(seconds) < 1e9 else f"{seconds:.3g} s"


def _short(text: str) -> str:
    return text.removesuffix("T00:00:00Z")
