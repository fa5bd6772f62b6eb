"""Line protocol from the spool's entries (``agent.spool.codec``): the writer's side of the log, pure.

``entry_lines`` gives the points of one entry, exactly as ``agent.storage.points`` formats the records:
vectorised for blocks, and for readings without building ``Reading`` objects (the tag prefix and the
field keys are cached per source and field set).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

from agent import schema
from agent.records import Reading, Source
from agent.spool.codec import Kind, decode_block, decode_features, decode_raw_blocks, decode_raw_ref, readings_parts
from agent.storage.line_protocol import escape_key, escape_measurement, format_tags
from agent.storage.points import block_lines, feature_rows_lines, reading_lines

_SEQ_KEY = f"{schema.READING_SEQ_FIELD}="


@lru_cache(maxsize=65536)
def _reading_prefix(flat: tuple[str, ...]) -> str:
    """``reading,<sorted tags> `` for one source (as ``format_point`` writes it)."""
    tags = dict(zip(flat[::2], flat[1::2], strict=True))
    return f"{escape_measurement(schema.READING)}{format_tags(tags)} "


@lru_cache(maxsize=65536)
def _field_keys(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{escape_key(name)}=" for name in names)


def readings_lines(body: bytes) -> list[str]:
    """The ``reading`` points of a ``READINGS`` entry, as ``reading_lines`` makes them, without building
    ``Reading`` objects (the writer's hot path for process data)."""
    shapes, times, seqs, values = readings_parts(body)
    lines = []
    at = 0
    for (flat, names, has_seq), time_ns, seq in zip(shapes, times, seqs, strict=True):
        count = len(names)
        row = values[at : at + count]
        at += count
        if not names or schema.READING_SEQ_FIELD in names:  # not from the decoder: the general path
            fields = dict(zip(names, row, strict=True))
            lines.extend(
                reading_lines(
                    Reading(
                        Source(tuple(zip(flat[::2], flat[1::2], strict=True))),
                        time_ns,
                        fields,
                        seq if has_seq else None,
                    )
                )
            )
            continue
        for name, value in zip(names, row, strict=True):
            if not math.isfinite(value):
                raise ValueError(f"field {name!r}: non-finite float {value}")
        fields_text = ",".join([key + repr(value) for key, value in zip(_field_keys(tuple(names)), row, strict=True)])
        if has_seq:
            fields_text = f"{fields_text},{_SEQ_KEY}{seq}i"
        lines.append(f"{_reading_prefix(tuple(flat))}{fields_text} {time_ns}")
    return lines


ResolveBlocks = Callable[[Sequence[int]], list[bytes]]
"""Finds the bodies of held blocks by spool id (``agent.spool.sqlite.Spool.bodies``)."""


def entry_lines(kind: int, body: bytes, resolve: ResolveBlocks | None = None) -> list[str]:
    """The line protocol of one entry (raises ``ValueError`` for what InfluxDB cannot hold).

    A held block gives no line; a ``RAW_BLOCKS`` release the lines of its blocks; a ``RAW_REF`` (earlier
    builds) the lines of the held rows ``resolve`` finds for its ids (rows already gone are the caller's
    to count).
    """
    if kind == Kind.READINGS:
        return readings_lines(body)
    if kind == Kind.BLOCK:
        block, store_raw = decode_block(body)
        return block_lines(block) if store_raw else []
    if kind == Kind.LINES:
        return body.decode().split("\n") if body else []
    if kind == Kind.FEATURES:
        return feature_rows_lines(decode_features(body))
    if kind == Kind.RAW_BLOCKS:
        return [line for block in decode_raw_blocks(body) for line in block_lines(block)]
    if kind == Kind.RAW_REF:
        if resolve is None:
            return []
        lines: list[str] = []
        for held in resolve(decode_raw_ref(body)):
            block, _ = decode_block(held)
            lines.extend(block_lines(block))
        return lines
    raise ValueError(f"unknown spool entry kind {kind}")
