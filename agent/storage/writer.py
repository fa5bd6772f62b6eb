"""A sink's writer: reads the spool at the sink's cursor, makes line protocol, writes, moves the cursor.

Two threads, so that making the next batch overlaps the database's work on the current one:

- *prepare* reads rows after what it has read so far, turns them into line protocol
  (``agent.storage.entries.entry_lines``: vectorised for blocks) and queues a batch once it holds
  ``batch_size`` points, once its oldest row has waited ``flush_interval_s``, or at once while a
  flush or stop is pending. A row InfluxDB could never hold (a non-finite value, a name ending in a
  backslash) is dead-lettered with the reason here and counted in ``storage.unencodable``.
- *send* writes each batch and then moves the sink's durable cursor past its rows. Nothing is acked
  before the database confirmed it; rewriting after a crash is harmless (same series and timestamps).

Failures, as before the spool became a log:

- ``RetryableWriteError`` (database or network away): the same batch is retried after a capped
  exponential backoff with jitter, or the server's ``Retry-After`` when it is longer.
- ``PermanentWriteError`` that rejects the data (bad line, type conflict, too large): the batch is
  split in halves until the refused lines are isolated; those are dead-lettered with the server's
  reason, the others are written.
- ``PermanentWriteError`` that does not reject the data (401, 403, 404: credentials, permissions, no
  such database): the batch is kept and retried at ``backoff_max_s``, logging an error.

Raw blocks an alert released (``around_alerts``) can be paced (``raw_release_points_s``, the local sink's
``storage.raw_vibration.release_points_s``): a batch holding them is written in pieces of ``batch_size`` points at that
rate, so that a storm of alerts does not hand a co-located InfluxDB millions of samples at once.

Failures are counted in ``sink.write_failures{sink,kind=retryable|rejected|config}`` (and, for the local
sink, as before in the unlabelled ``storage.write_failures{kind}``).

An upstream sink (``storage.upstreams``) adds three things: a *selection* (``agent.storage.selection``:
which entries it gets, readings downsampled, whose open buckets are saved with the cursor), a *backlog
budget* (bytes and age: beyond it the writer passes over its oldest rows, moving only its own cursor,
counted in ``sink.backlog_dropped_points`` and logged once per ``DROP_LOG_INTERVAL_S``), and a *rate limit*
(points per second, so that catching up after an outage takes a bounded share of the link and the CPU).
The sink is owned by
the caller, which closes it after ``stop()``. ``agent.storage.process`` runs the same writer in a
process of its own.
"""

from __future__ import annotations

import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent.spool.codec import Kind
from agent.spool.sqlite import Row, SinkCursor
from agent.storage.base import PermanentWriteError, RetryableWriteError, Sink
from agent.storage.entries import entry_lines
from agent.storage.selection import RowSelector

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.05  # how often an idle writer looks for new rows
_PREPARED_MAX = 2  # batches made ahead of the one being written
BUDGET_CHECK_S = 2.0  # how often a sink with a backlog budget checks the age of its backlog ...
BUDGET_BYTES_CHECK_S = 60.0
"""... and its bytes: a scan of the whole backlog (1.35 GB after a day at the demo's rate), so once a minute;
the byte cap may be exceeded by what arrives in between (about 1 MB a minute at the demo's rate)."""
DROP_LOG_INTERVAL_S = 60.0
RATE_WINDOW_S = 5.0  # sink.points_per_s is measured over at least this long


@dataclass(frozen=True)
class BacklogBudget:
    """An upstream's backlog caps: beyond either, its writer passes over its oldest rows (counted)."""

    max_bytes: int
    max_age_s: float


class Writer(Protocol):
    """A sink's writer as the agent drives it: ``SinkWriter`` (threads) or ``WriterProcess``."""

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 10.0) -> None: ...

    def flush(self, timeout_s: float) -> bool: ...

    @property
    def alive(self) -> bool: ...


class MetricsSink(Protocol):
    """What the writer records: ``agent.metrics.Metrics``, or the relay of a writer process."""

    def inc(self, name: str, n: float = 1, **labels: str) -> None: ...

    def set(self, name: str, value: float, **labels: str) -> None: ...

    def observe(self, name: str, value: float, **labels: str) -> None: ...


