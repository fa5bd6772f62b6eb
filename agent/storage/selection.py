"""What an upstream sink gets of the spool: a *selection* of measurements, and readings downsampled.

The local sink writes every entry at full resolution (``agent.storage.entries.entry_lines``). An upstream
sink (``storage.upstreams``) writes only what its selection names:

- the agent's own points (``LINES`` entries) by measurement kind: ``features``, ``scores`` (anomaly
  scores and defect classes), ``alerts``, ``alert_commands``, ``heartbeat`` (the ``agent`` point);
- ``readings``: every reading (``interval_s: 0``), or per series and interval one point of
  ``<field>_mean``/``_min``/``_max``/``_last`` and ``n`` (the readings in it), stamped at the bucket's start;
- raw vibration: ``none``, ``around_alerts`` (the blocks an alert released) or ``all`` (also the blocks
  the local sink stores as they arrive).

Downsampling is exact and deterministic. A series' bucket is emitted once, complete: when a reading of
that series falls in a later bucket, or when the newest reading time seen (of any series, in spool order)
has passed the bucket's end by ``grace_s``. A series' readings are taken in time order: one not newer than
the newest of its series (a redelivered message, a reading out of order, one for a bucket already emitted)
is *late*: counted (``sink.late_readings``), not aggregated, so a redelivery never counts a reading twice.
The open buckets are the selector's ``state``, which the writer saves in the same transaction as the
sink's cursor (``SinkCursor.advance``), so a restart resumes with exactly the aggregates of the rows before
the cursor and a redelivered batch carries the same points (the upstream overwrites a point with the same
series and timestamp: idempotent).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from agent import schema
from agent.spool.codec import Kind, decode_block, readings_parts
from agent.storage.entries import ResolveBlocks, entry_lines, readings_lines
from agent.storage.line_protocol import escape_key, escape_measurement, format_tags
from agent.storage.points import block_lines

logger = logging.getLogger(__name__)

PointKind = Literal["features", "scores", "alerts", "alert_commands", "heartbeat"]
POINT_KINDS: tuple[PointKind, ...] = get_args(PointKind)
MEASUREMENT_KINDS: dict[str, tuple[str, ...]] = {
    "features": (schema.FEATURES,),
    "scores": (schema.SCORE, schema.DEFECT),
    "alerts": (schema.ALERT,),
    "alert_commands": (schema.ALERT_COMMAND,),
    "heartbeat": (schema.AGENT,),
}
"""Selection names of the agent's own points and the measurements each one covers."""

Aggregate = Literal["mean", "min", "max", "last"]
AGGREGATES: tuple[Aggregate, ...] = get_args(Aggregate)
RawSelection = Literal["none", "around_alerts", "all"]
STATE_VERSION = 2


