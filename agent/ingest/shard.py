"""Which machines this agent owns when several agents share one plant (``mqtt.shard``).

Every agent of a fleet subscribes to the same topics and decodes every message; ``ShardFilter`` keeps
only the records of the machines this agent owns and acknowledges the rest (another agent stores them).
So a machine's whole stream (its windows, baseline and alert state) lives on exactly one agent, whatever
order the broker delivers in. MQTT shared subscriptions (``$share/``) cannot give that: Mosquitto hands
each message to one member round-robin, which splits a machine's stream, so the config refuses them.

Ownership is rendezvous hashing of the machine id over the shard indexes (the index with the highest
hash wins): each of ``count`` agents gets about ``1/count`` of the machines, and going from ``count`` to
``count + 1`` agents moves only the machines the new agent wins (about ``1/(count + 1)``), not most of
them as ``hash % count`` would.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from functools import lru_cache

from agent.decode.base import Decoder, Outbox, Publish, Rejection
from agent.metrics import Metrics
from agent.records import Decoded, Message
from agent.topics import Topics

FLEET_INTERVAL_S = 5.0
"""Shortest time between two fleet views (new machines appear in bursts at start); the last one at stop."""
_CACHE_MACHINES = 65_536
"""Machines whose owner is remembered (the hash is cheap, but one lookup per reading is cheaper)."""


def owner(machine: str, count: int) -> int:
    """The shard index (0 .. count-1) that owns ``machine``.

    >>> [owner(m, 1) for m in ("a", "b")]
    [0, 0]
    >>> owner("press-7", 3) == owner("press-7", 3)
    True
    """
    if count == 1:
        return 0
    return _owner(machine, count)


@lru_cache(maxsize=_CACHE_MACHINES)
def _owner(machine: str, count: int) -> int:
    def weight(index: int) -> bytes:
        return hashlib.blake2b(f"{index}\x00{machine}".encode(), digest_size=8).digest()

    return max(range(count), key=weight)


class Shard:
    """This agent's share of the machines: shard ``index`` of ``count``."""

    def __init__(self, index: int, count: int) -> None:
        if not 0 <= index < count:
            raise ValueError(f"shard index {index} is not in 0..{count - 1}")
        self.index = index
        self.count = count

    def owns(self, machine: str) -> bool:
        return self.count == 1 or owner(machine, self.count) == self.index


class ShardFilter:
    """The configured decoder, keeping only the records of this agent's machines (``mqtt.shard``).

    The others belong to another agent of the fleet, which stores and scores them; they are counted
    (``ingest.not_owned``) and their message is acknowledged like any other. The machines of the share seen
    so far are published retained on ``Topics.fleet`` (through the ``Outbox`` the ingest worker drains), when
    they changed, at most every ``FLEET_INTERVAL_S`` and at stop. The wrapped decoder's own outbox is passed
    on. So the ingest worker knows nothing of sharding.
    """

    def __init__(self, inner: Decoder, shard: Shard, topics: Topics, metrics: Metrics) -> None:
        self._inner = inner
        self._shard = shard
        self._topics = topics
        self._metrics = metrics
        self._owned: set[str] = set()
        self._changed = False
        self._published = -float("inf")  # monotonic time of the last fleet view

    def subscriptions(self) -> Sequence[str]:
        return self._inner.subscriptions()

    def decode(self, message: Message) -> list[Decoded]:
        items = self._inner.decode(message)
        owned = [item for item in items if self._shard.owns(item.source.machine)]
        if len(owned) < len(items):
            self._metrics.inc("ingest.not_owned", len(items) - len(owned))
        for item in owned:
            if item.source.machine not in self._owned:
                self._owned.add(item.source.machine)
                self._changed = True
        return owned

    def outbox(self, now_ns: int, final: bool = False) -> tuple[list[Publish], list[Rejection]]:
        publish, rejected = self._inner.outbox(now_ns, final) if isinstance(self._inner, Outbox) else ([], [])
        now = time.monotonic()
        if self._changed and (final or now - self._published >= FLEET_INTERVAL_S):
            self._changed = False
            self._published = now
            payload = self._topics.fleet_payload(self._shard.index, self._shard.count, sorted(self._owned), now_ns)
            publish = [*publish, Publish(self._topics.fleet, payload, qos=1, retain=True)]
        return publish, rejected
