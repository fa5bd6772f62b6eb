"""The alert-latency benchmark's fault schedule, episode accounting and guarded percentiles (pure, no I/O).

``benchmarks/run.py`` injects fault *episodes* into the vibration of a simulated fleet and listens to the
agent's alert messages. This module decides where the episodes go and what became of each of them:

- ``design_schedule`` places the episodes so that each one *can* raise a ``new`` event under the agent's
  alert rule (read from the config the agent runs with): after an event, the healthy gap leaves room for
  the ``clear_after`` cool windows of its clear, then ``cooldown_s`` (agent wall clock, so scaled by the
  replay speed into simulated blocks), then a margin; and no machine gets more episodes than the
  flapping rule lets raise within ``flap_window_s``.
- ``account`` puts every episode in exactly one class (``REASONS``): raised (a ``new`` whose window holds
  the episode's fault samples), or the reason it was not, derived from the alert stream and the rule;
  ``new`` events that belong to no episode are false alerts.
- ``percentile`` refuses to estimate a percentile from fewer than ``MIN_SAMPLES`` values.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.alerts.rules import AlertRule

MIN_SAMPLES = 100
"""No percentile (p50 included) is printed from fewer latencies than this."""

NS = 1_000_000_000

RAISED = "raised"
EVENT_STILL_OPEN = "event_still_open"
FLAPPING_HOLD = "flapping_hold"
COOLDOWN = "cooldown"
RUN_ENDED = "run_ended"
MISSED = "missed"
REASONS = (RAISED, EVENT_STILL_OPEN, FLAPPING_HOLD, COOLDOWN, RUN_ENDED, MISSED)
REASON_TEXT = {
    RAISED: "a `new` event whose window holds the episode's fault samples",
    EVENT_STILL_OPEN: "an earlier event of the machine had not cleared when the episode began",
    FLAPPING_HOLD: "an earlier event was held open by the flapping rule (its clear would have flapped)",
    COOLDOWN: "the machine's last clear was less than cooldown_s before the episode's first block was sent",
    RUN_ENDED: "not all of the episode's faulty blocks were sent before the run ended",
    MISSED: "none of the above: a real miss",
}


# -- percentiles ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float, min_n: int = MIN_SAMPLES) -> float | None:
    """The ``q``-th percentile (linear interpolation), or None when there are fewer than ``min_n`` values.

    >>> percentile([1.0] * 99, 50) is None, percentile(list(range(101)), 99)
    (True, 99.0)
    """
    if len(values) < min_n or not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def latency_summary(values_s: Sequence[float], min_n: int = MIN_SAMPLES) -> dict[str, Any]:
    """n, p50/p99 (None below ``min_n``) and max of latencies given in seconds, in milliseconds."""
    ms = [v * 1e3 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50, min_n),
        "p99_ms": percentile(ms, 99, min_n),
        "max_ms": max(ms) if ms else None,
        "refused": None if len(ms) >= min_n else f"n={len(ms)} < {min_n}",
        "over_250ms": sum(v > 250 for v in ms),
        "values_ms": [round(v, 1) for v in ms],  # in the episodes' (schedule) order: where the tail falls
    }


def format_latency(summary: Mapping[str, Any]) -> str:
    """``p50 / p99 / max ms (n=…)``, or ``n=37 < 100 (max …)`` when the percentiles were refused."""
    top = "–" if summary["max_ms"] is None else f"{summary['max_ms']:,.0f}"
    if summary["refused"]:
        return f"{summary['refused']}: no percentile (max {top} ms)"
    return f"{summary['p50_ms']:,.0f} / {summary['p99_ms']:,.0f} / {top} ms (n={summary['n']})"


# -- the schedule --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """Fault blocks ``first_block..last_block`` (inclusive) of vibration machine ``machine``."""

    machine: int
    index: int
    first_block: int
    last_block: int


@dataclass(frozen=True)
class AlertSchedule:
    """Per vibration machine: ``warmup_blocks`` healthy blocks, a stagger of ``offset(j)`` healthy blocks,
    then ``episodes`` times (``faulty_blocks`` faulty, ``gap_blocks`` healthy), then healthy blocks to the end."""

    machines: int
    warmup_blocks: int
    faulty_blocks: int
    gap_blocks: int
    episodes: int
    stagger_blocks: int
    tail_blocks: int
    single: frozenset[int] = frozenset()
    """Machines that get one episode only (their events cannot clear: see ``longest_cool_run``)."""

    def episodes_of(self, j: int) -> int:
        return min(1, self.episodes) if j in self.single else self.episodes

    @property
    def cycle_blocks(self) -> int:
        return self.faulty_blocks + self.gap_blocks

    @property
    def total_blocks(self) -> int:
        """Blocks per machine to publish: every episode, and the tail after the last one."""
        return (
            self.warmup_blocks
            + self.stagger_blocks
            + (self.episodes - 1) * self.cycle_blocks
            + self.faulty_blocks
            + self.tail_blocks
        )

    def offset(self, j: int) -> int:
        return (j * self.stagger_blocks) // max(self.machines, 1)

    def faulty(self, j: int, k: int) -> bool:
        rel = k - self.warmup_blocks - self.offset(j)
        if rel < 0:
            return False
        e, pos = divmod(rel, self.cycle_blocks)
        return e < self.episodes_of(j) and pos < self.faulty_blocks

    def episode_list(self) -> list[Episode]:
        out = []
        for j in range(self.machines):
            for e in range(self.episodes_of(j)):
                first = self.warmup_blocks + self.offset(j) + e * self.cycle_blocks
                out.append(Episode(j, e, first, first + self.faulty_blocks - 1))
        return out


def design_schedule(
    rule: AlertRule,
    *,
    speed: float,
    block_period_s: float,
    window_blocks: int,
    hop_blocks: float,
    machines: int,
    episodes: int,
    warmup_blocks: int,
    faulty_blocks: int,
    stagger_s: float,
    margin_s: float,
    tail_blocks: int | None = None,
    single: Iterable[int] = (),
) -> tuple[AlertSchedule, dict[str, Any]]:
    """A schedule in which every episode can raise a ``new`` event under ``rule``; and how it was derived.

    ``speed`` is simulated seconds per wall second; the rule's windows count data (simulated time), its
    ``cooldown_s`` and ``flap_window_s`` run on the agent's wall clock. ``window_blocks`` is the number of
    blocks one window spans, ``hop_blocks`` the blocks between two windows. Machines in ``single`` get one
    episode: their healthy signal never gives ``clear_after`` cool windows in a row, so their first event
    stays open and a second episode could not raise.
    """
    limited = frozenset(single)

    def wall_to_blocks(wall_s: float) -> int:
        return math.ceil(wall_s * speed / block_period_s - 1e-9)

    # Long enough for raise_n hot windows (and min_duration_s of hot data) inside the episode.
    min_faulty = math.ceil(rule.raise_n * hop_blocks) + math.ceil(rule.min_duration_s / block_period_s - 1e-9)
    faulty = max(faulty_blocks, min_faulty)
    # After the last faulty block, window_blocks - 1 windows still hold fault samples, then the clear needs
    # clear_after consecutive cool windows: the clear is decided that many blocks after the episode.
    clear_blocks = (window_blocks - 1) + math.ceil(rule.clear_after * hop_blocks - 1e-9)
    cooldown_blocks = wall_to_blocks(rule.cooldown_s)
    margin_blocks = wall_to_blocks(margin_s)
    gap = clear_blocks + cooldown_blocks + margin_blocks
    stagger = wall_to_blocks(stagger_s)
    tail = clear_blocks + 2 if tail_blocks is None else tail_blocks
    # Flapping: a clear that would be the flap_max_transitions-th new/clear within flap_window_s holds the
    # event open, so at most ceil(flap_max_transitions / 2) events of one machine raise within the window.
    flap_limit = math.ceil(rule.flap_max_transitions / 2)
    schedule = AlertSchedule(machines, warmup_blocks, faulty, gap, episodes, stagger, tail, limited)
    wall_s = schedule.total_blocks * block_period_s / speed
    if wall_s < rule.flap_window_s and episodes > flap_limit:
        schedule = AlertSchedule(machines, warmup_blocks, faulty, gap, flap_limit, stagger, tail, limited)
        wall_s = schedule.total_blocks * block_period_s / speed
    design = {
        "speed": speed,
        "block_period_s": block_period_s,
        "block_period_wall_s": block_period_s / speed,
        "window_blocks": window_blocks,
        "hop_blocks": hop_blocks,
        "rule": {
            name: getattr(rule, name)
            for name in (
                "raise_n",
                "raise_m",
                "min_duration_s",
                "clear_after",
                "cooldown_s",
                "flap_window_s",
                "flap_max_transitions",
            )
        },
        "faulty_blocks": faulty,
        "clear_blocks": clear_blocks,
        "cooldown_blocks": cooldown_blocks,
        "margin_blocks": margin_blocks,
        "margin_wall_s": margin_s,
        "gap_blocks": gap,
        "gap_wall_s": gap * block_period_s / speed,
        "cycle_wall_s": schedule.cycle_blocks * block_period_s / speed,
        "episodes_requested": episodes,
        "episodes_per_machine": schedule.episodes,
        "flap_limit_per_window": flap_limit,
        "stagger_blocks": stagger,
        "warmup_blocks": warmup_blocks,
        "tail_blocks": tail,
        "total_blocks": schedule.total_blocks,
        "vibration_machines": machines,
        "single_episode_machines": sorted(limited),
        "episodes": len(schedule.episode_list()),
        "run_wall_s": wall_s,
    }
    return schedule, design


def longest_cool_run(ratios: Sequence[float], exit_ratio: float, cyclic: bool = True) -> float:
    """The longest run of consecutive windows with ``score / threshold < exit_ratio`` (cool: counted towards a
    clear); ``cyclic``: the sequence repeats (the workload loops over its pools), ``math.inf`` if all are cool.

    >>> longest_cool_run([0.1, 0.9, 0.1, 0.1], 0.8), longest_cool_run([0.1, 0.9, 0.1, 0.1], 0.8, cyclic=False)
    (3, 2)
    """
    cool = [r < exit_ratio for r in ratios]
    if cool and all(cool):
        return math.inf
    best = run = 0
    for c in cool * 2 if cyclic else cool:
        run = run + 1 if c else 0
        best = max(best, run)
    return best


# -- the accounting ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertMessage:
    """One alert lifecycle message of a vibration machine, as the benchmark's listener received it.

    ``block``: the block holding the last sample of the message's window; ``time_ns``: the agent's
    decision time (its wall clock); ``arrived_s``: arrival at the listener (the publisher's perf clock).
    """

    machine: int
    event_id: str
    state: str
    reason: str
    block: int
    time_ns: int
    arrived_s: float


@dataclass
class EpisodeOutcome:
    episode: Episode
    reason: str
    event_id: str | None = None
    onset_s: float | None = None  # first faulty block sent -> new arrived
    decision_s: float | None = None  # block completing the raising window sent -> new arrived
    agent_s: float | None = None  # block completing the raising window sent -> the agent's decision (its clock)


@dataclass
class Accounting:
    outcomes: list[EpisodeOutcome]
    counts: dict[str, int]
    false_alerts: list[AlertMessage] = field(default_factory=list)
    clears: dict[str, int] = field(default_factory=dict)  # clear messages by reason
    flapping_holds: int = 0  # update messages with reason "flapping" (a clear held back)
    open_at_end: int = 0  # events raised and never cleared

    @property
    def onset_s(self) -> list[float]:
        return [o.onset_s for o in self.outcomes if o.onset_s is not None]

    @property
    def decision_s(self) -> list[float]:
        return [o.decision_s for o in self.outcomes if o.decision_s is not None]

    @property
    def agent_s(self) -> list[float]:
        """The part of ``decision_s`` up to the agent's decision; the rest is the alert's way out (the
        agent's outbound queue, its MQTT client, the broker, the listener)."""
        return [o.agent_s for o in self.outcomes if o.agent_s is not None]


@dataclass
class _Trace:
    new: AlertMessage | None = None
    clear: AlertMessage | None = None
    flapping: AlertMessage | None = None


def account(
    episodes: Sequence[Episode],
    messages: Iterable[AlertMessage],
    sent_s: Mapping[tuple[int, int], float],
    *,
    cooldown_s: float,
    window_blocks: int,
    perf_to_epoch_ns: int = 0,
) -> Accounting:
    """What became of every episode; every one lands in exactly one of ``REASONS`` (asserted).

    ``sent_s[(j, k)]``: when block ``k`` of machine ``j`` was handed to the publisher (perf clock, seconds);
    ``perf_to_epoch_ns`` converts that clock to the agent's (``time_ns = perf_s * 1e9 + perf_to_epoch_ns``).
    An episode owns the windows that hold its fault samples: those whose last block lies in
    ``first_block .. last_block + window_blocks - 1``.
    """
    msgs = sorted(messages, key=lambda m: (m.time_ns, m.arrived_s))
    traces: dict[str, _Trace] = {}
    by_machine: dict[int, list[_Trace]] = {}
    clears: Counter[str] = Counter()
    flapping_holds = 0
    for m in msgs:
        trace = traces.get(m.event_id)
        if trace is None:
            trace = traces[m.event_id] = _Trace()
            by_machine.setdefault(m.machine, []).append(trace)
        if m.state == "new" and trace.new is None:
            trace.new = m
        elif m.state == "clear" and trace.clear is None:
            trace.clear = m
            clears[m.reason] += 1
        elif m.state == "update" and m.reason == "flapping":
            flapping_holds += 1
            if trace.flapping is None:
                trace.flapping = m

    owner: dict[tuple[int, int], Episode] = {}
    for ep in episodes:
        for k in range(ep.first_block, ep.last_block + window_blocks):
            owner[(ep.machine, k)] = ep
    outcomes: dict[Episode, EpisodeOutcome] = {}
    false_alerts: list[AlertMessage] = []
    for trace in traces.values():
        new = trace.new
        if new is None:
            continue
        matched = owner.get((new.machine, new.block))
        if matched is None or matched in outcomes:
            false_alerts.append(new)
            continue
        first = sent_s.get((matched.machine, matched.first_block))
        deciding = sent_s.get((matched.machine, new.block))
        outcomes[matched] = EpisodeOutcome(
            matched,
            RAISED,
            new.event_id,
            onset_s=None if first is None else new.arrived_s - first,
            decision_s=None if deciding is None else new.arrived_s - deciding,
            agent_s=None if deciding is None else (new.time_ns - perf_to_epoch_ns) / NS - deciding,
        )

    for ep in episodes:
        if ep not in outcomes:
            outcomes[ep] = _not_raised(ep, by_machine.get(ep.machine, []), sent_s, cooldown_s, perf_to_epoch_ns)
    ordered = [outcomes[ep] for ep in episodes]
    counts = {reason: 0 for reason in REASONS}
    for o in ordered:
        counts[o.reason] += 1
    assert sum(counts.values()) == len(episodes), (counts, len(episodes))
    open_at_end = sum(1 for t in traces.values() if t.new is not None and t.clear is None)
    return Accounting(ordered, counts, false_alerts, dict(clears), flapping_holds, open_at_end)


def _not_raised(
    ep: Episode,
    traces: Sequence[_Trace],
    sent_s: Mapping[tuple[int, int], float],
    cooldown_s: float,
    perf_to_epoch_ns: int,
) -> EpisodeOutcome:
    if any((ep.machine, k) not in sent_s for k in range(ep.first_block, ep.last_block + 1)):
        return EpisodeOutcome(ep, RUN_ENDED)
    before = [t for t in traces if t.new is not None and t.new.block < ep.first_block]
    # An event raised before the episode and not cleared by a window before it: still open when it began.
    still_open = [t for t in before if t.clear is None or t.clear.block >= ep.first_block]
    if still_open:
        t = max(still_open, key=lambda t: t.new.time_ns)  # type: ignore[union-attr]
        held = t.flapping is not None and t.flapping.block < ep.first_block
        return EpisodeOutcome(ep, FLAPPING_HOLD if held else EVENT_STILL_OPEN, t.new.event_id)  # type: ignore[union-attr]
    cleared = [t.clear for t in before if t.clear is not None]
    if cleared:
        last = max(cleared, key=lambda c: c.time_ns)
        began_ns = sent_s[(ep.machine, ep.first_block)] * NS + perf_to_epoch_ns
        if began_ns - last.time_ns < cooldown_s * NS:
            return EpisodeOutcome(ep, COOLDOWN, last.event_id)
    return EpisodeOutcome(ep, MISSED)
