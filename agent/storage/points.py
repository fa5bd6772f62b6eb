"""Records to line protocol, with the names of ``agent.schema`` (pure), and the raw vibration policy.

Every function returns a list of lines (no trailing newlines) and raises ``ValueError`` when a record
cannot be written (a non-finite value, an empty name); the caller counts and reports that.
Source tags come first and the stage's own tags (``channel``, ``model_id``, ``model_version``,
``state``) override a source tag of the same name, so a line never carries a tag key twice.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Literal, get_args

import numpy as np

from agent import schema
from agent.records import NS_PER_S, Alert, FeatureVector, Reading, SampleBlock, Score, Source, Window
from agent.spool.codec import FeatureRows
from agent.storage.line_protocol import (
    INT64_MAX,
    INT64_MIN,
    FieldValue,
    escape_key,
    escape_measurement,
    format_point,
    format_tags,
)


def _tags(source: Source, **extra: str) -> dict[str, str]:
    tags = dict(source.tags)
    tags.update(extra)
    return tags


def reading_lines(r: Reading) -> list[str]:
    """One ``reading`` point: the source tags, the reading's fields, and ``seq`` (int) when present."""
    fields: dict[str, FieldValue] = dict(r.fields)
    if r.seq is not None:
        fields[schema.READING_SEQ_FIELD] = int(r.seq)
    return [format_point(schema.READING, dict(r.source.tags), fields, r.time_ns)]


def sample_times_ns(b: SampleBlock) -> np.ndarray:
    """int64 ``(n,)``: time of each sample, rounded to the nanosecond exactly as ``SampleBlock.end_ns``."""
    offsets = np.arange(len(b.samples), dtype=np.float64) * NS_PER_S / b.rate_hz
    return np.round(offsets).astype(np.int64) + np.int64(b.start_ns)


def block_lines(b: SampleBlock) -> list[str]:
    """One ``vibration`` point per sample, tagged with the channel (the hot path: vectorized formatting)."""
    samples = np.asarray(b.samples)
    if samples.ndim != 1:
        raise ValueError(f"samples must have shape (n,), not {samples.shape}")
    finite = np.isfinite(samples)
    if not finite.all():
        raise ValueError(f"block of {b.source.as_dict()} has {int((~finite).sum())} non-finite samples")
    tags = format_tags(_tags(b.source, **{schema.TAG_CHANNEL: b.channel}))
    prefix = f"{escape_measurement(schema.VIBRATION)}{tags} {escape_key(schema.VIBRATION_FIELD)}="
    # astype(str) gives the shortest repr of each float32 ("0.1", not "0.10000000149011612").
    values = samples.astype(str).tolist()
    times = sample_times_ns(b).tolist()
    return [f"{prefix}{v} {t}" for v, t in zip(values, times, strict=True)]


def _model_tags(source: Source, model_id: str, model_version: str, **extra: str) -> dict[str, str]:
    return _tags(source, **{schema.TAG_MODEL_ID: model_id, schema.TAG_MODEL_VERSION: model_version}, **extra)


def feature_lines(fv: FeatureVector, model_id: str, model_version: str) -> list[str]:
    """One ``features`` point at the window's end: one float field per feature name."""
    values = np.asarray(fv.values)
    if values.shape != (len(fv.names),):
        raise ValueError(f"{len(fv.names)} feature names but values of shape {values.shape}")
    # Via the shortest float32 repr: 0.1 is stored as 0.1, not as 0.10000000149011612.
    if values.dtype == np.float32:
        floats = [float(v) for v in values.astype(str)]
    else:
        floats = values.astype(np.float64).tolist()
    fields: Mapping[str, FieldValue] = dict(zip(fv.names, floats, strict=True))
    tags = _model_tags(fv.window.source, model_id, model_version)
    return [format_point(schema.FEATURES, tags, fields, fv.window.end_ns)]


