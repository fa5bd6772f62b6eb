"""The local store, read back: readings, features and scores of one machine over a time range.

One interface for what models and tools read of the agent's own history (``pdm-agent adapt`` today;
retraining and the fleet-learning client are meant to use the same), always from the *local* sink (the
``storage`` section), never from an upstream: it works offline, with every upstream unreachable, and it
sees every point at full resolution.

It speaks InfluxQL, so the local sink must be ``influx_v1`` (InfluxDB 1.x, or the v1 compatibility API of
2.x/3.x); anything else is a ``ValueError`` naming the type. Times are epoch nanoseconds, ``[start_ns,
end_ns)``; results come oldest first as a ``Series``: the times, the column names and a float matrix with NaN
where a point lacks a field.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent import schema
from agent.storage.base import Sink
from agent.storage.influx_v1 import InfluxV1Sink, quote_identifier

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def duration_ns(text: str) -> int:
    """Nanoseconds of a duration such as ``30m``, ``2h`` or ``1d`` (``ValueError`` otherwise).

    >>> duration_ns("90s"), duration_ns("2h") // 10**9
    (90000000000, 7200)
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"a duration looks like 30m, 2h or 1d, not {text!r}")
    return int(match.group(1)) * _UNIT_S[match.group(2)] * 10**9


def _literal(value: str) -> str:
    r"""An InfluxQL single-quoted string.

    >>> print(_literal("m'1\\"))
    'm\'1\\'
    """
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Series:
    """Points of one query, oldest first: ``times_ns`` (n,) int64, ``values`` (n, len(columns)) float64, NaN
    where a point has no such field (or a non-numeric one)."""

    times_ns: np.ndarray
    columns: tuple[str, ...]
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.times_ns)

    def complete(self) -> Series:
        """Only the rows with every column present (a model's input needs them all)."""
        keep = np.isfinite(self.values).all(axis=1) if len(self) else np.zeros(0, dtype=bool)
        return Series(self.times_ns[keep], self.columns, self.values[keep])


class LocalStore:
    """Reads the local InfluxDB (see the module docstring); thread-safe as its sink is."""

    def __init__(self, sink: Sink) -> None:
        if not isinstance(sink, InfluxV1Sink):
            raise ValueError(
                f"reading the local store needs storage.type influx_v1 (InfluxQL), not {type(sink).__name__}"
            )
        self.sink = sink

    def readings(
        self,
        machine: str,
        start_ns: int,
        end_ns: int | None = None,
        fields: Sequence[str] | None = None,
        sensor: str | None = None,
        limit: int | None = None,
    ) -> Series:
        """Process readings of ``machine`` (and ``sensor``): ``fields``, or every field it has (without ``seq``)."""
        where = {"machine": machine} if sensor is None else {"machine": machine, "sensor": sensor}
        return self._select(schema.READING, fields, where, start_ns, end_ns, limit, skip=(schema.READING_SEQ_FIELD,))

    def features(
        self,
        machine: str,
        model_id: str,
        names: Sequence[str],
        start_ns: int,
        end_ns: int | None = None,
        limit: int | None = None,
    ) -> Series:
        """The feature vectors ``names`` the agent computed for ``model_id`` on ``machine``."""
        where = {"machine": machine, schema.TAG_MODEL_ID: model_id}
        return self._select(schema.FEATURES, names, where, start_ns, end_ns, limit)

    def scores(
        self,
        machine: str,
        start_ns: int,
        end_ns: int | None = None,
        model_id: str | None = None,
        limit: int | None = None,
    ) -> Series:
        """Anomaly scores (score, threshold, anomalous) of ``machine``, of one model or all."""
        where = {"machine": machine} if model_id is None else {"machine": machine, schema.TAG_MODEL_ID: model_id}
        columns = (schema.SCORE_FIELD, schema.THRESHOLD_FIELD, schema.ANOMALOUS_FIELD)
        return self._select(schema.SCORE, columns, where, start_ns, end_ns, limit)

    def _select(
        self,
        measurement: str,
        fields: Sequence[str] | None,
        where: dict[str, str],
        start_ns: int,
        end_ns: int | None,
        limit: int | None,
        skip: Sequence[str] = (),
    ) -> Series:
        if fields is not None and not fields:
            raise ValueError("name at least one field")
        columns = "*" if fields is None else ", ".join(quote_identifier(f) for f in fields)
        clauses = [f"{quote_identifier(k)} = {_literal(v)}" for k, v in where.items()]
        clauses.append(f"time >= {int(start_ns)}")
        if end_ns is not None:
            clauses.append(f"time < {int(end_ns)}")
        statement = (
            f"SELECT {columns} FROM {quote_identifier(measurement)} WHERE {' AND '.join(clauses)} ORDER BY time ASC"
        )
        if limit is not None:
            statement += f" LIMIT {int(limit)}"
        series = self.sink.query(statement)
        if not series:
            names = tuple(fields or ())
            return Series(np.zeros(0, dtype=np.int64), names, np.zeros((0, len(names))))
        header = list(series[0]["columns"])
        rows = [row for s in series for row in s.get("values", [])]
        if fields is None:  # every field: what is not a tag of the query, seq or the time
            names = tuple(c for c in header[1:] if c not in where and c not in skip and _numeric(rows, header.index(c)))
        else:
            names = tuple(fields)
        at = [header.index(n) for n in names]
        times = np.array([int(row[0]) for row in rows], dtype=np.int64)
        values = np.array([[_number(row[i]) for i in at] for row in rows], dtype=np.float64).reshape(len(rows), len(at))
        return Series(times, names, values)


def _number(value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else float("nan")


def _numeric(rows: list[list[object]], index: int) -> bool:
    """Whether a column of ``SELECT *`` is a field with numbers (not a tag, which comes as a string)."""
    return any(isinstance(row[index], int | float) for row in rows)


def since_ns(duration: str, now_ns: int | None = None) -> int:
    """The start of the last ``duration`` (``30m``, ``2h``, ``1d``) before ``now_ns`` (default: now)."""
    return (time.time_ns() if now_ns is None else now_ns) - duration_ns(duration)
