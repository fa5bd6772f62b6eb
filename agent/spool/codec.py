"""The spool's entries: what arrived, in a compact binary form, and the line protocol made from them.

One entry per accepted message's readings, per vibration block, per batch of points the agent itself
produced (features, scores, alerts: already line protocol), or per raw-data release (the blocks an alert
wants stored after all). Entries are encoded on the ingest side (cheap: ``struct`` and the
block's float32 bytes as they are) and turned into line protocol on the writer side
(``agent.storage.entries.entry_lines``), so the ingest thread never formats a sample.

Layout (little-endian; ``str`` = ``u16`` byte length + UTF-8; ``tags`` = ``u8`` count + key/value strs):

- ``READINGS``: ``u32`` header size, the header (UTF-8 JSON: per reading its tags as a flat list, its
  field names and whether it has a seq: names need escaping rules only JSON gets right and cheaply),
  then the times (``i64`` each), the seqs (``i64``, 0 without one) and all field values (``f64``);
- ``BLOCK``: ``i64`` start_ns, ``f64`` rate_hz, ``i64`` seq, ``u8`` flags (1 = store raw, 2 = has seq),
  tags, channel (str), then the samples as float32 up to the end;
- ``LINES``: line protocol lines joined by newlines (UTF-8);
- ``RAW_REF``: ``u32`` count and the ``i64`` spool ids of held blocks whose raw samples are now wanted
  (written by earlier builds, which spooled every block of ``around_alerts`` as a held row; still read);
- ``RAW_BLOCKS``: a raw-data release: ``u32`` count, then per block a ``u32`` size and a ``BLOCK`` body
  (store raw set); the blocks an alert wants, which were held in memory until then;
- ``FEATURES``: one model's feature vectors of a scored batch: ``u32`` header size, the header (UTF-8 JSON:
  model id and version, feature names, the value dtype, the distinct sources' tags as flat lists and each
  row's index into them), then the windows' end times (``i64`` each) and the values (row-major, ``f4`` or
  ``f8``); the writer formats them, so the scoring thread never does;
- ``ARRIVAL``: never a row: the arrival time of a message without a device timestamp, which the spool
  records in its ``arrival`` table in the same transaction (``agent.spool.arrivals``): a 16-byte key, ``i64``.

The format is the spool file's: a change of it needs a new kind number, never a reinterpretation.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from agent.records import Reading, SampleBlock, Source


class Kind(IntEnum):
    READINGS = 1
    BLOCK = 2
    LINES = 3
    RAW_REF = 4
    ARRIVAL = 5
    FEATURES = 6
    RAW_BLOCKS = 7


STORE_RAW = 1
HAS_SEQ = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One spool row to be: ``points`` is how many line-protocol points it will give a sink (0 for a held
    block or a reference: their points are counted when written); ``held``: a block kept in the spool for
    a possible raw-data release (earlier builds' ``around_alerts``; the agent now holds blocks in memory,
    ``agent.storage.points.RawVibrationPolicy``, and the spool still expires or releases such rows)."""

    kind: Kind
    body: bytes
    points: int
    held: bool = False


_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_BLOCK_HEAD = struct.Struct("<qdqB")


def _put_str(out: list[bytes], text: str) -> None:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"name of {len(raw)} bytes is too long for the spool (at most 65535)")
    out.append(_U16.pack(len(raw)))
    out.append(raw)


def _put_tags(out: list[bytes], source: Source) -> None:
    if len(source.tags) > 0xFF:
        raise ValueError(f"{len(source.tags)} tags: the spool takes at most 255")
    out.append(_U8.pack(len(source.tags)))
    for key, value in source.tags:
        _put_str(out, key)
        _put_str(out, value)


_BLOCK_NAMES: dict[tuple[Source, str], bytes] = {}
_BLOCK_NAMES_MAX = 100_000  # a plant's sources x channels; cleared when full (a flood costs the cache only)


def _block_names(source: Source, channel: str) -> bytes:
    """A block's encoded tags and channel, remembered per source and channel: they repeat in every block."""
    names = _BLOCK_NAMES.get((source, channel))
    if names is None:
        out: list[bytes] = []
        _put_tags(out, source)
        _put_str(out, channel)
        names = b"".join(out)
        if len(_BLOCK_NAMES) >= _BLOCK_NAMES_MAX:
            _BLOCK_NAMES.clear()
        _BLOCK_NAMES[(source, channel)] = names
    return names


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: struct.Struct) -> tuple[int | float, ...]:
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def int(self, fmt: struct.Struct) -> int:
        return int(self.unpack(fmt)[0])

    def str(self) -> str:
        n = self.int(_U16)
        text = self.data[self.pos : self.pos + n].decode()
        self.pos += n
        return text

    def tags(self) -> Source:
        count = self.int(_U8)
        return Source(tuple((self.str(), self.str()) for _ in range(count)))