def feature_rows_lines(rows: FeatureRows) -> list[str]:
    """The ``features`` points of a ``FEATURES`` spool entry, as ``feature_lines`` makes them one by one.

    Vectorised for the writer: numpy formats every value of the batch at once (shortest repr of the values'
    own dtype, as ``feature_lines`` does), each distinct source's tags are formatted once.
    """
    values = rows.values
    if values.size and not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise ValueError(f"features of row {bad} are not all finite: {values[bad].tolist()}")
    head = escape_measurement(schema.FEATURES)
    tags = [format_tags(_model_tags(src, rows.model_id, rows.model_version)) for src in rows.sources]
    keys = [f"{escape_key(name)}=" for name in rows.names]
    if not keys:
        raise ValueError("a point needs at least one field")
    if values.dtype == np.float32:
        # The shortest float32 repr read as a float64, then float64's repr, which is Python's (the two dtypes
        # switch to exponents at different magnitudes): what feature_lines writes, with no per-value Python.
        values = values.astype(str).astype(np.float64)
    text = values.astype(str).tolist()
    times = rows.end_ns.tolist()
    return [
        f"{head}{tags[src]} {','.join(k + v for k, v in zip(keys, row, strict=True))} {t}"
        for src, row, t in zip(rows.rows, text, times, strict=True)
    ]


_SCORE_HEADS: dict[tuple[Source, str, str, str | None], str] = {}
_SCORE_HEADS_MAX = 100_000  # a plant's sources x model versions x adapters; cleared when full


def _score_head(s: Score) -> str:
    """Measurement, tags and the first field key of a score's line, remembered per source, model version and
    adapter: every window of a source repeats them (formatting them took most of a score line's time)."""
    key = (s.source, s.model_id, s.model_version, s.adapter)
    head = _SCORE_HEADS.get(key)
    if head is None:
        extra = {} if s.adapter is None else {schema.TAG_ADAPTER: s.adapter}
        tags = format_tags(_model_tags(s.source, s.model_id, s.model_version, **extra))
        head = f"{escape_measurement(schema.SCORE)}{tags} {escape_key(schema.SCORE_FIELD)}="
        if len(_SCORE_HEADS) >= _SCORE_HEADS_MAX:
            _SCORE_HEADS.clear()
        _SCORE_HEADS[key] = head
    return head


_SCORE_TAIL = (
    f",{escape_key(schema.THRESHOLD_FIELD)}={{}},{escape_key(schema.ANOMALOUS_FIELD)}={{}}"
    f",{escape_key(schema.WINDOW_START_FIELD)}={{}}i {{}}"
)


def score_lines(s: Score) -> list[str]:
    """One ``anomaly_score`` point at the window's end: score, threshold, anomalous, window start
    (what ``format_point`` makes of them, with the line's head formatted once per source)."""
    score, threshold, start_ns = float(s.score), float(s.threshold), int(s.start_ns)
    for key, value in ((schema.SCORE_FIELD, score), (schema.THRESHOLD_FIELD, threshold)):
        if not math.isfinite(value):
            raise ValueError(f"field {key!r}: non-finite float {value}")
    if not INT64_MIN <= start_ns <= INT64_MAX:
        raise ValueError(f"field {schema.WINDOW_START_FIELD!r}: integer {start_ns} does not fit in int64")
    anomalous = "true" if score > threshold else "false"
    return [_score_head(s) + repr(score) + _SCORE_TAIL.format(repr(threshold), anomalous, start_ns, int(s.end_ns))]


def alert_lines(a: Alert) -> list[str]:
    """One ``alert`` point per lifecycle message at its decision time (silenced ones too, flagged)."""
    fields: dict[str, FieldValue] = {
        schema.ALERT_SCORE_FIELD: float(a.score),
        schema.ALERT_THRESHOLD_FIELD: float(a.threshold),
        schema.ALERT_EVENT_FIELD: a.event_id,
        schema.ALERT_SEQ_FIELD: int(a.seq),
        schema.ALERT_ACTIVE_FIELD: 0 if a.state == "clear" else 1,
        schema.ALERT_ACKED_FIELD: 0 if a.acknowledged_by is None else 1,
        schema.ALERT_SILENCED_FIELD: int(a.silenced),
        schema.ALERT_FLAPPING_FIELD: int(a.flapping),
    }
    if a.defect is not None:
        fields[schema.ALERT_DEFECT_FIELD] = str(a.defect["defect"])
    tags = _model_tags(
        a.source,
        a.model_id,
        a.model_version,
        **{schema.ALERT_STATE_TAG: a.state, schema.ALERT_TYPE_TAG: a.alert_type, schema.ALERT_SEVERITY_TAG: a.severity},
    )
    return [format_point(schema.ALERT, tags, fields, a.time_ns)]


