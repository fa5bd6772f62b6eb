"""Which machines this agent owns when several agents share one plant (``mqtt.shard``).

Every agent of a fleet subscribes to the same topics and decodes every message; the ingest worker keeps
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
from functools import lru_cache

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
