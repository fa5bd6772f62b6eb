"""Several sinks' writers driven as one (the local sink and the upstreams), and which of them is behind.

Each sink has its own writer at its own cursor (``agent.storage.writer``), by default each in a process of
its own (``agent.storage.process``): an upstream that is away, slow or catching up costs the local sink
nothing but a share of the second core, which its rate limit bounds, and never delays its cursor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from agent.storage.writer import Writer

Backlogs = Callable[[], Mapping[str, tuple[int, int, float, int]]]
"""Per sink: rows, points, age of the oldest in seconds, bytes of its backlog (``Spool.backlogs``)."""


class SinkWriters:
    """``Writer``'s interface over every sink's writer; ``writers`` by sink name, the local sink first."""

    def __init__(self, writers: Mapping[str, Writer]) -> None:
        if not writers:
            raise ValueError("SinkWriters needs at least one writer")
        self.writers = dict(writers)

    def start(self) -> None:
        for writer in self.writers.values():
            writer.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every writer within the same ``timeout_s`` (in parallel: an upstream that is away must not
        take the local sink's share of the shutdown budget)."""
        threads = [
            threading.Thread(target=writer.stop, args=(timeout_s,), name=f"{name}-stop", daemon=True)
            for name, writer in self.writers.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every sink has confirmed every row appended so far (each within ``timeout_s``)."""
        results = [writer.flush(timeout_s) for writer in self.writers.values()]
        return all(results)

    @property
    def alive(self) -> bool:
        return all(writer.alive for writer in self.writers.values())


def sinks_check(backlogs: Backlogs, max_lag_s: Mapping[str, float | None]) -> Callable[[], dict[str, object]]:
    """A ``/readyz`` check: each sink's backlog (rows, age); fails naming the sinks whose oldest unsent row is
    older than their ``max_lag_s`` (None: that sink never fails the check)."""

    def check() -> dict[str, object]:
        states = backlogs()
        late = [
            f"{sink} {states[sink][2]:.0f} s behind (limit {limit:.0f} s)"
            for sink, limit in max_lag_s.items()
            if limit is not None and sink in states and states[sink][2] > limit
        ]
        if late:
            raise RuntimeError("sinks behind: " + "; ".join(late))
        return {
            "ok": True,
            "sinks": {sink: {"backlog_rows": b[0], "backlog_age_s": round(b[2], 1)} for sink, b in states.items()},
        }

    return check