def command_lines(command: str, accepted: bool, by: str, detail: str, machine: str | None, time_ns: int) -> list[str]:
    """One ``alert_command`` point per operator command, accepted or rejected, with what it did or why not."""
    tags = {schema.COMMAND_TAG: command or "invalid", schema.COMMAND_RESULT_TAG: "accepted" if accepted else "rejected"}
    if machine:
        tags["machine"] = machine
    fields: dict[str, FieldValue] = {schema.COMMAND_BY_FIELD: by or "unknown", schema.COMMAND_DETAIL_FIELD: detail}
    return [format_point(schema.ALERT_COMMAND, tags, fields, time_ns)]


def defect_lines(
    window: Window, model_id: str, model_version: str, class_name: str, probabilities: Mapping[str, float]
) -> list[str]:
    """One ``defect`` point at the window's end: the class as a tag, its probability and one per class."""
    fields: dict[str, FieldValue] = {schema.DEFECT_PROBABILITY_FIELD: float(probabilities[class_name])}
    fields.update({f"{schema.DEFECT_PROBABILITY_PREFIX}{name}": float(p) for name, p in probabilities.items()})
    tags = _model_tags(window.source, model_id, model_version, **{schema.DEFECT_CLASS_TAG: class_name})
    return [format_point(schema.DEFECT, tags, fields, window.end_ns)]


RawMode = Literal["all", "every_n", "around_alerts", "none"]
RAW_MODES: tuple[str, ...] = get_args(RawMode)
RawDecision = Literal["store", "hold", "skip"]


