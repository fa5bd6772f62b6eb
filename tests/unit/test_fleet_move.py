"""Moving a machine between two agents of a fleet carries its state: the new owner continues the fitted
commissioning baseline and the open alert instead of learning "normal" again (``pdm_tools.fleet``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.alerts.engine import AlertEngine
from agent.alerts.rules import AlertRule, RuleBook
from agent.alerts.store import AlertStateStore
from agent.commissioning.scorer import CommissioningScorer
from agent.commissioning.store import BaselineStore
from agent.metrics import Metrics
from agent.records import Reading, Source
from pdm_tools.fleet import MoveRefused, StatePaths, main, move_machine
from tests.unit.test_alert_engine import T0, Clock
from tests.unit.test_commissioning_state import CHANNELS, CONFIG, _save, _steps

S = 10**9
RULES = RuleBook(AlertRule(raise_n=2, raise_m=3, clear_after=3, cooldown_s=0, renotify_s=0))
MOVED = Source.of(site="s1", line="l1", machine="press-7", sensor="process")
STAYS = Source.of(site="s1", line="l1", machine="lathe-2", sensor="process")


def _scorer(path: Path) -> CommissioningScorer:
    return CommissioningScorer(CONFIG, ["process"], CHANNELS, Metrics(), BaselineStore(path))


def _feed(scorer: CommissioningScorer, source: Source, steps: int) -> None:
    for i, row in enumerate(_steps(steps)):
        scorer.score(Reading(source, T0 + i * S, dict(zip(CHANNELS, map(float, row), strict=True))))


def _old_owner(paths: StatePaths) -> None:
    """Agent A: both machines commissioned (fitted), an open alert on each; its state saved at its stop."""
    scorer = _scorer(paths.baselines)
    _feed(scorer, MOVED, 80)
    _feed(scorer, STAYS, 80)
    assert scorer.phase(MOVED) == scorer.phase(STAYS) == "monitoring"
    _save(scorer)
    clock = Clock(AlertEngine(RULES))
    clock.feed([2.0, 2.0], source=MOVED)
    clock.feed([2.0, 2.0], source=STAYS)
    AlertStateStore(paths.alerts).save(clock.engine.to_state())


def test_the_new_owner_continues_the_baseline_and_the_open_alert_and_the_old_one_forgets_them(tmp_path: Path) -> None:
    a = StatePaths(tmp_path / "a" / "alert_state.json", tmp_path / "a" / "commissioning_baselines.json")
    b = StatePaths(tmp_path / "b" / "alert_state.json", tmp_path / "b" / "commissioning_baselines.json")
    _old_owner(a)

    moved = move_machine(a, b, "press-7")
    assert (moved.baselines, moved.alert_tracks, moved.open_events) == (1, 1, 1)

    new_owner = _scorer(b.baselines)
    assert new_owner.restore() == 1
    assert new_owner.phase(MOVED) == "monitoring"  # not commissioning again
    engine = AlertEngine(RULES)
    assert engine.restore(AlertStateStore(b.alerts).load() or {}, T0) == 1
    assert engine.machine_state("press-7", T0)["state"] != "ok"

    old_owner = _scorer(a.baselines)
    assert old_owner.restore() == 1
    assert old_owner.phase(MOVED) is None and old_owner.phase(STAYS) == "monitoring"
    left = AlertEngine(RULES)
    assert left.restore(AlertStateStore(a.alerts).load() or {}, T0) == 1
    assert "press-7" not in left.machines


def test_a_move_is_refused_without_state_over_existing_state_and_across_specs(tmp_path: Path) -> None:
    a = StatePaths(tmp_path / "a" / "alert_state.json", tmp_path / "a" / "commissioning_baselines.json")
    b = StatePaths(tmp_path / "b" / "alert_state.json", tmp_path / "b" / "commissioning_baselines.json")
    _old_owner(a)
    with pytest.raises(MoveRefused, match="no state at the source"):
        move_machine(a, b, "nobody")
    move_machine(a, b, "press-7")
    _old_owner(a)  # press-7 has state on both sides now
    with pytest.raises(MoveRefused, match="already has state"):
        move_machine(a, b, "press-7")
    doc = b.baselines.read_text().replace('"spec":"', '"spec":"other-')
    b.baselines.write_text(doc)
    with pytest.raises(MoveRefused, match="different commissioning configs"):
        move_machine(a, b, "lathe-2")


def test_the_command_reads_both_agents_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"spool:\n  path: {tmp_path / name / 'spool.db'}\n")
        configs.append(str(path))
    _old_owner(StatePaths(tmp_path / "a" / "alert_state.json", tmp_path / "a" / "commissioning_baselines.json"))
    assert main(["move-machine", "--machine", "press-7", "--from", configs[0], "--to", configs[1]]) == 0
    assert "moved press-7: 1 baseline(s), 1 alert track(s) (1 open)" in capsys.readouterr().out
    assert main(["move-machine", "--machine", "press-7", "--from", configs[0], "--to", configs[1]]) == 1
