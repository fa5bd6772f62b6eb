"""Threshold alert policy: decides when a stream of scores becomes an alert event (pure, no I/O).

A first, small policy: an alert is raised after ``raise_after`` consecutive anomalous windows of one
(source, model) and cleared after ``clear_after`` consecutive normal ones. One event id follows an alert
from raise to clear, so consumers can pair them. The fuller engine (hysteresis, cooldown, flapping,
persistence) replaces this class behind the same ``update`` method.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from agent.records import Alert, Score, Source


@dataclass
class _Track:
    above: int = 0
    below: int = 0
    event_id: str | None = None
    first_ns: int = 0
    peak: float = 0.0


class ThresholdAlertPolicy:
    """Consecutive-window debounce on ``Score.is_anomalous``. Not thread-safe: one scoring worker owns it."""

    def __init__(
        self,
        raise_after: int,
        clear_after: int,
        new_event_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        if raise_after < 1 or clear_after < 1:
            raise ValueError("raise_after and clear_after must be >= 1")
        self._raise_after = raise_after
        self._clear_after = clear_after
        self._new_event_id = new_event_id
        self._tracks: dict[tuple[Source, str], _Track] = {}

    def update(self, score: Score, now_ns: int) -> Alert | None:
        """Feed one score (in time order per source); return the event it causes, if any."""
        track = self._tracks.setdefault((score.source, score.model_id), _Track())
        if score.is_anomalous:
            track.above += 1
            track.below = 0
            if track.event_id is None:
                if track.above == 1:
                    track.first_ns = score.start_ns
                    track.peak = score.score
                track.peak = max(track.peak, score.score)
                if track.above >= self._raise_after:
                    track.event_id = self._new_event_id()
                    return self._alert(score, track, "raised", now_ns)
            else:
                track.peak = max(track.peak, score.score)
            return None
        track.below += 1
        track.above = 0
        if track.event_id is not None and track.below >= self._clear_after:
            alert = self._alert(score, track, "cleared", now_ns)
            track.event_id = None
            return alert
        return None

    def open_alerts(self) -> dict[tuple[Source, str], str]:
        """Event ids of the alerts currently raised, by (source, model id)."""
        return {key: t.event_id for key, t in self._tracks.items() if t.event_id is not None}

    @staticmethod
    def _alert(score: Score, track: _Track, state: str, now_ns: int) -> Alert:
        assert track.event_id is not None
        return Alert(
            source=score.source,
            state=state,  # type: ignore[arg-type]
            model_id=score.model_id,
            model_version=score.model_version,
            score=score.score,
            threshold=score.threshold,
            window_start_ns=score.start_ns,
            window_end_ns=score.end_ns,
            time_ns=now_ns,
            details={"event_id": track.event_id, "first_detected_ns": track.first_ns, "peak_score": track.peak},
        )