class RawVibrationPolicy:
    """Which raw vibration blocks to store (pure, stateful per source and channel; thread-safe).

    - ``all``: every block; ``none``: no block;
    - ``every_n``: the first block of each source/channel and then every ``every_n``-th;
    - ``around_alerts``: the last ``keep_blocks`` blocks of each source/channel are *held* in memory, as
      decoded (``hold``: a reference, no copy). ``on_alert(source)`` hands over those of the last ``hold_s``
      seconds, which the ingest worker spools as one release, and the next ``keep_blocks`` blocks of that
      source are stored too, so an alert comes with raw data from before and after it. Nothing is copied
      or formatted on the alert's path, and a block no alert wants never reaches the disk.

    Held blocks are not yet accepted data: the spool has the block's features and scores, and its raw
    samples only if an alert wants them; a restart forgets the held blocks (no alert of the new run can
    want them: its windows start afresh). Memory is bounded three ways: ``keep_blocks`` blocks per source
    and channel; ``max_bytes`` of samples in all (beyond it the blocks held longest go first, counted by
    the caller from what ``hold`` returns), so that a flood of new channels cannot fill the box; and a
    source that went quiet gives its blocks up after ``hold_s`` (``expire``).

    ``decide`` and ``hold`` are called by the ingest worker for each block, ``on_alert`` by the alert
    stage when an alert is raised (possibly from another thread).
    """

    def __init__(
        self,
        mode: RawMode,
        every_n: int = 1,
        keep_blocks: int = 0,
        hold_s: float = 120.0,
        max_bytes: int = 64 * 1024**2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in RAW_MODES:
            raise ValueError(f"raw vibration mode {mode!r} is not one of {', '.join(RAW_MODES)}")
        if every_n < 1:
            raise ValueError(f"every_n must be >= 1, not {every_n}")
        if keep_blocks < 0 or (mode == "around_alerts" and keep_blocks < 1):
            raise ValueError(f"keep_blocks must be >= 1 for around_alerts, >= 0 otherwise, not {keep_blocks}")
        if hold_s <= 0:
            raise ValueError(f"hold_s must be > 0, not {hold_s}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, not {max_bytes}")
        self.mode = mode
        self.every_n = every_n
        self.keep_blocks = keep_blocks
        self.hold_s = hold_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._count: dict[tuple[Source, str], int] = {}
        self._after: dict[tuple[Source, str], int] = {}
        # Every held block by hold number, in the order held (= by time held): the oldest is the first.
        self._held: OrderedDict[int, tuple[tuple[Source, str], float, SampleBlock]] = OrderedDict()
        self._ring: dict[tuple[Source, str], deque[int]] = {}  # per source/channel its held blocks' numbers
        self._held_n = 0
        self._bytes = 0

    def decide(self, block: SampleBlock) -> RawDecision:
        """``store`` its samples now, ``hold`` it (keep it for a possible alert), or ``skip`` it."""
        if self.mode == "all":
            return "store"
        if self.mode == "none":
            return "skip"
        key = (block.source, block.channel)
        with self._lock:
            if self.mode == "every_n":
                count = self._count.get(key, 0)
                self._count[key] = count + 1
                return "store" if count % self.every_n == 0 else "skip"
            # around_alerts
            if self._after.get(key, 0) > 0:
                self._after[key] -= 1
                return "store"
            if key not in self._ring:  # known to on_alert even if none of its blocks gets held
                self._ring[key] = deque()
            return "hold"

    def hold(self, block: SampleBlock) -> int:
        """Keep ``block`` (a ``hold`` decision) in its source's ring, the oldest one leaving a full ring;
        returns how many held blocks were given up to stay within ``max_bytes`` (the longest held first)."""
        key = (block.source, block.channel)
        now = self._clock()
        with self._lock:
            ring = self._ring.get(key)
            if ring is None:
                ring = self._ring[key] = deque()
            if len(ring) == self.keep_blocks:
                self._forget(ring.popleft())
            self._held_n += 1
            ring.append(self._held_n)
            self._held[self._held_n] = (key, now, block)
            self._bytes += block.samples.nbytes
            evicted = 0
            while self._bytes > self.max_bytes:
                self._forget_oldest()
                evicted += 1
            return evicted

    def on_alert(self, source: Source) -> list[SampleBlock]:
        """An alert was raised for ``source``: its held blocks of the last ``hold_s`` (every channel's, in
        the order they were held), to store now; the next ``keep_blocks`` blocks of each channel are stored
        too."""
        if self.mode != "around_alerts":
            return []
        cutoff = self._clock() - self.hold_s
        released: list[tuple[int, float, SampleBlock]] = []
        with self._lock:
            for key, ring in self._ring.items():
                if key[0] == source:
                    for number in ring:
                        _, held_at, block = self._forget(number)
                        released.append((number, held_at, block))
                    ring.clear()
                    self._after[key] = self.keep_blocks
        return [block for _, held_at, block in sorted(released, key=lambda held: held[0]) if held_at >= cutoff]

    def expire(self) -> int:
        """Give up the held blocks older than ``hold_s`` (a source that went quiet), and forget the sources
        that have nothing held and nothing to store; returns how many blocks went."""
        cutoff = self._clock() - self.hold_s
        dropped = 0
        with self._lock:
            while self._held and next(iter(self._held.values()))[1] < cutoff:
                self._forget_oldest()
                dropped += 1
            for key in [key for key, ring in self._ring.items() if not ring and not self._after.get(key)]:
                del self._ring[key]  # decide() makes it again if the source comes back
                self._after.pop(key, None)
        return dropped

    def held(self) -> tuple[int, int]:
        """The blocks held now and their samples' bytes."""
        with self._lock:
            return len(self._held), self._bytes

    def _forget(self, number: int) -> tuple[tuple[Source, str], float, SampleBlock]:
        """Held block ``number`` leaves the index (call with the lock held; its ring is the caller's)."""
        held = self._held.pop(number)
        self._bytes -= held[2].samples.nbytes
        return held

    def _forget_oldest(self) -> None:
        """The block held longest leaves, from the index and from its ring (where it is the first)."""
        number = next(iter(self._held))
        key = self._forget(number)[0]
        self._ring[key].popleft()
