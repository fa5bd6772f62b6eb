"""The alert engine: per (source, alert type) event lifecycle ``new`` -> ``update`` -> ``clear`` (pure, no I/O).

The scoring worker feeds every window score (``observe``), calls ``tick`` regularly for the time-driven
transitions (re-notify, end of a silence, stale events) and hands operator commands to ``command``.
Each call returns the ``Alert`` messages it decided; the caller publishes those not ``silenced``, stores
all of them, and saves ``to_state()`` when ``dirty`` so that a restart continues the open events instead
of raising them again as new or flooding clears. The rules are in ``agent/alerts/rules.py``.

Not thread-safe: one scoring worker owns the engine.

>>> from agent.records import Score, Source
>>> engine = AlertEngine(RuleBook(AlertRule(raise_n=2, raise_m=2, clear_after=1)), new_event_id=lambda: "e1")
>>> src = Source.of(machine="m1", sensor="vibration")
>>> def score(v, t): return Score(src, t * 10**9, t * 10**9 + 10**9, "vib", "1.0.0", v, 1.0)
>>> [(a.state, a.seq) for t, v in enumerate([2.0, 2.0, 2.0, 0.1]) for a in engine.observe(score(v, t), t * 10**9)]
[('new', 1), ('clear', 2)]

Size: this module stays one file (~650 lines) on purpose: the engine is one state machine (tracks, events,
silences) whose transitions, commands and persisted state must change together; the rules are in
``agent.alerts.rules``, the payload in ``agent.alerts.payload``, the state file in ``agent.alerts.store``.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.alerts.rules import SEVERITIES, AlertRule, RuleBook, Severity
from agent.metrics import Metrics
from agent.records import NS_PER_S, Alert, AlertState, Score, Source

STATE_VERSION = 1
NO_DATA = "no_data"
"""The alert type of a source that stopped sending (``AlertRule.no_data_after_s``)."""
MAX_SILENCE_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class SilenceLimits:
    """Bounds on operator silences (``alerts.commands``): each one is retained state on the broker and in
    the state file, so an operator (or a leaked key) cannot silence without end nor grow them without end."""

    max_duration_s: float = 86_400.0
    max_per_machine: int = 10
    max_total: int = 200

    def __post_init__(self) -> None:
        if not 0 < self.max_duration_s <= MAX_SILENCE_S:
            raise ValueError(f"max_duration_s must be in (0, {MAX_SILENCE_S:.0f}], got {self.max_duration_s}")
        if self.max_per_machine < 1 or self.max_total < 1:
            raise ValueError("max_per_machine and max_total must be >= 1")


Key = tuple[Source, str]


@dataclass
class _Event:
    """An open alert event (persisted)."""

    event_id: str
    alert_type: str
    source: Source
    model_id: str
    model_version: str
    severity: Severity
    score: float
    threshold: float
    peak_score: float
    window_start_ns: int
    window_end_ns: int
    first_detected_ns: int
    seq: int = 0
    adapter: str | None = None
    defect: dict[str, Any] | None = None
    defect_votes: dict[str, int] = field(default_factory=dict)  # hot windows per defect class (not "normal")
    top_features: tuple[tuple[str, float], ...] = ()
    acknowledged_by: str | None = None
    published_new: bool = False
    flapping: bool = False
    last_published_ns: int = 0
    last_update_ns: int = 0
    last_hot_ns: int = 0

    def to_dict(self) -> dict[str, Any]:
        # Field by field rather than dataclasses.asdict, which deep-copies every value recursively: the state
        # of every open event is taken after each scoring step that changed it, on the scoring thread. The
        # containers an event mutates or shares are copied; everything else is immutable.
        out = {name: getattr(self, name) for name in _EVENT_FIELDS}
        out["source"] = [list(t) for t in self.source.tags]
        out["top_features"] = [list(t) for t in self.top_features]
        out["defect"] = copy.deepcopy(self.defect)
        out["defect_votes"] = dict(self.defect_votes)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _Event:
        values = dict(data)
        values["source"] = Source(tuple((str(k), str(v)) for k, v in values["source"]))
        values["top_features"] = tuple((str(n), float(c)) for n, c in values.get("top_features", ()))
        return cls(**values)


_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(_Event))


@dataclass
class _Track:
    """What the engine remembers of one (source, alert type) between windows."""

    recent: deque[tuple[bool, int, float]]  # (hot, window start, score / threshold) of the last raise_m windows
    cool_run: int = 0
    hot_since_ns: int | None = None
    last_seen_ns: int = 0
    last_clear_ns: int | None = None
    transitions: deque[int] = field(default_factory=deque)  # decision times of new/clear messages
    event: _Event | None = None
    last_score: Score | None = None  # the latest window's score (in memory only), for a no_data event


@dataclass(frozen=True, slots=True)
class Silence:
    """An operator's silence: messages of matching keys are stored, not published, until ``until_ns``."""

    machine: str
    sensor: str | None
    alert_type: str | None
    until_ns: int
    by: str
    note: str = ""

    def covers(self, key: Key) -> bool:
        source, alert_type = key
        return (
            self.machine == source.machine
            and self.sensor in (None, source.sensor)
            and self.alert_type in (None, alert_type)
        )


