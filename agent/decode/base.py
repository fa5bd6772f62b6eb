"""The decoder seam: how one inbound MQTT message becomes readings and sample blocks.

A decoder is built once by the composition root from its config (``mqtt.decoder.type``, registry in
``agent.decode.registry``) and then belongs to the ingest worker: ``decode`` is called from that one
thread only, so a decoder may keep per-stream state (sequence numbers, aliases) without locks. It does no
I/O and reads no clock: the arrival time comes with the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from agent.decode.fieldkeys import FieldKeys
from agent.decode.topic import TopicTemplate
from agent.records import NS_PER_S, Decoded, Message

_Y2000_NS: Final = 946_684_800 * NS_PER_S


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds that protect the agent from absurd input; anything beyond them is rejected, not clipped."""

    max_payload_bytes: int = 1_048_576
    max_samples: int = 262_144
    max_fields: int = 64
    """Fields of one message at most (``too_many_fields``): each new name becomes a field key in InfluxDB."""
    min_time_ns: int = _Y2000_NS
    """Timestamps before this are refused (default 2000-01-01T00:00:00Z): a clock that was never set."""
    max_future_s: float = 86_400
    """Timestamps more than this after the arrival time are refused (a wrong unit or a wrong clock)."""

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_samples", "max_fields", "max_future_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"DecodeLimits.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class DecoderContext:
    """What every decoder is built with: where tags come from, the input bounds, configured filters."""

    topic_template: TopicTemplate
    limits: DecodeLimits = DecodeLimits()
    subscriptions: tuple[str, ...] = ()
    """Topic filters from the config; empty = the decoder's own (derived from the template)."""
    field_keys: FieldKeys | None = None
    """The field names known per machine, bounded (``None``: no limit over time, e.g. in tests)."""
    outbound_base: str = ""
    """The agent's own outbound topic prefix (``pdm/{agent_id}``), which the default filters must not take in."""


class Decoder(Protocol):
    """Turns one MQTT message into records.

    ``subscriptions()`` is read once, before connecting: the topic filters this decoder consumes.
    ``decode(message)`` returns the message's readings and blocks (possibly none) or raises
    ``agent.decode.errors.DecodeError`` with a stable code and a specific detail; the ingest worker then
    counts the rejection, publishes it on the dead-letter topic and acknowledges the message. Any other
    exception is a bug in the decoder (counted as ``pipeline.errors``; the message is redelivered).
    """

    def subscriptions(self) -> Sequence[str]: ...

    def decode(self, message: Message) -> list[Decoded]: ...
