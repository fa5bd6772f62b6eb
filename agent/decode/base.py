"""The decoder seam: how one inbound MQTT message becomes readings and sample blocks.

A decoder is built once by the composition root from its config (``mqtt.decoder.type``, registry in
``agent.decode.registry``) and then belongs to the ingest worker: ``decode`` is called from that one
thread only, so a decoder may keep per-stream state (sequence numbers, aliases) without locks. It does no
I/O and reads no clock: the arrival time comes with the message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, runtime_checkable

from agent.decode.errors import DecodeError
from agent.decode.fieldkeys import FieldKeys
from agent.decode.topic import TopicTemplate
from agent.records import NS_PER_S, Decoded, Message, Source

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
    options: Any = None
    """The config's ``mqtt.decoder`` section; each decoder documents the keys it reads (like the sinks)."""


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


@dataclass(frozen=True)
class Publish:
    """A message a stateful decoder wants published (a Sparkplug rebirth request, a node's state)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Rejection:
    """Part of a message that could not be stored although the rest was (one metric of several)."""

    topic: str
    error: DecodeError
    payload: bytes


@runtime_checkable
class Outbox(Protocol):
    """A decoder that talks back (optional, beside ``Decoder``): the ingest worker calls ``outbox(now_ns)``
    from its thread after each batch and on idle polls (about every ``agent.runtime.worker.POLL_S``), so
    that timeouts fire without new input; it publishes what is returned and reports the rejections like
    rejected messages (counted in ``decode.errors``, on the dead-letter topic). ``final``: the last call, at
    stop: return what is pending even if its time has not come."""

    def outbox(self, now_ns: int, final: bool = False) -> tuple[list[Publish], list[Rejection]]: ...


@dataclass(frozen=True)
class Presence:
    """The retained availability topic of the MQTT connection and its payloads (also the last will)."""

    topic: str
    payload: Callable[[Literal["online", "offline"]], bytes]


@runtime_checkable
class HasPresence(Protocol):
    """A decoder whose protocol defines the connection's availability topic (Sparkplug's STATE); read once by
    the composition root before connecting. It replaces the agent's ``status`` topic and will."""

    def presence(self) -> Presence: ...


@runtime_checkable
class Counted(Protocol):
    """A decoder that counts protocol events (births, deaths, seq gaps ...): ``counts`` has all its keys
    from construction on (the composition root exposes each as ``decode.events{event}``) and only grows
    in value; written by the ingest thread, read by the metrics thread."""

    @property
    def counts(self) -> Mapping[str, int]: ...


class OfflineView(Protocol):
    """Which sources their publisher declared offline, as one picklable copy (``Liveness.offline_view``)."""

    def offline(self, source: Source) -> bool: ...


@runtime_checkable
class Liveness(Protocol):
    """A decoder whose protocol says when a source goes offline (Sparkplug deaths). ``offline`` is called
    from the scoring thread (the alert engine), so it only reads state the ingest thread replaces whole.

    A scoring process (``agent.runtime.scoring_process``) cannot call into the decoder: it gets an
    ``offline_view`` (a copy, taken in another thread of the agent) whenever ``liveness_version`` moved."""

    liveness_version: int
    """Increases whenever a source's liveness changes (a birth or a death)."""

    def offline(self, source: Source) -> bool: ...

    def offline_view(self) -> OfflineView: ...