class CommandError(ValueError):
    """A refused operator command; ``code`` is a stable reason for counters and the reply."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What an accepted command did: a sentence for the reply and the alert messages it caused."""

    command: str
    by: str
    detail: str
    alerts: tuple[Alert, ...] = ()


class AlertEngine:
    """See the module docstring. ``metrics`` (optional) counts suppressions by reason."""

    def __init__(
        self,
        rules: RuleBook,
        new_event_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        metrics: Metrics | None = None,
        silence_limits: SilenceLimits = SilenceLimits(),
        offline: Callable[[Source], bool] | None = None,
    ) -> None:
        self._rules = rules
        self._offline = offline
        """Whether the publisher's protocol declared a source offline (a Sparkplug NDEATH or DDEATH; called
        from this engine's thread, must not block): its silence is then known and no ``no_data`` opens."""
        self._new_event_id = new_event_id
        self._metrics = metrics or Metrics()
        self._silence_limits = silence_limits
        self._tracks: dict[Key, _Track] = {}
        self._silences: list[Silence] = []
        self.machines: set[str] = set()
        """Machines the engine has scored (persisted): only these may be silenced, so that a command never
        creates retained state for a machine that does not exist."""
        self.dirty = False
        """True when a message, a command or a silence changed the state since ``to_state`` was last called
        (the latest score of an open event is not worth a disk write per window; it is saved with the next one)."""
        self.changed_machines: set[str] = set()
        """Machines whose retained state changed; the caller publishes ``machine_state`` and clears the set."""
        self.extra_commands: dict[str, Callable[[Mapping[str, Any], str, int], CommandOutcome]] = {}
        """Commands of other stages (``rebaseline``: the commissioning baselines), by name: called with the
        body, ``by`` and the time after the checks every command passes; they raise ``CommandError``."""

    # -- scores -------------------------------------------------------------------------------------------

    def observe(
        self,
        score: Score,
        now_ns: int,
        defect: Mapping[str, Any] | None = None,
        top_features: Iterable[tuple[str, float]] = (),
        alert_type: str | None = None,
    ) -> list[Alert]:
        """Feed one window score (in time order per source); ``alert_type`` defaults to the model id."""
        key = (score.source, alert_type or score.model_id)
        rule = self._rules.rule(key[1])
        track = self._track(key, rule)
        track.last_seen_ns = now_ns
        track.last_score = score
        resumed = self._data_resumed(score.source, now_ns)
        ratio = score.score / score.threshold
        hot = ratio > rule.enter
        cool = ratio < rule.exit
        track.recent.append((hot, score.start_ns, ratio))
        if hot:
            track.cool_run = 0
            if track.hot_since_ns is None:
                track.hot_since_ns = score.start_ns
        elif cool:
            track.cool_run += 1
            track.hot_since_ns = None
        else:
            track.cool_run = 0
        event = track.event
        if event is None:
            return resumed + self._maybe_raise(key, track, rule, score, now_ns, defect, top_features)
        return resumed + self._follow(key, track, rule, event, score, now_ns, hot, defect, top_features)

    def _data_resumed(self, source: Source, now_ns: int) -> list[Alert]:
        track = self._tracks.get((source, NO_DATA))
        if track is None or track.event is None:
            return []
        rule = self._rules.rule(NO_DATA)
        return [self._clear((source, NO_DATA), track, rule, track.event, "data_resumed", now_ns)]

    def _no_data(self, key: Key, track: _Track, rule: AlertRule, now_ns: int) -> Alert | None:
        """Open a ``no_data`` event for a source whose windows of this type stopped (once per source)."""
        score = track.last_score
        silent_s = (now_ns - track.last_seen_ns) / NS_PER_S
        if score is None or not rule.no_data_after_s or silent_s < rule.no_data_after_s:
            return None
        if self._offline is not None and self._offline(key[0]):
            # Not a dropout: the source's publisher said it went offline (its state shows it), so an alert
            # would be false. Once per silence, like the event; the next window re-arms.
            self._metrics.inc("alerts.suppressed", reason="source_offline", alert_type=NO_DATA)
            track.last_score = None
            return None
        gap_key = (key[0], NO_DATA)
        gap_rule = self._rules.rule(NO_DATA)
        gap_track = self._track(gap_key, gap_rule)
        if gap_track.event is not None:
            return None
        gap_track.last_seen_ns = now_ns
        event = _Event(
            event_id=self._new_event_id(),
            alert_type=NO_DATA,
            source=key[0],
            model_id=score.model_id,
            model_version=score.model_version,
            adapter=score.adapter,
            severity="major",
            score=silent_s,
            threshold=rule.no_data_after_s,
            peak_score=silent_s,
            window_start_ns=score.start_ns,
            window_end_ns=score.end_ns,
            first_detected_ns=score.end_ns,
            last_hot_ns=now_ns,
            last_update_ns=now_ns,
        )
        gap_track.event = event
        track.last_score = None  # one event per silence; the next window clears it and re-arms
        return self._emit(gap_key, event, "new", "silent", now_ns)

    def _maybe_raise(
        self,
        key: Key,
        track: _Track,
        rule: AlertRule,
        score: Score,
        now_ns: int,
        defect: Mapping[str, Any] | None,
        top_features: Iterable[tuple[str, float]],
    ) -> list[Alert]:
        hot_starts = [start for hot, start, _ in track.recent if hot]
        # Raise on a hot window only: hot windows seen during a cooldown must not raise on a cool one.
        if not track.recent[-1][0] or len(hot_starts) < rule.raise_n:
            return []
        if rule.min_duration_s and (
            track.hot_since_ns is None or score.end_ns - track.hot_since_ns < rule.min_duration_s * NS_PER_S
        ):
            return []
        if track.last_clear_ns is not None and now_ns - track.last_clear_ns < rule.cooldown_s * NS_PER_S:
            self._metrics.inc("alerts.suppressed", reason="cooldown", alert_type=key[1])
            return []
        event = _Event(
            event_id=self._new_event_id(),
            alert_type=key[1],
            source=key[0],
            model_id=score.model_id,
            model_version=score.model_version,
            adapter=score.adapter,
            severity=rule.severity(self._sustained_ratio(track, rule)),
            score=score.score,
            threshold=score.threshold,
            peak_score=score.score,
            window_start_ns=score.start_ns,
            window_end_ns=score.end_ns,
            first_detected_ns=hot_starts[0],
            defect=dict(defect) if defect is not None else None,
            defect_votes=_vote({}, defect),
            top_features=tuple(top_features),
            last_hot_ns=now_ns,
            last_update_ns=now_ns,
        )
        track.event = event
        self._transition(track, rule, now_ns)
        return [self._emit(key, event, "new", "raised", now_ns)]

    def _follow(
        self,
        key: Key,
        track: _Track,
        rule: AlertRule,
        event: _Event,
        score: Score,
        now_ns: int,
        hot: bool,
        defect: Mapping[str, Any] | None,
        top_features: Iterable[tuple[str, float]],
    ) -> list[Alert]:
        event.score = score.score
        event.threshold = score.threshold
        event.window_start_ns, event.window_end_ns = score.start_ns, score.end_ns
        event.model_id, event.model_version, event.adapter = score.model_id, score.model_version, score.adapter
        event.peak_score = max(event.peak_score, score.score)
        if hot:
            event.last_hot_ns = now_ns
            features = tuple(top_features)
            if features:
                event.top_features = features
            return self._material_change(key, track, rule, event, now_ns, defect)
        if track.cool_run < rule.clear_after:
            return []
        if event.flapping:
            if now_ns - event.last_hot_ns < rule.flap_window_s * NS_PER_S:
                return []
            return [self._clear(key, track, rule, event, "recovered", now_ns)]
        if self._recent_transitions(track, rule, now_ns) + 1 >= rule.flap_max_transitions:
            # This clear would make the key flap: hold the event open and say so, once.
            event.flapping = True
            self._metrics.inc("alerts.suppressed", reason="flapping", alert_type=key[1])
            return [self._emit(key, event, "update", "flapping", now_ns)]
        return [self._clear(key, track, rule, event, "recovered", now_ns)]

    def _material_change(
        self,
        key: Key,
        track: _Track,
        rule: AlertRule,
        event: _Event,
        now_ns: int,
        defect: Mapping[str, Any] | None,
    ) -> list[Alert]:
        """An ``update`` when the event got worse or its defect class changed, not on every window's whim.

        Severity only escalates, and only when ``raise_n`` of the last ``raise_m`` windows reach the new
        level. The defect class is the one most hot windows of the event were classified as; ``normal``
        (no bearing pattern in this window) never names or replaces a class. The first class named is
        published at once; a change of class waits for ``update_min_interval_s``, like an escalation.
        """
        reasons = []
        severity = rule.severity(self._sustained_ratio(track, rule))
        if SEVERITIES.index(severity) > SEVERITIES.index(event.severity):
            reasons.append("severity")
        published = None if event.defect is None else event.defect.get("defect")
        published = None if published == NO_DEFECT else published
        event.defect_votes = _vote(event.defect_votes, defect)
        named_now = _leader(event.defect_votes)
        if defect is not None and defect.get("defect") == named_now:
            latest_of_leader: dict[str, Any] | None = dict(defect)
        else:
            latest_of_leader = None
        if named_now is not None and named_now != published and latest_of_leader is not None:
            reasons.append("defect")
        elif latest_of_leader is not None:
            event.defect = latest_of_leader  # fresher probabilities of the same class: no message
        first_class = published is None and named_now is not None
        due = now_ns - event.last_update_ns >= rule.update_min_interval_s * NS_PER_S
        if not reasons or not (due or (reasons == ["defect"] and first_class)):
            return []
        if "severity" in reasons:
            event.severity = severity
        if "defect" in reasons and latest_of_leader is not None:
            event.defect = latest_of_leader
        event.last_update_ns = now_ns
        return [self._emit(key, event, "update", "+".join(reasons), now_ns)]

    @staticmethod
    def _sustained_ratio(track: _Track, rule: AlertRule) -> float:
        """The level that ``raise_n`` of the last ``raise_m`` windows reach (the N-th largest score ratio)."""
        ratios = sorted((r for _, _, r in track.recent), reverse=True)
        return ratios[min(rule.raise_n, len(ratios)) - 1]

    def _clear(self, key: Key, track: _Track, rule: AlertRule, event: _Event, reason: str, now_ns: int) -> Alert:
        track.event = None
        track.last_clear_ns = now_ns
        self._transition(track, rule, now_ns)
        return self._emit(key, event, "clear", reason, now_ns)

    def _transition(self, track: _Track, rule: AlertRule, now_ns: int) -> None:
        track.transitions.append(now_ns)
        self._recent_transitions(track, rule, now_ns)

    @staticmethod
    def _recent_transitions(track: _Track, rule: AlertRule, now_ns: int) -> int:
        horizon = now_ns - rule.flap_window_s * NS_PER_S
        while track.transitions and track.transitions[0] < horizon:
            track.transitions.popleft()
        return len(track.transitions)

    # -- time ---------------------------------------------------------------------------------------------

    def tick(self, now_ns: int) -> list[Alert]:
        """Time-driven transitions: silences that end, re-notifications, events whose source went quiet."""
        out: list[Alert] = []
        expired = [s for s in self._silences if s.until_ns <= now_ns]
        if expired:
            self._silences = [s for s in self._silences if s.until_ns > now_ns]
            self.dirty = True
            self.changed_machines.update(s.machine for s in expired)
        for key, track in list(self._tracks.items()):
            rule = self._rules.rule(key[1])
            if key[1] != NO_DATA:
                gap = self._no_data(key, track, rule, now_ns)
                if gap is not None:
                    out.append(gap)
            event = track.event
            if event is None:
                continue
            if key[1] != NO_DATA and now_ns - track.last_seen_ns >= rule.stale_after_s * NS_PER_S:
                out.append(self._clear(key, track, rule, event, "no_data", now_ns))
            elif not event.published_new and not self._silenced(key, now_ns):
                out.append(self._emit(key, event, "new", "unsilenced", now_ns))
            elif (
                rule.renotify_s
                and event.acknowledged_by is None
                and event.published_new
                and not self._silenced(key, now_ns)
                and now_ns - event.last_published_ns >= rule.renotify_s * NS_PER_S
            ):
                out.append(self._emit(key, event, "update", "renotify", now_ns))
        return out

    # -- operator commands --------------------------------------------------------------------------------

    def command(self, body: object, now_ns: int) -> CommandOutcome:
        """Apply an operator command (parsed JSON); raises ``CommandError`` when it is refused.

        ``{"command": "ack", "event_id": ..., "by": ...}`` acknowledges an open event (no more re-notify);
        ``{"command": "silence", "machine": ..., ["sensor": ..., "alert_type": ...,] "duration_s": ..., "by": ...}``
        withholds matching messages from MQTT (they are still stored) until it ends;
        ``{"command": "unsilence", "machine": ..., ["sensor", "alert_type",] "by": ...}`` ends matching silences;
        the names in ``extra_commands`` go to their handlers (``rebaseline``).
        """
        if not isinstance(body, Mapping):
            raise CommandError("bad_command", "a command must be a JSON object")
        command = body.get("command")
        by = _text(body, "by", required=True)
        assert by is not None
        if command == "ack":
            return self._ack(body, by, now_ns)
        if command == "silence":
            return self._silence(body, by, now_ns)
        if command == "unsilence":
            return self._unsilence(body, by)
        extra = self.extra_commands.get(command) if isinstance(command, str) else None
        if extra is not None:
            return extra(body, by, now_ns)
        known = ", ".join(repr(c) for c in self.command_names())
        raise CommandError("unknown_command", f"command must be one of {known}, got {command!r}")

    def command_names(self) -> tuple[str, ...]:
        """Every command the engine dispatches, its own and ``extra_commands``."""
        return ("ack", "silence", "unsilence", *self.extra_commands)

    def _ack(self, body: Mapping[str, Any], by: str, now_ns: int) -> CommandOutcome:
        event_id = _text(body, "event_id", required=True)
        for key, track in self._tracks.items():
            event = track.event
            if event is not None and event.event_id == event_id:
                if event.acknowledged_by is not None:
                    return CommandOutcome(
                        "ack", by, f"event {event_id} was already acknowledged by {event.acknowledged_by}"
                    )
                event.acknowledged_by = by
                alert = self._emit(key, event, "update", "acknowledged", now_ns)
                return CommandOutcome("ack", by, f"event {event_id} acknowledged", (alert,))
        raise CommandError("no_such_event", f"no open alert event has id {event_id!r}")

    def _silence(self, body: Mapping[str, Any], by: str, now_ns: int) -> CommandOutcome:
        limits = self._silence_limits
        duration = body.get("duration_s")
        if (
            isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or not 0 < duration <= limits.max_duration_s
        ):
            raise CommandError(
                "bad_value", f"duration_s must be a number of seconds in (0, {limits.max_duration_s:.0f}]"
            )
        machine = _text(body, "machine", required=True)
        assert machine is not None
        if machine not in self.machines:
            raise CommandError("unknown_machine", f"machine {machine[:64]!r} has never been scored by this agent")
        sensor, alert_type = _text(body, "sensor"), _text(body, "alert_type")
        # The same scope again replaces its silence (a new end, a new note) rather than adding one.
        others = [s for s in self._silences if (s.machine, s.sensor, s.alert_type) != (machine, sensor, alert_type)]
        if sum(1 for s in others if s.machine == machine) >= limits.max_per_machine:
            raise CommandError(
                "too_many_silences", f"machine {machine} has {limits.max_per_machine} silences already (the limit)"
            )
        if len(others) >= limits.max_total:
            raise CommandError("too_many_silences", f"{limits.max_total} silences are active already (the limit)")
        silence = Silence(
            machine=machine,
            sensor=sensor,
            alert_type=alert_type,
            until_ns=now_ns + int(duration * NS_PER_S),
            by=by,
            note=_text(body, "note") or "",
        )
        self._silences = [*others, silence]
        self.dirty = True
        self.changed_machines.add(machine)
        open_events = sum(1 for key, t in self._tracks.items() if t.event is not None and silence.covers(key))
        return CommandOutcome(
            "silence", by, f"{_scope(silence)} silenced for {duration:g} s ({open_events} open events)"
        )

    def _unsilence(self, body: Mapping[str, Any], by: str) -> CommandOutcome:
        machine = _text(body, "machine", required=True)
        sensor, alert_type = _text(body, "sensor"), _text(body, "alert_type")
        kept = [s for s in self._silences if (s.machine, s.sensor, s.alert_type) != (machine, sensor, alert_type)]
        removed = len(self._silences) - len(kept)
        if not removed:
            raise CommandError(
                "no_such_silence", f"no silence matches machine={machine} sensor={sensor} type={alert_type}"
            )
        self._silences = kept
        self.dirty = True
        assert machine is not None
        self.changed_machines.add(machine)
        return CommandOutcome(
            "unsilence", by, f"{removed} silence(s) ended; withheld open events follow at the next tick"
        )

    # -- state --------------------------------------------------------------------------------------------

    def machine_state(self, machine: str, now_ns: int) -> dict[str, Any]:
        """The retained per-machine state: worst severity of its open events (``ok`` without) and the events."""
        events = [(k, t.event) for k, t in self._tracks.items() if t.event is not None and k[0].machine == machine]
        worst = max((SEVERITIES.index(e.severity) for _, e in events), default=-1)
        return {
            "machine": machine,
            "state": SEVERITIES[worst] if worst >= 0 else "ok",
            "open_alerts": [
                {
                    "event_id": e.event_id,
                    "sensor": k[0].sensor,
                    "alert_type": k[1],
                    "severity": e.severity,
                    "since_ns": e.first_detected_ns,
                    "acknowledged_by": e.acknowledged_by,
                    "silenced": self._silenced(k, now_ns),
                    "flapping": e.flapping,
                }
                for k, e in events
            ],
            "silences": [
                {"sensor": s.sensor, "alert_type": s.alert_type, "until_ns": s.until_ns, "by": s.by}
                for s in self._silences
                if s.machine == machine and s.until_ns > now_ns
            ],
        }

    def to_state(self) -> dict[str, Any]:
        """JSON-able state to persist: open events, last clears and transitions (cooldown, flapping), silences."""
        self.dirty = False
        tracks = []
        for (source, alert_type), t in self._tracks.items():
            if t.event is None and t.last_clear_ns is None:
                continue
            tracks.append(
                {
                    "source": [list(tag) for tag in source.tags],
                    "alert_type": alert_type,
                    "last_clear_ns": t.last_clear_ns,
                    "transitions": list(t.transitions),
                    "event": t.event.to_dict() if t.event is not None else None,
                }
            )
        return {
            "version": STATE_VERSION,
            "tracks": tracks,
            "silences": [dataclasses.asdict(s) for s in self._silences],
            "machines": sorted(self.machines),
        }

    def restore(self, state: Mapping[str, Any], now_ns: int) -> int:
        """Continue from ``to_state()`` of a previous run; returns the number of open events restored.

        Restored events stay open without a new ``new`` message; they clear by the usual rule (or as stale
        when their source never comes back). Raises ``ValueError`` on a state of another version.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"alert state version {state.get('version')!r} is not {STATE_VERSION}")
        restored = 0
        for item in state["tracks"]:
            source = Source(tuple((str(k), str(v)) for k, v in item["source"]))
            key = (source, str(item["alert_type"]))
            track = self._track(key, self._rules.rule(key[1]))
            track.last_clear_ns = item["last_clear_ns"]
            track.transitions = deque(int(t) for t in item["transitions"])
            track.last_seen_ns = now_ns
            if item["event"] is not None:
                track.event = _Event.from_dict(item["event"])
                restored += 1
                self.changed_machines.add(source.machine)
        self._silences = [Silence(**s) for s in state["silences"]]
        # "machines" came later (a file without it knows the machines of its tracks and silences).
        self.machines.update(str(m) for m in state.get("machines", ()))
        self.machines.update(s.machine for s in self._silences)
        return restored

    # -- helpers ------------------------------------------------------------------------------------------

    def _track(self, key: Key, rule: AlertRule) -> _Track:
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track(recent=deque(maxlen=rule.raise_m))
            if key[0].machine not in self.machines:
                self.machines.add(key[0].machine)
                self.dirty = True  # saved once per machine, so that it may be silenced after a restart
        return track

    def _silenced(self, key: Key, now_ns: int) -> bool:
        return any(s.until_ns > now_ns and s.covers(key) for s in self._silences)

    def _emit(self, key: Key, event: _Event, state: AlertState, reason: str, now_ns: int) -> Alert:
        event.seq += 1
        # A clear is published when its new was, so that consumers following the event can close it.
        silenced = not event.published_new if state == "clear" else self._silenced(key, now_ns)
        if not silenced:
            event.last_published_ns = now_ns
            if state == "new":
                event.published_new = True
        self.dirty = True
        self.changed_machines.add(key[0].machine)
        self._metrics.inc("alerts.decided", state=state, reason=reason)
        return self._snapshot(event, state, reason, now_ns, silenced)

    @staticmethod
    def _snapshot(event: _Event, state: AlertState, reason: str, now_ns: int, silenced: bool = False) -> Alert:
        return Alert(
            event_id=event.event_id,
            seq=event.seq,
            state=state,
            reason=reason,
            alert_type=event.alert_type,
            source=event.source,
            severity=event.severity,
            model_id=event.model_id,
            model_version=event.model_version,
            score=event.score,
            threshold=event.threshold,
            peak_score=event.peak_score,
            window_start_ns=event.window_start_ns,
            window_end_ns=event.window_end_ns,
            first_detected_ns=event.first_detected_ns,
            time_ns=now_ns,
            defect=dict(event.defect) if event.defect is not None else None,
            top_features=event.top_features,
            adapter=event.adapter,
            acknowledged_by=event.acknowledged_by,
            silenced=silenced,
            flapping=event.flapping,
        )


NO_DEFECT = "normal"


def _vote(votes: Mapping[str, int], defect: Mapping[str, Any] | None) -> dict[str, int]:
    """``votes`` plus the class of one classified hot window (``normal`` does not vote)."""
    out = dict(votes)
    name = None if defect is None else defect.get("defect")
    if isinstance(name, str) and name != NO_DEFECT:
        out[name] = out.get(name, 0) + 1
    return out


def _leader(votes: Mapping[str, int]) -> str | None:
    """The class with the most votes (the first to reach that count on a tie), or ``None``."""
    return max(votes, key=lambda name: votes[name]) if votes else None


def _text(body: Mapping[str, Any], name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise CommandError("bad_value" if name in body else "missing_field", f"{name} must be a non-empty string")
    return value


def _scope(s: Silence) -> str:
    return (
        f"machine {s.machine}"
        + (f" sensor {s.sensor}" if s.sensor else "")
        + (f" type {s.alert_type}" if s.alert_type else "")
    )
