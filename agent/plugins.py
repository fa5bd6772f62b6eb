"""The one lookup of every registry (decoders, sinks, modalities, model kinds): by the config's ``type:``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def registered(table: Mapping[str, T], kind: str, what: str) -> T:
    """The entry of ``table`` for ``kind``; ``ValueError`` naming ``what`` and the known kinds otherwise.

    >>> registered({"a": 1}, "b", "sink type")
    Traceback (most recent call last):
    ...
    ValueError: unknown sink type 'b' (known: a)
    """
    try:
        return table[kind]
    except KeyError:
        raise ValueError(f"unknown {what} {kind!r} (known: {', '.join(sorted(table))})") from None
