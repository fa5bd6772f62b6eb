"""Several inputs on one connection: each message goes to the first decoder whose filters match its topic.

The agent has one MQTT connection and one ingest worker; a second kind of input (camera images beside the
JSON readings) is a second registered decoder, not a branch in the worker. ``Routes`` is itself a
``Decoder``: the composition root puts the specific inputs first (``factory/+/+/+/camera``) and the main
decoder last, whose wider default filter (``factory/#``) would also take the camera topics.

A topic no route matches (possible only with hand-written ``subscriptions``) goes to the last decoder, which
rejects it with its own ``topic`` reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.decode.base import Decoder, Outbox, Publish, Rejection
from agent.records import Decoded, Message


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest, ``$`` topics never by wildcards).

    >>> topic_matches("factory/+/+/+/camera", "factory/s/l/m/camera"), topic_matches("factory/#", "factory")
    (True, True)
    >>> topic_matches("factory/+/camera", "factory/s/l/camera"), topic_matches("#", "$SYS/x")
    (False, False)
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    parts = topic_filter.split("/")
    for index, part in enumerate(parts):
        if part == "#":
            return True
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(parts) == len(levels)


def covers(wide: str, narrow: str) -> bool:
    """Whether filter ``wide`` matches every topic that filter ``narrow`` matches.

    >>> covers("factory/#", "factory/+/+/+/camera"), covers("factory/+/+/+/+", "factory/+/+/+/camera")
    (True, True)
    >>> covers("factory/+/+/+/camera", "factory/#"), covers("a/b", "a/+")
    (False, False)
    """
    wide_levels, narrow_levels = wide.split("/"), narrow.split("/")
    for index, level in enumerate(wide_levels):
        if level == "#":
            return True
        if index >= len(narrow_levels) or narrow_levels[index] == "#":
            return False
        if level != "+" and level != narrow_levels[index]:
            return False
    return len(wide_levels) == len(narrow_levels)


class Routes:
    """A decoder made of decoders, each for the topics of its own subscriptions (see the module docstring).

    Ingest thread only, like the decoders it holds; it forwards the ``outbox`` of those that have one.
    """

    def __init__(self, decoders: Sequence[Decoder]) -> None:
        if not decoders:
            raise ValueError("Routes needs at least one decoder")
        self._decoders = tuple(decoders)
        self._filters = tuple(tuple(d.subscriptions()) for d in self._decoders)
        self._cache: dict[str, Decoder] = {}  # topics repeat with every message of a source

    def subscriptions(self) -> tuple[str, ...]:
        """Every route's filters, less those another one covers: a broker delivers a message once per
        matching subscription of a client (Mosquitto does), so ``factory/+/+/+/camera`` beside ``factory/#``
        would bring every image twice."""
        unique: list[str] = []
        for filters in self._filters:
            unique.extend(f for f in filters if f not in unique)
        return tuple(f for f in unique if not any(g != f and covers(g, f) for g in unique))

    def decoder_for(self, topic: str) -> Decoder:
        found = self._cache.get(topic)
        if found is None:
            found = self._decoders[-1]
            for decoder, filters in zip(self._decoders, self._filters, strict=True):
                if any(topic_matches(f, topic) for f in filters):
                    found = decoder
                    break
            if len(self._cache) < 65_536:
                self._cache[topic] = found
        return found

    def decode(self, message: Message) -> list[Decoded]:
        return self.decoder_for(message.topic).decode(message)

    def outbox(self, now_ns: int, final: bool = False) -> tuple[list[Publish], list[Rejection]]:
        publish: list[Publish] = []
        rejected: list[Rejection] = []
        for decoder in self._decoders:
            if isinstance(decoder, Outbox):
                more, failed = decoder.outbox(now_ns, final)
                publish.extend(more)
                rejected.extend(failed)
        return publish, rejected