_HEADERS: dict[tuple[Source, tuple[str, ...], bool], bytes] = {}
_HEADERS_MAX = 100_000  # a plant's sources x field sets; cleared when full (a flood costs the cache only)


def _reading_header(readings: Sequence[Reading]) -> bytes:
    """The JSON header of ``readings``; a single reading's (the usual message) is remembered per source, field
    names and seq presence, which repeat in every message of a machine."""
    if len(readings) == 1:
        r = readings[0]
        key = (r.source, tuple(r.fields), r.seq is not None)
        header = _HEADERS.get(key)
        if header is None:
            if len(_HEADERS) >= _HEADERS_MAX:
                _HEADERS.clear()
            header = _HEADERS[key] = _header(readings)
        return header
    return _header(readings)


def _header(readings: Sequence[Reading]) -> bytes:
    shapes = [[[part for tag in r.source.tags for part in tag], list(r.fields), r.seq is not None] for r in readings]
    return json.dumps(shapes, ensure_ascii=False, separators=(",", ":")).encode()


_TIME_SEQ = struct.Struct("<qq")


def encode_readings(readings: Sequence[Reading]) -> Entry:
    """The readings of one message as one entry."""
    header = _reading_header(readings)
    if len(readings) == 1:  # the usual message: struct, without numpy's per-call overhead
        r = readings[0]
        fields = tuple(r.fields.values())
        try:
            times_seqs = _TIME_SEQ.pack(r.time_ns, r.seq or 0)
            packed = struct.pack(f"<{len(fields)}d", *fields)
        except struct.error as exc:  # the same refusal as numpy's below
            raise ValueError(f"a reading's time or seq does not fit in int64: {exc}") from None
        return Entry(Kind.READINGS, b"".join((_U32.pack(len(header)), header, times_seqs, packed)), 1)
    try:
        times = np.fromiter((r.time_ns for r in readings), dtype="<i8", count=len(readings))
        seqs = np.fromiter((r.seq or 0 for r in readings), dtype="<i8", count=len(readings))
    except OverflowError as exc:
        raise ValueError(f"a reading's time or seq does not fit in int64: {exc}") from None
    values = np.fromiter((v for r in readings for v in r.fields.values()), dtype="<f8")
    body = b"".join((_U32.pack(len(header)), header, times.tobytes(), seqs.tobytes(), values.tobytes()))
    return Entry(Kind.READINGS, body, len(readings))


def readings_parts(body: bytes) -> tuple[list[list[Any]], list[int], list[int], list[float]]:
    (size,) = _U32.unpack_from(body)
    shapes: list[list[Any]] = json.loads(body[_U32.size : _U32.size + size])
    n = len(shapes)
    offset = _U32.size + size
    times = np.frombuffer(body, dtype="<i8", count=n, offset=offset).tolist()
    seqs = np.frombuffer(body, dtype="<i8", count=n, offset=offset + 8 * n).tolist()
    values = np.frombuffer(body, dtype="<f8", offset=offset + 16 * n).tolist()
    return shapes, times, seqs, values


def decode_readings(body: bytes) -> list[Reading]:
    shapes, times, seqs, values = readings_parts(body)
    readings = []
    at = 0
    for (flat, names, has_seq), time_ns, seq in zip(shapes, times, seqs, strict=True):
        tags = tuple(zip(flat[::2], flat[1::2], strict=True))
        fields = dict(zip(names, values[at : at + len(names)], strict=True))
        at += len(names)
        readings.append(Reading(Source(tags), time_ns, fields, seq if has_seq else None))
    return readings


def _block_head(block: SampleBlock, flags: int) -> list[bytes]:
    try:
        head = _BLOCK_HEAD.pack(block.start_ns, block.rate_hz, block.seq or 0, flags)
    except struct.error as exc:  # a time or seq beyond int64 (a decoder plug-in's)
        raise ValueError(f"block start {block.start_ns} or seq {block.seq}: {exc}") from None
    return [head, _block_names(block.source, block.channel)]


def check_block(block: SampleBlock) -> None:
    """``ValueError`` if the spool's format cannot hold ``block`` (what ``encode_block`` would raise), without
    copying its samples: for a block held in memory, to be encoded only if an alert wants it."""
    _block_head(block, 0)


def encode_block(block: SampleBlock, store_raw: bool, held: bool = False) -> Entry:
    """One vibration block; ``store_raw``: its samples go to the sinks (else only if released later)."""
    out = _block_head(block, (STORE_RAW if store_raw else 0) | (HAS_SEQ if block.seq is not None else 0))
    samples = np.ascontiguousarray(block.samples, dtype="<f4")
    out.append(samples.tobytes())
    return Entry(Kind.BLOCK, b"".join(out), len(samples) if store_raw else 0, held=held and not store_raw)


