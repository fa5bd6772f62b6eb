"""The InfluxDB writer: one thread that drains the spool into a sink, in batches, and never loses a line.

- Success: the batch is acked (deleted from the spool), ``storage.points_written`` counts its lines and
  the ``storage.write_seconds`` histogram records how long the write took.
- ``RetryableWriteError`` (database or network away): the batch stays in the spool; the writer backs
  off exponentially from ``backoff_min_s`` to ``backoff_max_s`` with jitter (so that many agents do not
  come back in lockstep), or for the server's ``Retry-After`` when it is longer.
- ``PermanentWriteError`` that rejects the data (bad line, type conflict, too large): the batch is split
  in halves until the refused lines are isolated; those are dead-lettered in the spool with the
  server's reason, the others are written.
- ``PermanentWriteError`` that does not reject the data (401, 403, 404: credentials, permissions, no
  such database): dead-lettering every line would lose all data for a configuration mistake, so the
  batch stays in the spool and the writer retries at ``backoff_max_s``, logging an error.

Failures are counted in ``storage.write_failures{kind=retryable|rejected|config}``.
The sink is owned by the caller, which closes it after ``stop()``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence

from agent.metrics import Metrics
from agent.spool.sqlite import Spool
from agent.storage.base import PermanentWriteError, RetryableWriteError, Sink

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.05  # how often an idle writer looks at the spool depth (a cached int: cheap)


class SpoolWriter:
    """Drains ``spool`` into ``sink`` from its own thread (``start``/``stop``); ``flush`` waits for it."""

    def __init__(
        self,
        spool: Spool,
        sink: Sink,
        metrics: Metrics,
        batch_size: int = 5000,
        flush_interval_s: float = 1.0,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError(f"need 0 < backoff_min_s <= backoff_max_s, not {backoff_min_s}, {backoff_max_s}")
        if flush_interval_s < 0:
            raise ValueError(f"flush_interval_s must be >= 0, not {flush_interval_s}")
        self.spool = spool
        self.sink = sink
        self.metrics = metrics
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flushers = 0
        self._flushers_lock = threading.Lock()
        self._failures = 0  # consecutive failed attempts, for the backoff
        self._stop_deadline = float("inf")
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("SpoolWriter already started")
        self._thread = threading.Thread(target=self._run, name="influx-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what can be written within ``timeout_s``, then end the thread; the rest stays spooled."""
        if self._thread is None:
            return
        self._stop_deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s + 1.0)
        if self._thread.is_alive():
            logger.warning("InfluxDB writer did not stop within %.1f s (a write is in progress)", timeout_s)
        elif self.spool.depth():
            logger.info("InfluxDB writer stopped with %d lines still spooled", self.spool.depth())

    @property
    def alive(self) -> bool:
        """True while the writer thread runs (for the liveness check)."""
        return self._thread is not None and self._thread.is_alive()

    def flush(self, timeout_s: float) -> bool:
        """Wait until the spool is empty (delivered or dead-lettered); False if not within ``timeout_s``."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("SpoolWriter is not running")
        deadline = time.monotonic() + timeout_s
        with self._flushers_lock:
            self._flushers += 1
        try:
            self._wake.set()
            while self.spool.depth() > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                time.sleep(min(0.01, remaining))
            return True
        finally:
            with self._flushers_lock:
                self._flushers -= 1

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        last_write = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            if stopping and (time.monotonic() >= self._stop_deadline or self._failures):
                return  # out of time, or the sink is failing: what is left stays in the spool
            depth = self.spool.depth()
            due = (
                depth >= self.batch_size
                or (depth > 0 and (stopping or self._flushers > 0))
                or (depth > 0 and time.monotonic() - last_write >= self.flush_interval_s)
            )
            if not due:
                if stopping:
                    return
                self._wake.wait(_IDLE_POLL_S)
                self._wake.clear()
                continue
            try:
                delay = self._deliver(self.spool.peek(self.batch_size))
            except Exception:
                # Top of the thread: a bug or a spool (disk) error must not end delivery for good.
                logger.exception("InfluxDB writer: unexpected error, retrying after a backoff")
                self.metrics.inc("storage.writer_errors")
                delay = self._next_backoff()
            last_write = time.monotonic()
            if delay > 0:
                self.metrics.set("storage.backoff_s", delay)
                self._stop.wait(delay)
            else:
                self.metrics.set("storage.backoff_s", 0.0)

    def _deliver(self, batch: Sequence[tuple[int, str]]) -> float:
        """Write one batch; the number of seconds to back off before the next attempt (0: none)."""
        if not batch:
            return 0.0
        try:
            try:
                self._write(batch)
            except PermanentWriteError as exc:
                if not exc.rejects_data:
                    raise
                self.metrics.inc("storage.write_failures", kind="rejected")
                self._isolate(batch, exc)
        except RetryableWriteError as exc:
            self.metrics.inc("storage.write_failures", kind="retryable")
            delay = max(self._next_backoff(), exc.retry_after_s or 0.0)
            log = logger.warning if self._failures == 1 else logger.debug
            log("InfluxDB write failed, will retry in %.1f s (%d lines spooled): %s", delay, self.spool.depth(), exc)
            return delay
        except PermanentWriteError as exc:
            self.metrics.inc("storage.write_failures", kind="config")
            self._failures += 1
            logger.error(
                "InfluxDB refused the write, keeping the data spooled and retrying in %.0f s: %s",
                self.backoff_max_s,
                exc,
            )
            return self.backoff_max_s
        if self._failures:
            logger.info("InfluxDB writes succeed again")
        self._failures = 0
        return 0.0

    def _write(self, items: Sequence[tuple[int, str]]) -> None:
        """Write and ack ``items``, or raise the sink's error (nothing acked then)."""
        started = time.monotonic()
        self.sink.write([line for _, line in items])
        self.metrics.observe("storage.write_seconds", time.monotonic() - started)
        self.spool.ack([i for i, _ in items])
        self.metrics.inc("storage.points_written", len(items))

    def _isolate(self, items: Sequence[tuple[int, str]], error: PermanentWriteError) -> None:
        """``items`` were refused as a whole: bisect, write the good halves, dead-letter single bad lines.

        Costs about ``2 * bad * log2(len(items))`` writes. A retryable or configuration error on the
        way propagates: what was written so far is acked, the rest stays spooled for the next attempt.
        """
        if len(items) == 1:
            self.spool.dead_letter(items, str(error))  # counted there, in spool.dead_lettered
            logger.warning(
                "InfluxDB rejected a line, moved it to the dead letters: %s | line: %.200s", error, items[0][1]
            )
            return
        middle = len(items) // 2
        for half in (items[:middle], items[middle:]):
            try:
                self._write(half)
            except PermanentWriteError as exc:
                if not exc.rejects_data:
                    raise
                self._isolate(half, exc)

    def _next_backoff(self) -> float:
        self._failures += 1
        return backoff_s(self._failures, self.backoff_min_s, self.backoff_max_s, self._rng)


def backoff_s(failures: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with jitter: uniform in [c/2, c], c = min(max_s, min_s * 2**(failures-1)).

    >>> [round(backoff_s(n, 1.0, 8.0, random.Random(0)), 2) for n in (1, 2, 3, 4, 5, 50)]
    [0.92, 1.84, 3.69, 7.38, 7.38, 7.38]
    """
    ceiling = min(max_s, min_s * 2 ** min(max(failures, 1) - 1, 64))
    return rng.uniform(ceiling / 2, ceiling)
