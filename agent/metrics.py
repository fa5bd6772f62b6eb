"""Thread-safe counters and gauges: rates are counted here, events are logged.

Every stage gets the one ``Metrics`` instance from the composition root. Names are dotted
(``ingest.messages``, ``decode.errors``); an optional ``reason`` or other labels split a counter.
"""

from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    """Counters (monotonic) and gauges (last value), safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, n: int = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += n

    def set(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._gauges[key] = value

    def get(self, name: str, **labels: str) -> float:
        """Value of one counter or gauge; without labels, the sum over all label sets of a counter."""
        with self._lock:
            if labels:
                key = (name, tuple(sorted(labels.items())))
                return self._counters.get(key, self._gauges.get(key, 0))
            total = sum(v for (n, _), v in self._counters.items() if n == name)
            if total:
                return total
            return sum(v for (n, _), v in self._gauges.items() if n == name)

    def snapshot(self) -> dict[str, float]:
        """Flat copy, labels rendered as ``name{k=v}``; for status messages, summaries and tests."""
        with self._lock:
            items = list(self._counters.items()) + list(self._gauges.items())
        out: dict[str, float] = {}
        for (name, labels), value in items:
            label = ",".join(f"{k}={v}" for k, v in labels)
            out[f"{name}{{{label}}}" if label else name] = value
        return out
