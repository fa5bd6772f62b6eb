"""The alert benchmark's schedule, episode accounting and percentile guard (pure: no services, no agent process)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from agent.alerts.engine import AlertEngine
from agent.alerts.rules import AlertRule, RuleBook
from agent.config.loader import load_config
from agent.records import Score, Source
from benchmarks.alert_accounting import (
    COOLDOWN,
    EVENT_STILL_OPEN,
    FLAPPING_HOLD,
    MIN_SAMPLES,
    MISSED,
    RAISED,
    REASONS,
    RUN_ENDED,
    AlertMessage,
    AlertSchedule,
    Episode,
    account,
    design_schedule,
    format_latency,
    latency_summary,
    longest_cool_run,
    percentile,
)

REPO = Path(__file__).resolve().parents[2]
NS = 1_000_000_000
COOL_S = 60.0
WINDOW_BLOCKS = 2  # windows of 4096 samples over blocks of 2048: a window spans 2 blocks, one per block


# -- percentiles ---------------------------------------------------------------------------------------------


def test_percentile_is_refused_below_the_minimum() -> None:
    assert MIN_SAMPLES == 100
    assert percentile([0.1] * 99, 50) is None
    assert percentile([0.1] * 99, 99) is None
    assert percentile([], 99) is None
    values = [float(i) for i in range(100)]
    assert percentile(values, 50) == pytest.approx(49.5)
    assert percentile(values, 99) == pytest.approx(98.01)
    assert percentile([1.0, 2.0, 3.0], 50, min_n=3) == 2.0


def test_latency_summary_reports_n_and_refuses_percentiles_of_few_alerts() -> None:
    few = latency_summary([0.2] * 37)
    assert few["n"] == 37 and few["p50_ms"] is None and few["p99_ms"] is None
    assert few["max_ms"] == pytest.approx(200.0)
    assert few["refused"] == "n=37 < 100"
    assert format_latency(few).startswith("n=37 < 100")
    many = latency_summary([i / 1000 for i in range(1, 201)])  # 1..200 ms
    assert many["n"] == 200 and many["refused"] is None
    assert many["p50_ms"] == pytest.approx(100.5)
    assert many["max_ms"] == pytest.approx(200.0)
    assert format_latency(many) == "100 / 198 / 200 ms (n=200)"
    assert latency_summary([])["max_ms"] is None


# -- schedule ------------------------------------------------------------------------------------------------


def _rule(**kw: float) -> AlertRule:
    base: dict[str, float] = {"raise_n": 2, "raise_m": 3, "clear_after": 25, "cooldown_s": COOL_S}
    return AlertRule(**{**base, **kw})  # type: ignore[arg-type]


def test_design_schedule_derives_the_gap_from_the_rule_and_the_speed() -> None:
    schedule, d = design_schedule(
        _rule(),
        speed=0.5,
        block_period_s=0.2,
        window_blocks=2,
        hop_blocks=1.0,
        machines=4,
        episodes=5,
        warmup_blocks=10,
        faulty_blocks=4,
        stagger_s=2.0,
        margin_s=10.0,
    )
    assert d["clear_blocks"] == 1 + 25  # the window still holding fault samples, then 25 cool ones
    assert d["cooldown_blocks"] == 150  # 60 s of the agent's wall clock at x0.5 = 30 s of data
    assert d["margin_blocks"] == 25
    assert schedule.gap_blocks == 26 + 150 + 25
    assert schedule.episodes == 3 == d["flap_limit_per_window"]  # ceil(6 / 2): the 3rd event is held open
    assert d["stagger_blocks"] == 5
    episodes = schedule.episode_list()
    assert len(episodes) == 4 * 3
    for ep in episodes:
        assert schedule.faulty(ep.machine, ep.first_block) and schedule.faulty(ep.machine, ep.last_block)
        assert not schedule.faulty(ep.machine, ep.first_block - 1)
        assert not schedule.faulty(ep.machine, ep.last_block + 1)
    faulty = sum(schedule.faulty(j, k) for j in range(4) for k in range(schedule.total_blocks))
    assert faulty == len(episodes) * schedule.faulty_blocks
    assert d["run_wall_s"] == pytest.approx(schedule.total_blocks * 0.2 / 0.5)


def test_machines_whose_events_cannot_clear_get_one_episode() -> None:
    schedule, d = design_schedule(
        _rule(),
        speed=1.0,
        block_period_s=0.2,
        window_blocks=2,
        hop_blocks=1.0,
        machines=4,
        episodes=3,
        warmup_blocks=10,
        faulty_blocks=4,
        stagger_s=0.0,
        margin_s=5.0,
        single=[2],
    )
    assert [schedule.episodes_of(j) for j in range(4)] == [3, 3, 1, 3]
    assert d["episodes"] == len(schedule.episode_list()) == 10
    assert d["single_episode_machines"] == [2]
    second = schedule.episode_list()[1]
    assert schedule.faulty(0, second.first_block) and not schedule.faulty(2, second.first_block)


def test_longest_cool_run_is_cyclic_and_infinite_when_always_cool() -> None:
    assert longest_cool_run([0.1] * 10, 0.8) == math.inf
    assert longest_cool_run([0.9, 0.1, 0.1, 0.9, 0.1], 0.8) == 2
    assert longest_cool_run([0.1, 0.9, 0.1, 0.1, 0.1], 0.8) == 4  # the last three, then the first
    assert longest_cool_run([0.1, 0.9, 0.1, 0.1, 0.1], 0.8, cyclic=False) == 3
    assert longest_cool_run([0.8], 0.8) == 0  # at exit x threshold: not cool (hysteresis band)


def test_design_schedule_lengthens_episodes_for_min_duration() -> None:
    schedule, _ = design_schedule(
        _rule(raise_n=3, raise_m=4, min_duration_s=1.0),
        speed=1.0,
        block_period_s=0.2,
        window_blocks=2,
        hop_blocks=1.0,
        machines=1,
        episodes=1,
        warmup_blocks=3,
        faulty_blocks=2,
        stagger_s=0.0,
        margin_s=0.0,
    )
    assert schedule.faulty_blocks == 3 + 5


# -- accounting on synthetic alert streams -------------------------------------------------------------------

EP1 = Episode(0, 0, 10, 13)
EP2 = Episode(0, 1, 50, 53)
SENT = {(0, k): float(k) for k in range(80)}  # block k sent at perf second k; perf_to_epoch_ns = 0


def _msg(event: str, state: str, block: int, t_s: float, reason: str = "", machine: int = 0) -> AlertMessage:
    reason = reason or {"new": "raised", "clear": "recovered"}.get(state, "severity")
    return AlertMessage(machine, event, state, reason, block, int(t_s * NS), t_s + 0.05)


def _account(messages: list[AlertMessage], episodes: list[Episode] | None = None, sent: dict | None = None):
    eps = [EP1, EP2] if episodes is None else episodes
    acc = account(eps, messages, SENT if sent is None else sent, cooldown_s=COOL_S, window_blocks=WINDOW_BLOCKS)
    assert sum(acc.counts.values()) == len(eps)
    assert set(acc.counts) == set(REASONS)
    return acc


def test_raised_episodes_and_their_latencies() -> None:
    messages = [
        _msg("a", "new", 11, 11.2),
        _msg("a", "clear", 40, 40.1),
        _msg("b", "new", 52, 52.3),
    ]
    acc = _account(messages, sent={**SENT, **{(0, k): k - 100.0 for k in range(50, 80)}})  # 100 s later
    assert acc.counts[RAISED] == 2 and acc.false_alerts == []
    first, _ = acc.outcomes
    assert (first.reason, first.event_id) == (RAISED, "a")
    assert first.onset_s == pytest.approx(11.25 - 10)  # first faulty block sent at 10 s
    assert first.decision_s == pytest.approx(11.25 - 11)  # the raising window's last block sent at 11 s
    assert first.agent_s == pytest.approx(11.2 - 11)  # ... decided by the agent at 11.2 s (its clock), 0.05 s earlier
    assert acc.clears == {"recovered": 1} and acc.open_at_end == 1
    assert acc.onset_s == [pytest.approx(1.25), pytest.approx(52.35 - (50 - 100.0))]


def test_a_window_ending_one_block_after_the_episode_still_belongs_to_it() -> None:
    acc = _account([_msg("a", "new", 14, 14.2)], episodes=[EP1])  # window of blocks 13 (faulty) and 14
    assert acc.counts[RAISED] == 1
    acc = _account([_msg("a", "new", 15, 15.2)], episodes=[EP1])  # blocks 14 and 15: healthy
    assert acc.counts[MISSED] == 1 and len(acc.false_alerts) == 1


def test_event_still_open_when_the_earlier_event_never_cleared() -> None:
    acc = _account([_msg("a", "new", 11, 11.2)])
    assert [o.reason for o in acc.outcomes] == [RAISED, EVENT_STILL_OPEN]
    assert acc.outcomes[1].event_id == "a"
    assert acc.open_at_end == 1


def test_event_still_open_when_it_cleared_only_after_the_episode_began() -> None:
    # the clear's window ends at block 60, after the episode's first block (50): open when it began
    acc = _account([_msg("a", "new", 11, 11.2), _msg("a", "clear", 60, 60.1)])
    assert [o.reason for o in acc.outcomes] == [RAISED, EVENT_STILL_OPEN]


def test_flapping_hold_is_told_apart_from_an_event_not_yet_cleared() -> None:
    messages = [_msg("a", "new", 11, 11.2), _msg("a", "update", 40, 40.1, reason="flapping")]
    acc = _account(messages)
    assert [o.reason for o in acc.outcomes] == [RAISED, FLAPPING_HOLD]
    assert acc.flapping_holds == 1
    # a flapping update only after the episode began: the event was simply still open then
    late = _account([_msg("a", "new", 11, 11.2), _msg("a", "update", 55, 55.1, reason="flapping")])
    assert [o.reason for o in late.outcomes] == [RAISED, EVENT_STILL_OPEN]


def test_cooldown_when_the_last_clear_was_less_than_cooldown_s_before_the_episode() -> None:
    # cleared by the window ending at block 20, decided at 20 s; the next episode's first block sent at 50 s
    acc = _account([_msg("a", "new", 11, 11.2), _msg("a", "clear", 20, 20.0)])
    assert [o.reason for o in acc.outcomes] == [RAISED, COOLDOWN]
    assert acc.outcomes[1].event_id == "a"
    # the same clear, the episode's first block sent 61 s after it: a real miss
    sent = {**SENT, **{(0, k): k + 31.0 for k in range(50, 80)}}
    acc = _account([_msg("a", "new", 11, 11.2), _msg("a", "clear", 20, 20.0)], sent=sent)
    assert [o.reason for o in acc.outcomes] == [RAISED, MISSED]


def test_cooldown_compares_the_agent_clock_with_the_publisher_clock() -> None:
    offset = 1_700_000_000 * NS  # the agent's time_ns = perf seconds * 1e9 + offset
    msgs = [
        AlertMessage(0, "a", "new", "raised", 11, offset + 11 * NS, 11.2),
        AlertMessage(0, "a", "clear", "recovered", 20, offset + 20 * NS, 20.1),
    ]
    acc = account([EP1, EP2], msgs, SENT, cooldown_s=COOL_S, window_blocks=WINDOW_BLOCKS, perf_to_epoch_ns=offset)
    assert [o.reason for o in acc.outcomes] == [RAISED, COOLDOWN]


def test_false_alerts_are_new_events_of_no_episode_or_a_second_one_of_the_same() -> None:
    messages = [
        _msg("x", "new", 30, 30.2),  # healthy gap: no episode
        _msg("x", "clear", 40, 40.0),
        _msg("a", "new", 11, 11.2),
        _msg("dup", "new", 13, 13.2),  # a second new inside episode 1 (cannot happen with one track, still counted)
        _msg("other", "new", 11, 11.2, machine=3),  # a machine without episodes
    ]
    acc = _account(messages, episodes=[EP1])
    assert acc.counts[RAISED] == 1 and acc.outcomes[0].event_id == "a"
    assert sorted(m.event_id for m in acc.false_alerts) == ["dup", "other", "x"]
    assert acc.clears == {"recovered": 1}


def test_a_false_alert_still_open_explains_the_next_episode() -> None:
    acc = _account([_msg("x", "new", 30, 30.2)], episodes=[EP2])
    assert acc.counts[EVENT_STILL_OPEN] == 1 and len(acc.false_alerts) == 1


def test_run_ended_when_the_episode_was_not_all_sent() -> None:
    sent = {k: v for k, v in SENT.items() if k[1] < 52}  # blocks 52, 53 never sent
    acc = _account([_msg("a", "new", 11, 11.2)], sent=sent)
    assert [o.reason for o in acc.outcomes] == [RAISED, RUN_ENDED]


def test_missed_when_nothing_explains_it() -> None:
    acc = _account([])
    assert acc.counts[MISSED] == 2 and acc.counts[RAISED] == 0
    assert acc.onset_s == [] and acc.decision_s == []


def test_every_reason_in_one_stream_adds_up_to_the_episodes() -> None:
    eps = [Episode(j, 0, 10, 13) for j in range(5)] + [Episode(j, 1, 50, 53) for j in range(5)]
    sent = {(j, k): float(k) for j in range(5) for k in range(80) if not (j == 4 and k >= 51)}
    messages = [
        _msg("r0", "new", 11, 11.2, machine=0),
        _msg("r0", "clear", 40, 40.0, machine=0),  # -> cooldown
        _msg("r1", "new", 12, 12.2, machine=1),  # never cleared -> still open
        _msg("r2", "new", 11, 11.2, machine=2),
        _msg("r2", "update", 38, 38.0, reason="flapping", machine=2),  # -> flapping hold
        _msg("r3", "new", 52, 52.2, machine=3),  # episode 0 of machine 3 missed, episode 1 raised
        _msg("f", "new", 70, 70.2, machine=3),  # false alert
    ]
    acc = account(eps, messages, sent, cooldown_s=COOL_S, window_blocks=WINDOW_BLOCKS)
    reasons = {(o.episode.machine, o.episode.index): o.reason for o in acc.outcomes}
    assert reasons == {
        (0, 0): RAISED,
        (0, 1): COOLDOWN,
        (1, 0): RAISED,
        (1, 1): EVENT_STILL_OPEN,
        (2, 0): RAISED,
        (2, 1): FLAPPING_HOLD,
        (3, 0): MISSED,
        (3, 1): RAISED,
        (4, 0): MISSED,
        (4, 1): RUN_ENDED,
    }
    assert sum(acc.counts.values()) == len(eps) == 10
    assert len(acc.false_alerts) == 1


# -- the schedule against the real alert engine with the shipped rule ---------------------------------------


def _simulate(schedule: AlertSchedule, rule: AlertRule, speed: float, lag_s: float = 0.05) -> list[AlertMessage]:
    """The engine fed one window per block per machine, hot while it holds fault samples; its clock is the
    wall clock of the replay (block k of machine j sent at (k + j / machines) * 0.2 / speed s, decided lag_s later)."""
    ids = itertools.count()
    engine = AlertEngine(RuleBook(rule, {"vibration-anomaly": rule}), new_event_id=lambda: f"e{next(ids)}")
    sources = [Source.of(machine=f"m{j:04d}", sensor="vibration") for j in range(schedule.machines)]
    out: list[AlertMessage] = []
    for k in range(1, schedule.total_blocks):
        for j in range(schedule.machines):
            hot = schedule.faulty(j, k) or schedule.faulty(j, k - 1)
            sent = (k + j / schedule.machines) * 0.2 / speed
            now_ns = int((sent + lag_s) * NS)
            score = Score(sources[j], (k - 1) * NS, (k + 1) * NS, "vibration-anomaly", "1", 5.0 if hot else 0.1, 1.0)
            for a in engine.observe(score, now_ns) + engine.tick(now_ns):
                out.append(AlertMessage(j, a.event_id, a.state, a.reason, k, a.time_ns, a.time_ns / NS + 0.01))
    return out


def _sent(schedule: AlertSchedule, speed: float) -> dict[tuple[int, int], float]:
    return {
        (j, k): (k + j / schedule.machines) * 0.2 / speed
        for j in range(schedule.machines)
        for k in range(schedule.total_blocks)
    }


def test_with_the_shipped_rule_every_designed_episode_raises() -> None:
    rule = load_config(REPO / "config" / "agent.yaml").alerts.rulebook().rule("vibration-anomaly")
    speed = 0.5
    schedule, design = design_schedule(
        rule,
        speed=speed,
        block_period_s=0.2,
        window_blocks=2,
        hop_blocks=1.0,
        machines=3,
        episodes=10,
        warmup_blocks=10,
        faulty_blocks=4,
        stagger_s=2.0,
        margin_s=5.0,
    )
    assert schedule.episodes == math.ceil(rule.flap_max_transitions / 2)
    assert design["gap_wall_s"] >= rule.cooldown_s + rule.clear_after * 0.2 / speed
    messages = _simulate(schedule, rule, speed)
    acc = account(
        schedule.episode_list(),
        messages,
        _sent(schedule, speed),
        cooldown_s=rule.cooldown_s,
        window_blocks=2,
    )
    assert acc.counts[RAISED] == len(schedule.episode_list()) == 3 * schedule.episodes
    assert acc.false_alerts == []
    assert acc.clears == {"recovered": 3 * (schedule.episodes - 1)}
    assert acc.flapping_holds == 3  # the last event of each machine: its clear would flap
    assert all(o.decision_s == pytest.approx(0.06, abs=1e-6) for o in acc.outcomes)


def test_one_more_episode_than_the_flapping_rule_allows_is_a_flapping_hold() -> None:
    rule = load_config(REPO / "config" / "agent.yaml").alerts.rulebook().rule("vibration-anomaly")
    designed, _ = design_schedule(
        rule,
        speed=1.0,
        block_period_s=0.2,
        window_blocks=2,
        hop_blocks=1.0,
        machines=2,
        episodes=3,
        warmup_blocks=10,
        faulty_blocks=4,
        stagger_s=0.0,
        margin_s=5.0,
    )
    schedule = AlertSchedule(2, 10, designed.faulty_blocks, designed.gap_blocks, designed.episodes + 1, 0, 30)
    acc = account(
        schedule.episode_list(),
        _simulate(schedule, rule, 1.0),
        _sent(schedule, 1.0),
        cooldown_s=rule.cooldown_s,
        window_blocks=2,
    )
    assert acc.counts[RAISED] == 2 * designed.episodes
    assert acc.counts[FLAPPING_HOLD] == 2


def test_the_old_16_block_cycle_cannot_raise_most_episodes_and_says_why() -> None:
    """The schedule this benchmark used before: 4 faulty blocks every 16 (the shipped rule clears after 25)."""
    rule = load_config(REPO / "config" / "agent.yaml").alerts.rulebook().rule("vibration-anomaly")
    schedule = AlertSchedule(2, 10, 4, 12, 20, 0, 2)
    acc = account(
        schedule.episode_list(),
        _simulate(schedule, rule, 2.0),
        _sent(schedule, 2.0),
        cooldown_s=rule.cooldown_s,
        window_blocks=2,
    )
    assert acc.counts[RAISED] == 2  # the first episode of each machine; its event never clears
    assert acc.counts[EVENT_STILL_OPEN] == 2 * 19