@dataclass
class Batch:
    """Lines ready for the sink, the spool row of each line, and the last row id they cover."""

    last_id: int
    lines: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    raw_released: int = 0
    body: bytes | None = None
    """The lines joined and encoded, made by the preparing thread for a sink with ``write_body``."""
    row_count: int = 0
    state: bytes | None = None
    """The selector's state once these rows are in (saved with the cursor at ``last_id``)."""


class SinkWriter:
    """Delivers the spool to ``sink`` at ``cursor`` (``start``/``stop``); ``flush`` waits for it."""

    def __init__(
        self,
        cursor: SinkCursor,
        sink: Sink,
        metrics: MetricsSink,
        batch_size: int = 5000,
        flush_interval_s: float = 1.0,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
        *,
        selector: RowSelector | None = None,
        budget: BacklogBudget | None = None,
        rate_points_s: float | None = None,
        local_metrics: bool = True,
        raw_release_points_s: float | None = None,
    ) -> None:
        """``selector``, ``budget`` and ``rate_points_s``: an upstream's (see the module docstring);
        ``local_metrics``: also count in the unlabelled ``storage.*`` metrics (the local sink);
        ``raw_release_points_s``: the pace of batches holding released raw blocks (module docstring)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError(f"need 0 < backoff_min_s <= backoff_max_s, not {backoff_min_s}, {backoff_max_s}")
        if flush_interval_s < 0:
            raise ValueError(f"flush_interval_s must be >= 0, not {flush_interval_s}")
        if raw_release_points_s is not None and raw_release_points_s <= 0:
            raise ValueError(f"raw_release_points_s must be > 0 or None, not {raw_release_points_s}")
        self.cursor = cursor
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
        self._prepared: queue.Queue[Batch] = queue.Queue(maxsize=_PREPARED_MAX)
        self._read_up_to = cursor.position
        self._delivered_to = cursor.position  # confirmed by the sink; the durable cursor may lag (a full disk)
        self._cursor_failing_since: float | None = None
        self._write_body: Callable[[bytes, int], None] | None = getattr(sink, "write_body", None)
        self._threads: list[threading.Thread] = []
        self.selector = selector
        self.budget = budget
        self.rate_points_s = rate_points_s
        self.local_metrics = local_metrics
        self._delivered_state: bytes | None = None
        if selector is not None:
            selector.restore(cursor.state(), cursor.sink)
        self._cut = cursor.position  # rows up to here are passed over (the backlog budget)
        self._budget_checked = self._budget_bytes_checked = -float("inf")
        self._dropped_since_log = 0
        self._last_drop_log = -float("inf")
        self._send_allowed_at = 0.0  # the rate limit's next free moment (monotonic)
        self.raw_release_points_s = raw_release_points_s
        self._raw_allowed_at = 0.0  # the raw-release pace's next free moment (monotonic)
        self._rate_window = (time.monotonic(), 0)

    # -- metrics: every sink's labelled, the local sink's also as before ---------------------------

    def _dead_lettered(self, points: int, reason: str) -> None:
        if self.local_metrics:
            self.metrics.inc("spool.dead_lettered", points)
        self.metrics.inc("sink.dead_lettered", points, sink=self.cursor.sink, reason=reason)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("SinkWriter already started")
        name = self.cursor.sink
        self._threads = [
            threading.Thread(target=self._prepare_loop, name=f"{name}-prepare", daemon=True),
            threading.Thread(target=self._send_loop, name=f"{name}-send", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what can be written within ``timeout_s``, then end; the rest stays in the spool."""
        if not self._threads:
            return
        self._stop_deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(max(0.1, self._stop_deadline - time.monotonic()) + 1.0)
        if any(t.is_alive() for t in self._threads):
            logger.warning(
                "writer of %s did not stop within %.1f s (a write is in progress)", self.cursor.sink, timeout_s
            )
        elif self.cursor.position < self.cursor.latest_id():
            logger.info("writer of %s stopped before the end of the spool; the rest stays spooled", self.cursor.sink)

    @property
    def alive(self) -> bool:
        """True while both threads run (for the liveness check)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def request_flush(self, on: bool) -> None:
        """While on, partial batches go out at once (``flush``, or a parent process's flush)."""
        with self._flushers_lock:
            self._flushers += 1 if on else -1
        self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """Wait until the sink has confirmed every row appended so far; False if not within ``timeout_s``."""
        if not self.alive:
            raise RuntimeError("SinkWriter is not running")
        deadline = time.monotonic() + timeout_s
        target = self.cursor.latest_id()
        self.request_flush(True)
        try:
            while self.cursor.position < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.alive:
                    return False
                time.sleep(min(0.01, remaining))
            return True
        finally:
            self.request_flush(False)

    def _hurry(self) -> bool:
        return self._stop.is_set() or self._flushers > 0

    # -- prepare: rows -> lines ----------------------------------------------------------------

    def _prepare_loop(self) -> None:
        pending: Batch | None = None
        first_row_at = 0.0
        read_since_stop = False
        while True:
            if self._stop.is_set() and (time.monotonic() >= self._stop_deadline or self._failures):
                return
            if self._read_up_to < self._cut:
                # The backlog budget passed over rows not read yet: queue what is pending, then a batch that
                # only moves the cursor past them (in order, so the cursor never skips unwritten rows).
                if pending is not None and not self._queue(pending):
                    return
                pending = None
                if not self._queue(Batch(last_id=self._cut)):
                    return
                self._read_up_to = self._cut
                continue
            try:
                room = self.batch_size - (len(pending.lines) if pending else 0)
                rows = self.cursor.read_after(self._read_up_to, max(1, room), overshoot=True)
                if rows:
                    if pending is None:
                        pending = Batch(last_id=self._read_up_to)
                        first_row_at = time.monotonic()
                    self._add(pending, rows)
                    self._read_up_to = pending.last_id
            except Exception:
                logger.exception("writer of %s: reading the spool failed; retrying", self.cursor.sink)
                if self.local_metrics:
                    self.metrics.inc("storage.writer_errors")
                self.metrics.inc("sink.writer_errors", sink=self.cursor.sink)
                self._stop.wait(self.backoff_min_s)
                continue
            due = pending is not None and (
                len(pending.lines) >= self.batch_size
                or self._hurry()
                or time.monotonic() - first_row_at >= self.flush_interval_s
                or pending.last_id <= self._cut  # passed over by the backlog budget: let it move the cursor
            )
            if pending is not None and due:
                if not self._queue(pending):
                    return
                pending = None
            elif not rows:
                if self._stop.is_set():
                    if not read_since_stop:
                        # This empty read may have begun before stop() was called, and so before rows appended
                        # just before it: read once more now that the stop is seen, then end.
                        read_since_stop = True
                        continue
                    if pending is None or not self._queue(pending):
                        return
                    pending = None
                    continue
                self._wake.wait(_IDLE_POLL_S)
                self._wake.clear()

    def _queue(self, batch: Batch) -> bool:
        """Hand ``batch`` to the sender, waiting while it is busy; False when stopping ran out of time."""
        if self._write_body is not None and batch.lines and not self._paced(batch):
            batch.body = "\n".join(batch.lines).encode()
        if self.selector is not None:
            batch.state = self.selector.state()
            late = self.selector.take_late()
            if late:
                self.metrics.inc("sink.late_readings", late, sink=self.cursor.sink)
        while True:
            try:
                self._prepared.put(batch, timeout=_IDLE_POLL_S)
                return True
            except queue.Full:
                if self._stop.is_set() and (time.monotonic() >= self._stop_deadline or self._failures):
                    return False

    def _add(self, batch: Batch, rows: list[Row]) -> None:
        for row in rows:
            batch.row_count += 1
            if row.held:  # a held block gives nothing by itself (a release names it)
                batch.last_id = row.id
                continue
            try:
                if self.selector is None:
                    lines = entry_lines(row.kind, row.body, self._resolve)
                else:
                    lines = self.selector.lines(row.kind, row.body, self._resolve)
            except (ValueError, UnicodeDecodeError) as exc:
                self._unencodable(row, exc)
                lines = []
            if row.kind in (Kind.RAW_BLOCKS, Kind.RAW_REF):
                batch.raw_released += len(lines)
            batch.lines.extend(lines)
            batch.rows.extend([row.id] * len(lines))
            batch.last_id = row.id

    def _resolve(self, ids: Sequence[int]) -> list[bytes]:
        """The held blocks a raw-data release names; those the spool's caps dropped meanwhile are counted."""
        bodies = self.cursor.bodies(ids)
        if len(bodies) < len(ids):
            if self.local_metrics:
                self.metrics.inc("storage.raw_missing", len(ids) - len(bodies))
            self.metrics.inc("sink.raw_missing", len(ids) - len(bodies), sink=self.cursor.sink)
        return bodies

    def _unencodable(self, row: Row, exc: Exception) -> None:
        """A row no sink could ever take: dead-letter it with the reason instead of writing it."""
        kind = Kind(row.kind).name.lower() if row.kind in set(Kind) else f"kind{row.kind}"
        if self.local_metrics:
            self.metrics.inc("storage.unencodable", kind=kind)
        self.metrics.inc("sink.unencodable", kind=kind, sink=self.cursor.sink)
        self._dead_lettered(max(1, row.points), "unencodable")
        described = f"<{kind} entry {row.id}: {len(row.body)} bytes, {row.points} points>"
        trimmed = self.cursor.dead_letter([(row.id, described)], f"unencodable: {exc}")
        if trimmed:
            self.metrics.inc("spool.dead_letter_trimmed", trimmed)
        logger.warning("spool row %d (%s) cannot be written as line protocol, dead-lettered: %s", row.id, kind, exc)

    # -- send: lines -> database, then the cursor ----------------------------------------------

    def _send_loop(self) -> None:
        try:
            self._send()
        finally:
            self._confirm()

    def _send(self) -> None:
        while not (self._stop.is_set() and time.monotonic() >= self._stop_deadline):
            self._check_budget()
            try:
                batch = self._prepared.get(timeout=_IDLE_POLL_S)
            except queue.Empty:
                self._confirm()  # a cursor update that failed before (a full disk) is retried while idle
                if self._stop.is_set() and not self._threads[0].is_alive():
                    return  # stopping, and everything prepared is written
                continue
            while True:
                if batch.last_id <= self._cut:  # the backlog budget passed over these rows
                    self._delivered_to, self._delivered_state = batch.last_id, batch.state
                    self._confirm()
                    break
                try:
                    delay = self._deliver(batch)
                except Exception:
                    # Top of the thread: a bug or a spool (disk) error must not end delivery for good.
                    logger.exception("writer of %s: unexpected error, retrying after a backoff", self.cursor.sink)
                    if self.local_metrics:
                        self.metrics.inc("storage.writer_errors")
                    self.metrics.inc("sink.writer_errors", sink=self.cursor.sink)
                    delay = self._next_backoff()
                if self.local_metrics:
                    self.metrics.set("storage.backoff_s", delay)
                self.metrics.set("sink.backoff_s", delay, sink=self.cursor.sink)
                if delay <= 0:
                    break
                self.metrics.inc("sink.retries", sink=self.cursor.sink)
                self._stop.wait(delay)
                if self._stop.is_set():
                    return  # stopping while the sink fails: this batch and the rest stay in the spool
                self._check_budget()

    def _check_budget(self) -> None:
        """Every ``BUDGET_CHECK_S``: beyond the backlog budget, pass over the oldest rows (counted, logged once
        per ``DROP_LOG_INTERVAL_S``). Only this sink's cursor moves: the rows stay in the spool for the other
        sinks, and compaction removes them once those have them too."""
        if self.budget is None or time.monotonic() - self._budget_checked < BUDGET_CHECK_S:
            return
        self._budget_checked = now = time.monotonic()
        check_bytes = now - self._budget_bytes_checked >= BUDGET_BYTES_CHECK_S
        if check_bytes:
            self._budget_bytes_checked = now
        after = max(self._delivered_to, self._cut)
        max_bytes = self.budget.max_bytes if check_bytes else None
        try:
            cut, _rows, points, size = self.cursor.backlog_cut(after, max_bytes, self.budget.max_age_s)
        except sqlite3.Error as exc:
            logger.warning("writer of %s: cannot measure its backlog, will retry: %s", self.cursor.sink, exc)
            return
        if cut <= after:
            return
        self._cut = cut
        self._wake.set()
        self.metrics.inc("sink.backlog_dropped_points", points, sink=self.cursor.sink)
        self.metrics.inc("sink.backlog_dropped_bytes", size, sink=self.cursor.sink)
        self._dropped_since_log += points
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            logger.warning(
                "sink %s: its backlog is over its caps (%d bytes, %.0f s): passed over %d points of its oldest rows "
                "(counted in sink.backlog_dropped_points; other sinks keep them)",
                self.cursor.sink,
                self.budget.max_bytes,
                self.budget.max_age_s,
                self._dropped_since_log,
            )
            self._dropped_since_log = 0

    def _rate_limit(self) -> None:
        """Wait until the rate limit allows the next write (what the confirmed writes used, ``_rate_used``)."""
        if self.rate_points_s:
            wait = self._send_allowed_at - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)

    def _rate_used(self, points: int) -> None:
        """``points`` were confirmed: the next write waits for their share of the rate (failed attempts are
        free, so that the retries of an outage do not pile up a wait for after it)."""
        if self.rate_points_s and points:
            self._send_allowed_at = max(self._send_allowed_at, time.monotonic()) + points / self.rate_points_s

    def _paced(self, batch: Batch) -> bool:
        return self.raw_release_points_s is not None and batch.raw_released > 0

    def _pieces(self, batch: Batch) -> Iterator[tuple[list[str], list[int], bytes | None]]:
        """What ``_deliver`` writes: the whole batch, or, when it holds raw blocks an alert released and
        ``raw_release_points_s`` is set, pieces of ``batch_size`` points at that pace.

        One alert releases tens of thousands of samples as one spool row, and a storm of alerts millions
        within seconds: written at once, a co-located InfluxDB takes a core to ingest them just when the
        agent has alerts to decide (docs/dataplane.md, "Who gets the CPU"). Paced, the evidence reaches the
        database seconds later, durably waiting in the spool meanwhile. A flush or stop writes without waiting.
        A failure part-way retries the whole batch; rewriting its first pieces is harmless (same points).
        """
        if not batch.lines:
            return
        pace = self.raw_release_points_s
        if pace is None or not self._paced(batch):
            yield batch.lines, batch.rows, batch.body
            return
        for start in range(0, len(batch.lines), self.batch_size):
            wait = self._raw_allowed_at - time.monotonic()
            while wait > 0 and not self._hurry():
                self._stop.wait(min(wait, _IDLE_POLL_S))
                wait = self._raw_allowed_at - time.monotonic()
            lines = batch.lines[start : start + self.batch_size]
            yield lines, batch.rows[start : start + self.batch_size], None
            self._raw_allowed_at = max(self._raw_allowed_at, time.monotonic()) + len(lines) / pace

    def _deliver(self, batch: Batch) -> float:
        """Write one batch and move the cursor; the seconds to back off before retrying it (0: done)."""
        self._rate_limit()
        try:
            for lines, rows, body in self._pieces(batch):
                try:
                    self._write(lines, body)
                except PermanentWriteError as exc:
                    if not exc.rejects_data:
                        raise
                    if self.local_metrics:
                        self.metrics.inc("storage.write_failures", kind="rejected")
                    self.metrics.inc("sink.write_failures", kind="rejected", sink=self.cursor.sink)
                    self._isolate(lines, rows, exc)
        except RetryableWriteError as exc:
            if self.local_metrics:
                self.metrics.inc("storage.write_failures", kind="retryable")
            self.metrics.inc("sink.write_failures", kind="retryable", sink=self.cursor.sink)
            delay = max(self._next_backoff(), exc.retry_after_s or 0.0)
            log = logger.warning if self._failures == 1 else logger.debug
            log("write to %s failed, will retry in %.1f s: %s", self.cursor.sink, delay, exc)
            return delay
        except PermanentWriteError as exc:
            if self.local_metrics:
                self.metrics.inc("storage.write_failures", kind="config")
            self.metrics.inc("sink.write_failures", kind="config", sink=self.cursor.sink)
            self._failures += 1
            logger.error(
                "%s refused the write, keeping the data spooled and retrying in %.0f s: %s",
                self.cursor.sink,
                self.backoff_max_s,
                exc,
            )
            return self.backoff_max_s
        self._delivered_to, self._delivered_state = batch.last_id, batch.state
        self._confirm()
        self._rate_used(len(batch.lines))
        self.metrics.inc("sink.rows_written", batch.row_count, sink=self.cursor.sink)
        if batch.raw_released:
            if self.local_metrics:
                self.metrics.inc("storage.raw_released", batch.raw_released)
            self.metrics.inc("sink.raw_released", batch.raw_released, sink=self.cursor.sink)
        if self._failures:
            logger.info("writes to %s succeed again", self.cursor.sink)
        self._failures = 0
        return 0.0

    def _confirm(self) -> None:
        """Move the durable cursor to what the sink confirmed. When that fails (a full disk), delivery goes on
        from memory and the update is retried with the next batch or while idle: the batch is not written
        again, and after a crash the rows since the durable cursor are rewritten, which the sink's point
        identity makes harmless. Logged once when it starts failing and once when it works again."""
        if self._delivered_to <= self.cursor.position:
            return
        try:
            if self._delivered_state is None:
                self.cursor.advance(self._delivered_to)
            else:
                self.cursor.advance(self._delivered_to, self._delivered_state)
        except sqlite3.Error as exc:
            if self.local_metrics:
                self.metrics.inc("storage.cursor_failures")
            self.metrics.inc("sink.cursor_failures", sink=self.cursor.sink)
            if self._cursor_failing_since is None:
                self._cursor_failing_since = time.monotonic()
                logger.error(
                    "writer of %s: cannot save its cursor (%s); delivering on, the cursor is saved when it can be",
                    self.cursor.sink,
                    exc,
                )
            return
        if self._cursor_failing_since is not None:
            logger.warning(
                "writer of %s: cursor saved again after %.1f s",
                self.cursor.sink,
                time.monotonic() - self._cursor_failing_since,
            )
            self._cursor_failing_since = None

    def _write(self, lines: list[str], body: bytes | None = None) -> None:
        started = time.monotonic()
        if body is not None and self._write_body is not None:
            self._write_body(body, len(lines))
        else:
            self.sink.write(lines)
        now = time.monotonic()
        if self.local_metrics:
            self.metrics.observe("storage.write_seconds", now - started)
        self.metrics.observe("sink.write_seconds", now - started, sink=self.cursor.sink)
        if self.local_metrics:
            self.metrics.inc("storage.points_written", len(lines))
        self.metrics.inc("sink.points_written", len(lines), sink=self.cursor.sink)
        since, points = self._rate_window
        points += len(lines)
        if now - since >= RATE_WINDOW_S:
            self.metrics.set("sink.points_per_s", points / (now - since), sink=self.cursor.sink)
            since, points = now, 0
        self._rate_window = (since, points)

    def _isolate(self, lines: list[str], rows: list[int], error: PermanentWriteError) -> None:
        """``lines`` were refused as a whole: bisect, write the good halves, dead-letter single bad lines.

        Costs about ``2 * bad * log2(len(lines))`` writes. A retryable or configuration error on the way
        propagates and the whole batch is retried later (rewriting the good lines is harmless).
        """
        if len(lines) == 1:
            trimmed = self.cursor.dead_letter([(rows[0], lines[0])], str(error))
            self._dead_lettered(1, "rejected")
            if trimmed:
                self.metrics.inc("spool.dead_letter_trimmed", trimmed)
            logger.warning(
                "%s rejected a line, moved it to the dead letters: %s | line: %.200s", self.cursor.sink, error, lines[0]
            )
            return
        middle = len(lines) // 2
        for part, part_rows in ((lines[:middle], rows[:middle]), (lines[middle:], rows[middle:])):
            try:
                self._write(part)
            except PermanentWriteError as exc:
                if not exc.rejects_data:
                    raise
                self._isolate(part, part_rows, exc)

    def _next_backoff(self) -> float:
        self._failures += 1
        return backoff_s(self._failures, self.backoff_min_s, self.backoff_max_s, self._rng)


SinkFactory = Callable[[], Sink]
"""Builds a sink where the writer runs (``agent.bootstrap.build_sink`` bound to a config)."""


def backoff_s(failures: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with jitter: uniform in [c/2, c], c = min(max_s, min_s * 2**(failures-1)).

    >>> [round(backoff_s(n, 1.0, 8.0, random.Random(0)), 2) for n in (1, 2, 3, 4, 5, 50)]
    [0.92, 1.84, 3.69, 7.38, 7.38, 7.38]
    """
    ceiling = min(max_s, min_s * 2 ** min(max(failures, 1) - 1, 64))
    return rng.uniform(ceiling / 2, ceiling)
