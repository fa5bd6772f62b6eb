"""How the agent's log lines look (text for people, JSON for log shippers) and how a flood of them is kept
readable.

``setup_logging`` is called once per process by the CLI (``--log-format``, ``agent.log_format``) and by the
InfluxDB writer's child process, which takes the parent's format (``current_format``). ``RateLimitedLog``
keeps per-event warnings (one per rejected message) from drowning the log: counters count every event, the
log shows the first few and then one summary line per interval.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(threadName)-10s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339, UTC, ms), ``level``, ``logger``, ``thread``, ``msg`` and,
    when there is one, ``exc`` (the traceback) and ``process`` (the writer child's name). The message is
    formatted first, so a shipper never sees ``%s`` placeholders.

    >>> record = logging.LogRecord("agent.x", logging.WARNING, "f.py", 1, "rejected %s", ("m1",), None)
    >>> record.created, record.threadName = 0.0, "ingest"
    >>> print(JsonFormatter().format(record))  # doctest: +NORMALIZE_WHITESPACE
    {"time": "1970-01-01T00:00:00.000Z", "level": "WARNING", "logger": "agent.x", "thread": "ingest",
     "msg": "rejected m1"}
    """

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, str] = {
            "time": when.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName or "",
            "msg": record.getMessage(),
        }
        if self._process is not None:
            entry["process"] = self._process
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str | int, log_format: str = "text", process: str | None = None) -> None:
    """Log to stderr at ``level`` in ``log_format`` (one of ``LOG_FORMATS``); ``process`` names a child process
    in every line.

    Like ``logging.basicConfig``, a no-op when the root logger already has handlers (a second command in the
    same interpreter, pytest's capture): the first configuration wins.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        prefix = f"[{process}] " if process else ""
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", prefix + "%(name)s")))
    logging.basicConfig(level=level if isinstance(level, int) else getattr(logging, level), handlers=[handler])


def current_format() -> LogFormat:
    """The format of this process's log (for a child process to log alike)."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"


def counters_line(snapshot: Mapping[str, float]) -> str:
    """A counter snapshot as one readable line: ``name=value`` pairs, the non-zero ones only, whole numbers
    without a decimal point (a log line, not a dict repr; the full set is on /metrics and the heartbeat).

    >>> counters_line({"ingest.messages": 12.0, "decode.errors{reason=json}": 1.0, "spool.acked": 0.0,
    ...                "storage.backoff_s": 0.41362})
    'ingest.messages=12 decode.errors{reason=json}=1 storage.backoff_s=0.414 (1 other 0)'
    """
    shown = [f"{name}={_number(value)}" for name, value in snapshot.items() if value]
    zero = len(snapshot) - len(shown)
    return " ".join(shown) + (f" ({zero} other{'s' if zero > 1 else ''} 0)" if zero else "")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


class RateLimitedLog:
    """At most ``lines`` warnings per ``interval_s`` through ``warning``; the others go to DEBUG, are counted
    per key and summarised in one WARNING line once the interval is over (by the next ``warning`` or
    ``flush``). The owner's counters (metrics) count every event either way: only the log is limited.

    Not thread-safe: one owner thread calls it (the ingest worker).

    >>> times = iter([0.0, 1.0, 2.0, 61.0])
    >>> limited = RateLimitedLog(logging.getLogger("doctest"), "rejected message(s)", lines=1, interval_s=60,
    ...                          clock=lambda: next(times))
    >>> [limited.warning("bad_json", "first"), limited.warning("bad_json", "second"), limited.warning("x", "3rd")]
    [True, False, False]
    >>> limited.flush()
    'rejected message(s) not logged one by one in the last 61 s: 2 (bad_json 1, x 1)'
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        lines: int = 10,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._lines = lines
        self._interval_s = interval_s
        self._clock = clock
        self._started: float | None = None  # the interval's start (its first event)
        self._logged = 0
        self._held: dict[str, int] = {}  # key -> events not logged one by one in this interval

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` as a WARNING if this interval has room, else at DEBUG and count it under ``key``;
        True if it was logged as a warning."""
        now = self._clock()
        self._roll(now)
        if self._started is None:
            self._started = now
        if self._logged < self._lines:
            self._logged += 1
            self._logger.warning(msg, *args)
            return True
        self._held[key] = self._held.get(key, 0) + 1
        self._logger.debug(msg, *args)
        return False

    def flush(self, force: bool = False) -> str | None:
        """The summary of the interval if it is over (or ``force``, at stop), logged and returned; else None."""
        now = self._clock()
        if self._started is None or (not force and now - self._started < self._interval_s):
            return None
        return self._close(now)

    def _roll(self, now: float) -> None:
        if self._started is not None and now - self._started >= self._interval_s:
            self._close(now)

    def _close(self, now: float) -> str | None:
        held, took = self._held, 0.0 if self._started is None else now - self._started
        self._started, self._logged, self._held = None, 0, {}
        if not held:
            return None
        counts = ", ".join(f"{key} {n}" for key, n in sorted(held.items()))
        line = f"{self._what} not logged one by one in the last {took:.0f} s: {sum(held.values())} ({counts})"
        self._logger.warning("%s", line)
        return line
