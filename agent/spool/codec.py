"""The spool's entries: what arrived, in a compact binary form, and the line protocol made from them.

One entry per accepted message's readings, per vibration block, per batch of points the agent itself
produced (features, scores, alerts: already line protocol), or per raw-data release (the spool ids of
held blocks to store after all). Entries are encoded on the ingest side (cheap: ``struct`` and the
block's float32 bytes as they are) and turned into line protocol on the writer side (``entry_lines``),
so the ingest thread never formats a sample.

Layout (little-endian; ``str`` = ``u16`` byte length + UTF-8; ``tags`` = ``u8`` count + key/value strs):

- ``READINGS``: ``u16`` count, then per reading: tags, ``i64`` time_ns, ``u8`` has_seq, [``i64`` seq],
  ``u16`` field count, the field names (strs), then the values as ``f64``;
- ``BLOCK``: ``i64`` start_ns, ``f64`` rate_hz, ``i64`` seq, ``u8`` flags (1 = store raw, 2 = has seq),
  tags, channel (str), then the samples as float32 up to the end;
- ``LINES``: line protocol lines joined by newlines (UTF-8);
- ``RAW_REF``: ``u32`` count and the ``i64`` spool ids of held blocks whose raw samples are now wanted.

The format is the spool file's: a change of it needs a new kind number, never a reinterpretation.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from agent.records import Reading, SampleBlock, Source
from agent.storage.points import block_lines, reading_lines


class Kind(IntEnum):
    READINGS = 1
    BLOCK = 2
    LINES = 3
    RAW_REF = 4


STORE_RAW = 1
HAS_SEQ = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One spool row to be: ``points`` is how many line-protocol points it will give a sink (0 for a held
    block or a reference: their points are counted when written); ``held``: a block kept for a possible
    raw-data release (``around_alerts``)."""

    kind: Kind
    body: bytes
    points: int
    held: bool = False


_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_READING_HEAD = struct.Struct("<qB")
_I64 = struct.Struct("<q")
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


def encode_readings(readings: Sequence[Reading]) -> Entry:
    """The readings of one message as one entry."""
    if len(readings) > 0xFFFF:
        raise ValueError(f"{len(readings)} readings in one entry: at most 65535")
    out: list[bytes] = [_U16.pack(len(readings))]
    for r in readings:
        _put_tags(out, r.source)
        names = list(r.fields)
        if len(names) > 0xFFFF:
            raise ValueError(f"{len(names)} fields in one reading: the spool takes at most 65535")
        try:
            out.append(_READING_HEAD.pack(r.time_ns, r.seq is not None))
            if r.seq is not None:
                out.append(_I64.pack(r.seq))
        except struct.error as exc:  # a time or seq beyond int64 (a decoder plug-in's)
            raise ValueError(f"reading time {r.time_ns} or seq {r.seq}: {exc}") from None
        out.append(_U16.pack(len(names)))
        for name in names:
            _put_str(out, name)
        out.append(np.fromiter((r.fields[n] for n in names), dtype="<f8", count=len(names)).tobytes())
    return Entry(Kind.READINGS, b"".join(out), len(readings))


def decode_readings(body: bytes) -> list[Reading]:
    reader = _Reader(body)
    readings = []
    for _ in range(reader.int(_U16)):
        source = reader.tags()
        time_ns, has_seq = reader.unpack(_READING_HEAD)
        seq = reader.int(_I64) if has_seq else None
        names = [reader.str() for _ in range(reader.int(_U16))]
        values = np.frombuffer(body, dtype="<f8", count=len(names), offset=reader.pos).tolist()
        reader.pos += 8 * len(names)
        readings.append(Reading(source, int(time_ns), dict(zip(names, values, strict=True)), seq))
    return readings


def encode_block(block: SampleBlock, store_raw: bool, held: bool = False) -> Entry:
    """One vibration block; ``store_raw``: its samples go to the sinks (else only if released later)."""
    flags = (STORE_RAW if store_raw else 0) | (HAS_SEQ if block.seq is not None else 0)
    try:
        out: list[bytes] = [_BLOCK_HEAD.pack(block.start_ns, block.rate_hz, block.seq or 0, flags)]
    except struct.error as exc:  # a time or seq beyond int64 (a decoder plug-in's)
        raise ValueError(f"block start {block.start_ns} or seq {block.seq}: {exc}") from None
    _put_tags(out, block.source)
    _put_str(out, block.channel)
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


def encode_raw_ref(ids: Sequence[int]) -> Entry:
    """A release of held blocks: their raw samples are to be stored after all."""
    return Entry(Kind.RAW_REF, _U32.pack(len(ids)) + np.asarray(ids, dtype="<i8").tobytes(), 0)


def decode_raw_ref(body: bytes) -> list[int]:
    (count,) = _U32.unpack_from(body)
    return [int(i) for i in np.frombuffer(body, dtype="<i8", count=count, offset=_U32.size)]


ResolveBlocks = Callable[[Sequence[int]], list[bytes]]
"""Finds the bodies of held blocks by spool id (``agent.spool.sqlite.Spool.bodies``)."""


def entry_lines(kind: int, body: bytes, resolve: ResolveBlocks | None = None) -> list[str]:
    """The line protocol of one entry (raises ``ValueError`` for what InfluxDB cannot hold).

    A held block gives no line; a ``RAW_REF`` gives the lines of the blocks ``resolve`` finds for its ids
    (blocks already gone are the caller's to count).
    """
    if kind == Kind.READINGS:
        return [line for r in decode_readings(body) for line in reading_lines(r)]
    if kind == Kind.BLOCK:
        block, store_raw = decode_block(body)
        return block_lines(block) if store_raw else []
    if kind == Kind.LINES:
        return body.decode().split("\n") if body else []
    if kind == Kind.RAW_REF:
        if resolve is None:
            return []
        lines: list[str] = []
        for held in resolve(decode_raw_ref(body)):
            block, _ = decode_block(held)
            lines.extend(block_lines(block))
        return lines
    raise ValueError(f"unknown spool entry kind {kind}")