def decode_block(body: bytes) -> tuple[SampleBlock, bool]:
    """The block and whether its raw samples are to be stored."""
    reader = _Reader(body)
    start_ns, rate_hz, seq, flags = reader.unpack(_BLOCK_HEAD)
    source = reader.tags()
    channel = reader.str()
    samples = np.frombuffer(body, dtype="<f4", offset=reader.pos)
    has_seq = int(flags) & HAS_SEQ
    block = SampleBlock(source, int(start_ns), float(rate_hz), samples, channel, int(seq) if has_seq else None)
    return block, bool(int(flags) & STORE_RAW)


def encode_lines(lines: Sequence[str]) -> Entry:
    """Points the agent produced itself (features, scores, alerts, its heartbeat), already line protocol."""
    return Entry(Kind.LINES, "\n".join(lines).encode(), len(lines))


def encode_raw_blocks(blocks: Sequence[SampleBlock]) -> Entry:
    """A release: the raw samples of ``blocks`` (held in memory until an alert wanted them) to be stored."""
    out: list[bytes] = [_U32.pack(len(blocks))]
    points = 0
    for block in blocks:
        body = encode_block(block, store_raw=True).body
        out += (_U32.pack(len(body)), body)
        points += len(block.samples)
    return Entry(Kind.RAW_BLOCKS, b"".join(out), points)


def decode_raw_blocks(body: bytes) -> list[SampleBlock]:
    (count,) = _U32.unpack_from(body)
    at = _U32.size
    blocks: list[SampleBlock] = []
    for _ in range(count):
        (size,) = _U32.unpack_from(body, at)
        at += _U32.size
        blocks.append(decode_block(body[at : at + size])[0])
        at += size
    return blocks


def encode_raw_ref(ids: Sequence[int]) -> Entry:
    """A release of held rows (by spool id; earlier builds): their raw samples are to be stored after all."""
    return Entry(Kind.RAW_REF, _U32.pack(len(ids)) + np.asarray(ids, dtype="<i8").tobytes(), 0)


def decode_raw_ref(body: bytes) -> list[int]:
    (count,) = _U32.unpack_from(body)
    return [int(i) for i in np.frombuffer(body, dtype="<i8", count=count, offset=_U32.size)]


@dataclass(frozen=True, slots=True)
class FeatureRows:
    """The contents of a ``FEATURES`` entry (``decode_features``)."""

    model_id: str
    model_version: str
    names: list[str]
    sources: list[Source]  # row i's source is sources[rows[i]]
    rows: list[int]
    end_ns: np.ndarray  # int64 (n,)
    values: np.ndarray  # float32 or float64 (n, len(names))


def encode_features(
    model_id: str,
    model_version: str,
    names: Sequence[str],
    sources: Sequence[Source],
    end_ns: Sequence[int],
    values: np.ndarray,
) -> Entry:
    """One model's feature vectors (``values`` row i: the window of ``sources[i]`` ending at ``end_ns[i]``)."""
    matrix = np.asarray(values)
    if matrix.ndim != 2 or matrix.shape != (len(sources), len(names)) or len(end_ns) != len(sources):
        raise ValueError(
            f"{len(sources)} sources, {len(end_ns)} end times and {len(names)} names, "
            f"but values of shape {matrix.shape}"
        )
    dtype = "<f4" if matrix.dtype == np.float32 else "<f8"
    index: dict[Source, int] = {}
    rows = [index.setdefault(src, len(index)) for src in sources]
    header = json.dumps(
        {
            "model": [model_id, model_version],
            "names": list(names),
            "dtype": dtype,
            "sources": [[part for tag in src.tags for part in tag] for src in index],
            "rows": rows,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    try:
        times = np.asarray(end_ns, dtype="<i8")
    except OverflowError as exc:
        raise ValueError(f"a window end does not fit in int64: {exc}") from None
    data = np.ascontiguousarray(matrix, dtype=dtype).tobytes()
    body = b"".join((_U32.pack(len(header)), header, times.tobytes(), data))
    return Entry(Kind.FEATURES, body, len(sources))


def decode_features(body: bytes) -> FeatureRows:
    (size,) = _U32.unpack_from(body)
    head = json.loads(body[_U32.size : _U32.size + size])
    n, k = len(head["rows"]), len(head["names"])
    offset = _U32.size + size
    end_ns = np.frombuffer(body, dtype="<i8", count=n, offset=offset)
    values = np.frombuffer(body, dtype=head["dtype"], count=n * k, offset=offset + 8 * n).reshape(n, k)
    sources = [Source(tuple(zip(flat[::2], flat[1::2], strict=True))) for flat in head["sources"]]
    model_id, model_version = head["model"]
    return FeatureRows(model_id, model_version, list(head["names"]), sources, list(head["rows"]), end_ns, values)