@dataclass(frozen=True)
class Selection:
    """An upstream's selection (``storage.upstreams[].select``), as the writer applies it (picklable)."""

    kinds: frozenset[str] = frozenset(MEASUREMENT_KINDS)
    readings_interval_s: float | None = 60.0
    """None: no readings; 0: every reading; > 0: one aggregate point per series and interval."""
    aggregates: tuple[Aggregate, ...] = AGGREGATES
    grace_s: float = 60.0
    raw: RawSelection = "around_alerts"

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(MEASUREMENT_KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; known: {', '.join(MEASUREMENT_KINDS)}")
        if self.readings_interval_s is not None and self.readings_interval_s < 0:
            raise ValueError(f"readings_interval_s must be >= 0, not {self.readings_interval_s}")
        if not self.aggregates or set(self.aggregates) - set(AGGREGATES):
            raise ValueError(f"aggregates must be some of {', '.join(AGGREGATES)}, not {list(self.aggregates)}")

    @property
    def measurements(self) -> frozenset[str]:
        return frozenset(m for kind in self.kinds for m in MEASUREMENT_KINDS[kind])

    def fingerprint(self) -> str:
        """What the saved state depends on: a state of another interval or aggregate set is not resumed."""
        return f"v{STATE_VERSION}:{self.readings_interval_s}:{','.join(self.aggregates)}:{self.grace_s}"


def measurement_of(line: str) -> str:
    r"""The measurement of a line of line protocol (up to the first unescaped comma or space).

    >>> measurement_of("anomaly_score,machine=m1 score=1 5"), measurement_of(r"a\ b,t=1 v=1 1")
    ('anomaly_score', 'a b')
    """
    out = []
    escaped = False
    for char in line:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in ", ":
            break
        else:
            out.append(char)
    return "".join(out)


@dataclass
class _Bucket:
    index: int
    n: int = 0
    fields: dict[str, list[float]] = field(default_factory=dict)
    """Per field: count, sum, min, max, last."""

    def add(self, names: Iterable[str], values: Iterable[float]) -> None:
        self.n += 1
        for name, value in zip(names, values, strict=True):
            acc = self.fields.get(name)
            if acc is None:
                self.fields[name] = [1.0, value, value, value, value]
            else:
                acc[0] += 1.0
                acc[1] += value
                acc[2] = min(acc[2], value)
                acc[3] = max(acc[3], value)
                acc[4] = value


class Downsampler:
    """Readings in, one aggregate point per series and bucket out (see the module docstring)."""

    def __init__(self, interval_s: float, aggregates: tuple[Aggregate, ...], grace_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s}")
        self.interval_ns = round(interval_s * 1e9)
        self.grace_ns = round(grace_s * 1e9)
        self.aggregates = aggregates
        self.late = 0
        """Readings for a bucket already emitted (counted by the writer, then reset)."""
        self._open: dict[tuple[str, ...], _Bucket] = {}
        self._newest: dict[tuple[str, ...], int] = {}  # per series, the newest reading time taken
        self._watermark_ns: int | None = None

    def add_entry(self, body: bytes) -> list[str]:
        """Feed one ``READINGS`` entry; the lines of the buckets it completed.

        ``ValueError`` for a non-finite value, before anything is changed (the writer dead-letters the row)."""
        shapes, times, _seqs, values = readings_parts(body)
        for value in values:
            if not math.isfinite(value):
                raise ValueError(f"non-finite reading value {value}")
        out: list[str] = []
        at = 0
        for (flat, names, _has_seq), time_ns in zip(shapes, times, strict=True):
            row = values[at : at + len(names)]
            at += len(names)
            keep = [i for i, name in enumerate(names) if name != schema.READING_SEQ_FIELD]
            series = tuple(flat)
            index = time_ns // self.interval_ns
            newest = self._newest.get(series)
            if newest is not None and time_ns <= newest:
                self.late += 1
                continue
            self._newest[series] = time_ns
            bucket = self._open.get(series)
            if bucket is not None and index > bucket.index:
                out.append(self._emit(series, bucket))
                bucket = None
            if bucket is None:
                bucket = self._open[series] = _Bucket(index)
            bucket.add([names[i] for i in keep], [row[i] for i in keep])
            self._watermark_ns = time_ns if self._watermark_ns is None else max(self._watermark_ns, time_ns)
        if self._watermark_ns is not None:
            due = self._watermark_ns - self.grace_ns
            for series, bucket in list(self._open.items()):
                if (bucket.index + 1) * self.interval_ns <= due:
                    out.append(self._emit(series, bucket))
        return out

    def _emit(self, series: tuple[str, ...], bucket: _Bucket) -> str:
        del self._open[series]
        tags = dict(zip(series[::2], series[1::2], strict=True))
        parts: list[str] = []
        for name in sorted(bucket.fields):
            count, total, low, high, last = bucket.fields[name]
            values = {"mean": total / count, "min": low, "max": high, "last": last}
            parts.extend(f"{escape_key(f'{name}_{agg}')}={values[agg]!r}" for agg in self.aggregates)
        parts.append(f"n={bucket.n}i")
        head = f"{escape_measurement(schema.READING)}{format_tags(tags)}"
        return f"{head} {','.join(parts)} {bucket.index * self.interval_ns}"

    def state(self) -> dict[str, Any]:
        return {
            "open": [[list(s), b.index, b.n, b.fields] for s, b in self._open.items()],
            "newest": [[list(s), t] for s, t in self._newest.items()],
            "watermark_ns": self._watermark_ns,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._open = {
            tuple(s): _Bucket(int(i), int(n), {k: [float(x) for x in v] for k, v in f.items()})
            for s, i, n, f in state["open"]
        }
        self._newest = {tuple(s): int(t) for s, t in state["newest"]}
        wm = state["watermark_ns"]
        self._watermark_ns = None if wm is None else int(wm)


class RowSelector:
    """An upstream's view of spool entries: ``lines`` for one entry, ``state``/``restore`` for its buckets.

    Used by the writer's preparing thread only (not thread-safe)."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        self._measurements = selection.measurements
        interval = selection.readings_interval_s
        self.downsampler = Downsampler(interval, selection.aggregates, selection.grace_s) if interval else None

    def lines(self, kind: int, body: bytes, resolve: ResolveBlocks | None = None) -> list[str]:
        """The lines of one entry this selection wants (``ValueError`` for what can never be written)."""
        sel = self.selection
        if kind == Kind.LINES:
            return [line for line in entry_lines(kind, body) if measurement_of(line) in self._measurements]
        if kind == Kind.FEATURES:
            return entry_lines(kind, body) if schema.FEATURES in self._measurements else []
        if kind == Kind.READINGS:
            if sel.readings_interval_s is None:
                return []
            if self.downsampler is None:
                return readings_lines(body)
            return self.downsampler.add_entry(body)
        if kind == Kind.BLOCK:
            if sel.raw != "all":
                return []
            block, store_raw = decode_block(body)
            return block_lines(block) if store_raw else []
        if kind in (Kind.RAW_BLOCKS, Kind.RAW_REF):
            return entry_lines(kind, body, resolve) if sel.raw != "none" else []
        raise ValueError(f"unknown spool entry kind {kind}")

    def take_late(self) -> int:
        """Late readings since the last call (for the writer's counter)."""
        if self.downsampler is None:
            return 0
        late, self.downsampler.late = self.downsampler.late, 0
        return late

    def state(self) -> bytes | None:
        """The open buckets, to be saved with the cursor; None without downsampling."""
        if self.downsampler is None:
            return None
        return json.dumps({"fingerprint": self.selection.fingerprint(), **self.downsampler.state()}).encode()

    def restore(self, state: bytes | None, sink: str) -> None:
        """Resume with the state saved with the cursor; a state of another selection is not resumed (logged)."""
        if self.downsampler is None or not state:
            return
        parsed = json.loads(state)
        if parsed.get("fingerprint") != self.selection.fingerprint():
            logger.warning(
                "sink %s: its downsampling changed (%s, was %s); the open buckets start afresh",
                sink,
                self.selection.fingerprint(),
                parsed.get("fingerprint"),
            )
            return
        self.downsampler.restore(parsed)
