"""Alert quality on the simulator: false alerts on healthy machines, detection delay and messages per fault.

Runs the agent's real scoring path in one process, in simulated time: ``SimulatedMachine`` models give
vibration ``SampleBlock``s and 1 Hz process ``Reading``s, the agent's ``Windower`` cuts them, and a
``ScoringWorker`` built from ``config/agent.yaml`` by the composition root's own builders
(``bootstrap.build_stages`` and ``build_scoring``: the shipped ONNX models, the defect classifier, the
commissioning baseline, and the ``AlertEngine`` with the config's ``alerts`` rules) scores them with a
simulated clock. A fake broker keeps every alert message; a fake spool
discards the lines. No MQTT or InfluxDB: this measures alert quality, not transport.

Vibration may be duty-cycled (``--snapshot-s`` seconds of contiguous blocks every ``--snapshot-period-s``,
as gateways that send snapshots do) so that a simulated day runs fast; process readings always run at
their 1 Hz. Scenarios:

1. ``healthy``: ``--machines`` healthy machines for ``--hours`` (stopped early at ``--max-wall-s``):
   false ``new`` alerts per machine-day, by alert type.
2. one run per fault kind (``--faults``): every machine of a ``--fault-machines`` fleet gets the fault,
   starting after commissioning, growing over ``ramp_s`` and ending at ``end_s``, and the run goes on
   until ``--after-end-s`` past the end: detection delay (onset -> ``new``), messages (new / update /
   clear, update reasons), whether and when the events cleared, and the defect class the alert named.

    .venv/bin/python benchmarks/alert_quality.py [--hours 24] [--machines 4] \\
        [--out benchmarks/results/alert_quality.json] [--models DIR] [--record DIR]

``--record DIR`` saves every input of the alert engine (scores, defect verdicts, ticks) per scenario;
``--replay DIR [--set KNOB=VALUE ...] [--ignore-defect normal]`` feeds them to a fresh engine under other
rules and prints the same tables (without running a model); ``--report FILE`` recomputes the tables of a
stored result. Results and discussion: ``docs/alert_quality.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import logging
import math
import pickle
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.alerts.engine import AlertEngine
from agent.alerts.payload import alert_body
from agent.alerts.rules import RuleBook
from agent.bootstrap import Stages, build_scoring, build_stages
from agent.config import Config, load_config
from agent.metrics import Metrics
from agent.records import NS_PER_S, Alert, Reading, SampleBlock, Score, Source, Window
from agent.runtime.scoring import ScoringWorker
from agent.spool.codec import Entry
from pdm_tools.simulator.gateway import sample_time_ns
from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile

logger = logging.getLogger("alert_quality")

REPO = Path(__file__).resolve().parents[1]
T0_NS = 1_790_000_000 * NS_PER_S
BLOCK_SAMPLES = 2048  # as config/simulator.yaml: 0.2 s per vibration message at 10240 Hz
FLEET_SEED = 42  # config/simulator.yaml's seed: the same fleet of machines
TAGS = {"site": "site1", "line": "line1"}
SEVERITY_RANK = {"warning": 0, "major": 1, "critical": 2}
TYPES = ("vibration-anomaly", "process-anomaly", "commissioning-baseline")


@dataclass(frozen=True)
class FaultCase:
    """One fault case: ``kind`` (on ``sensor`` for sensor faults) growing to ``severity`` over ``ramp_s``."""

    name: str
    kind: str
    severity: float = 1.0
    ramp_s: float = 0.0
    sensor: str | None = None


# Severities: bearings at 0.25 (the weakest level of the model card's evaluation), imbalance and
# overheating at 0.5 (overheating as benchmarks/commissioning_simulator.py), all growing over 5 minutes;
# sensor faults act at once.
FAULT_CASES: dict[str, FaultCase] = {
    c.name: c
    for c in (
        FaultCase("bearing_outer", "bearing_outer", 0.25, 300.0),
        FaultCase("bearing_inner", "bearing_inner", 0.25, 300.0),
        FaultCase("bearing_ball", "bearing_ball", 0.25, 300.0),
        FaultCase("imbalance", "imbalance", 0.5, 300.0),
        FaultCase("overheating", "overheating", 0.5, 300.0),
        FaultCase("sensor_stuck/vibration", "sensor_stuck", sensor="vibration"),
        FaultCase("sensor_stuck/process", "sensor_stuck", sensor="process"),
        FaultCase("dropout/vibration", "dropout", sensor="vibration"),
        FaultCase("dropout/process", "dropout", sensor="process"),
    )
}


@dataclass(frozen=True)
class DutyCycle:
    """Vibration is sent for ``snapshot_s`` of every ``period_s`` (continuous when ``snapshot_s >= period_s``)."""

    snapshot_s: float
    period_s: float

    @property
    def continuous(self) -> bool:
        return self.snapshot_s >= self.period_s

    def covers(self, t0_s: float, t1_s: float) -> bool:
        """Whether the block ``[t0_s, t1_s)`` lies inside one snapshot, so a snapshot's blocks are contiguous.

        >>> d = DutyCycle(4.0, 60.0)
        >>> d.covers(0.0, 0.2), d.covers(3.8, 4.0), d.covers(3.9, 4.1), d.covers(60.0, 60.2)
        (True, True, False, True)
        """
        if self.continuous:
            return True
        start = math.floor(t0_s / self.period_s + 1e-9) * self.period_s
        return t1_s <= start + self.snapshot_s + 1e-9


class CountingEngine(AlertEngine):
    """The real engine, also counting per alert type the scores it sees, the hot ones and the largest ratio."""

    def __init__(self, *args: Any, record: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: Counter[str] = Counter()
        self.hot: Counter[str] = Counter()
        self.max_ratio: dict[str, float] = {}
        self.inputs: list[tuple[Any, ...]] | None = [] if record else None
        """With ``record``: every ``observe`` and ``tick`` call in order, for ``replay`` under other rules."""

    def observe(
        self, score: Score, now_ns: int, defect: Mapping[str, Any] | None = None, *args: Any, **kwargs: Any
    ) -> list[Alert]:
        ratio = score.score / score.threshold
        self.seen[score.model_id] += 1
        self.hot[score.model_id] += ratio > self._rules.rule(score.model_id).enter
        self.max_ratio[score.model_id] = max(self.max_ratio.get(score.model_id, 0.0), ratio)
        if self.inputs is not None:
            # Plain fields, not the record: a pickle of the record would not load once ``Score`` grows a field.
            fields = {f.name: getattr(score, f.name) for f in dataclasses.fields(score)}
            self.inputs.append(("observe", now_ns, fields, None if defect is None else dict(defect)))
        return super().observe(score, now_ns, defect, *args, **kwargs)

    def tick(self, now_ns: int) -> list[Alert]:
        if self.inputs is not None:
            self.inputs.append(("tick", now_ns))
        return super().tick(now_ns)

    def score_stats(self) -> dict[str, dict[str, float]]:
        return {
            t: {"scored": n, "hot": self.hot[t], "max_ratio": round(self.max_ratio[t], 3)} for t, n in self.seen.items()
        }


class CaptureBroker:
    """The MQTT side of the scoring worker: keeps every alert body, ignores the rest."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if "/alerts/" in topic:
            self.alerts.append(json.loads(payload))

    def ack(self, mid: int, qos: int) -> None:
        pass


class NullSpool:
    """Discards the line-protocol lines (storage is not measured here)."""

    def append_lines(self, lines: Sequence[str]) -> int:
        return len(lines)

    def append_entries(self, entries: Sequence[Entry]) -> int:
        return len(entries)


class SimClock:
    """The scoring worker's clock: simulated nanoseconds, advanced by the driver."""

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


@dataclass
class Pipeline:
    """The agent's scoring half, built by ``agent/bootstrap.py``'s builders, with fakes for the I/O."""

    config: Config
    metrics: Metrics
    stages: Stages
    worker: ScoringWorker
    engine: CountingEngine
    broker: CaptureBroker
    clock: SimClock
    errors: int = 0

    def feed(self, items: Sequence[Reading | SampleBlock]) -> list[Window | Reading]:
        """What the ingest worker queues for these items: their windows, and readings for the baseline."""
        return self.stages.feed(items)

    def score(self, batch: Sequence[Window | Reading], now_ns: int) -> None:
        """One scoring-worker step at simulated time ``now_ns``; a failing batch is counted as the thread would."""
        self.clock.now_ns = now_ns
        try:
            self.worker.process(batch)
        except Exception:
            self.errors += 1
            self.metrics.inc("pipeline.errors", worker="scoring")
            logger.exception("scoring batch failed (the agent's worker would log this and continue)")


def with_models_dir(config: Config, models_dir: Path) -> Config:
    """``config`` with each model directory taken from ``models_dir`` (same directory names)."""
    inference = config.inference
    models = tuple(
        e if e.path is None else e.model_copy(update={"path": models_dir / e.path.name}) for e in inference.models
    )
    d = inference.defect
    defect = d if d.path is None else d.model_copy(update={"path": models_dir / d.path.name})
    return config.model_copy(update={"inference": inference.model_copy(update={"models": models, "defect": defect})})


def model_files(config: Config) -> list[dict[str, Any]]:
    """Id, version, ONNX file and sha256 of each model the config loads (from the manifests)."""
    paths = [e.path for e in config.inference.models] + [config.inference.defect.path]
    out = []
    for path in filter(None, paths):
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        out.append(
            {k: manifest.get(k) for k in ("model_id", "version", "file", "sha256", "threshold")} | {"dir": str(path)}
        )
    return out


def build_pipeline(config: Config, record: bool = False) -> Pipeline:
    """The scoring side of ``config`` through the composition root's builders, with fakes for the I/O and the clock."""
    metrics = Metrics()
    stages = build_stages(config, metrics)
    broker = CaptureBroker()
    clock = SimClock(T0_NS)
    engine = CountingEngine(config.alerts.rulebook(), metrics=metrics, record=record)
    worker = build_scoring(config, stages, metrics, spool=NullSpool(), broker=broker, engine=engine, clock_ns=clock)
    return Pipeline(config, metrics, stages, worker, engine, broker, clock)


def machines_for(count: int, faults: Callable[[str], list[Fault]], first_index: int = 0) -> list[SimulatedMachine]:
    """The fleet of config/simulator.yaml (seed 42, varied profiles); machine ``i`` gets ``faults(name)``."""
    out = []
    for index in range(first_index, first_index + count):
        profile = fleet_profile(index, FLEET_SEED)
        out.append(SimulatedMachine(profile, faults(profile.name), seed=FLEET_SEED))
    return out


def run(
    pipeline: Pipeline,
    machines: Sequence[SimulatedMachine],
    duration_s: int,
    duty: DutyCycle,
    max_wall_s: float | None = None,
) -> int:
    """Drive the pipeline for ``duration_s`` simulated seconds; returns the seconds actually run.

    Each simulated second: every machine's process reading at that second and its vibration blocks that
    complete within it (a block is sent once its last sample exists, as the gateway does), then one
    scoring step with the clock at the end of the second (the scoring worker drains what is ready).
    """
    sources = [
        (
            Source.of(**TAGS, machine=m.profile.name, sensor="process"),
            Source.of(**TAGS, machine=m.profile.name, sensor="vibration"),
        )
        for m in machines
    ]
    started = time.monotonic()
    for s in range(duration_s):
        items: list[Reading | SampleBlock] = []
        for machine, (process_source, vibration_source) in zip(machines, sources, strict=True):
            values = machine.process(float(s))
            if values is not None:
                items.append(Reading(process_source, T0_NS + s * NS_PER_S, values))
            rate = machine.profile.rate_hz
            # Blocks k whose end, (k + 1) * BLOCK_SAMPLES samples, falls in (s, s + 1] seconds.
            k_lo = math.floor(s * rate / BLOCK_SAMPLES)
            k_hi = math.floor((s + 1) * rate / BLOCK_SAMPLES)
            blocks = [
                k
                for k in range(k_lo, k_hi)
                if duty.covers(k * BLOCK_SAMPLES / rate, (k + 1) * BLOCK_SAMPLES / rate)
                and machine.publishes("vibration", k * BLOCK_SAMPLES / rate)
            ]
            # One simulator call per run of consecutive blocks (the signal tiles exactly), then split.
            for run_blocks in _consecutive(blocks):
                first = run_blocks[0] * BLOCK_SAMPLES
                samples = machine.vibration(first / rate, len(run_blocks) * BLOCK_SAMPLES)
                for i, k in enumerate(run_blocks):
                    block_first = k * BLOCK_SAMPLES
                    items.append(
                        SampleBlock(
                            vibration_source,
                            T0_NS + sample_time_ns(block_first, rate),
                            rate,
                            samples[i * BLOCK_SAMPLES : (i + 1) * BLOCK_SAMPLES],
                        )
                    )
        pipeline.score(pipeline.feed(items), T0_NS + (s + 1) * NS_PER_S)
        if max_wall_s is not None and time.monotonic() - started > max_wall_s:
            return s + 1
    return duration_s


def _consecutive(ks: list[int]) -> list[list[int]]:
    """Split sorted integers into runs of consecutive ones.

    >>> _consecutive([1, 2, 3, 7, 8])
    [[1, 2, 3], [7, 8]]
    """
    runs: list[list[int]] = []
    for k in ks:
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


# -- analysis ---------------------------------------------------------------------------------------------


def _t_s(alert: dict[str, Any]) -> float:
    """Run time (s) of an alert message's decision."""
    when = datetime.datetime.fromisoformat(alert["time"].replace("Z", "+00:00"))
    return round(when.timestamp() - T0_NS / NS_PER_S, 3)


def _message(alert: dict[str, Any]) -> dict[str, Any]:
    defect = alert.get("defect")
    return {
        "t_s": _t_s(alert),
        "machine": alert["machine"],
        "sensor": alert["sensor"],
        "alert_type": alert["alert_type"],
        "event_id": alert["event_id"][:8],
        "state": alert["state"],
        "reason": alert["reason"],
        "severity": alert["severity"],
        "ratio": round(alert["score"] / alert["threshold"], 3),
        "defect": None if defect is None else defect["defect"],
    }


def healthy_scenario(
    config: Config, machines: int, hours: float, duty: DutyCycle, max_wall_s: float, record: bool = False
) -> dict[str, Any]:
    pipeline = build_pipeline(config, record)
    fleet = machines_for(machines, lambda name: [])
    started = time.monotonic()
    ran_s = run(pipeline, fleet, round(hours * 3600), duty, max_wall_s)
    wall_s = time.monotonic() - started
    messages = [_message(a) for a in pipeline.broker.alerts]
    return {
        "machines": machines,
        "simulated_s": ran_s,
        "machine_hours": round(machines * ran_s / 3600, 2),
        "wall_s": round(wall_s, 1),
        "windows_scored": {t: int(pipeline.metrics.get("windows.scored", model=t)) for t in TYPES[:2]},
        "baseline_steps_scored": int(pipeline.metrics.get("commissioning.steps", phase="monitoring")),
        "scores": pipeline.engine.score_stats(),
        **_healthy_summary(messages, machines, ran_s),
        "counters": counters(pipeline.metrics),
        "messages": messages,
        "inputs": pipeline.engine.inputs,
    }


def _healthy_summary(messages: list[dict[str, Any]], machines: int, ran_s: float) -> dict[str, Any]:
    machine_days = machines * ran_s / 86400
    new_by_type = Counter(m["alert_type"] for m in messages if m["state"] == "new")
    return {
        "false_new": {t: new_by_type.get(t, 0) for t in TYPES},
        "false_new_per_machine_day": {t: round(new_by_type.get(t, 0) / machine_days, 3) for t in TYPES},
        "messages_by_state": dict(Counter(m["state"] for m in messages)),
    }


def fault_scenario(
    config: Config,
    case: FaultCase,
    machines: int,
    onset_s: float,
    duration_s: float,
    after_end_s: float,
    duty: DutyCycle,
    record: bool = False,
) -> dict[str, Any]:
    end_s = onset_s + duration_s

    def faults(name: str) -> list[Fault]:
        return [Fault(name, case.kind, onset_s, end_s, case.severity, case.sensor, case.ramp_s)]

    pipeline = build_pipeline(config, record)
    fleet = machines_for(machines, faults)
    started = time.monotonic()
    total_s = round(end_s + after_end_s)
    run(pipeline, fleet, total_s, duty)
    wall_s = time.monotonic() - started
    messages = [_message(a) for a in pipeline.broker.alerts]
    per_machine = [_fault_outcome(m.profile.name, messages, onset_s, end_s) for m in fleet]
    return {
        "case": asdict(case),
        "onset_s": onset_s,
        "end_s": end_s,
        "run_s": total_s,
        "machines": machines,
        "wall_s": round(wall_s, 1),
        "scores": pipeline.engine.score_stats(),
        "counters": counters(pipeline.metrics),
        "per_machine": per_machine,
        "summary": _fault_summary(per_machine),
        "messages": messages,
        "inputs": pipeline.engine.inputs,
    }


def _fault_outcome(machine: str, messages: list[dict[str, Any]], onset_s: float, end_s: float) -> dict[str, Any]:
    mine = [m for m in messages if m["machine"] == machine]
    before = [m for m in mine if m["t_s"] < onset_s]
    after = [m for m in mine if m["t_s"] >= onset_s]
    # Events opened after the onset (an event open at the onset is a false alert, counted in ``before``).
    opened = [m for m in after if m["state"] == "new"]
    event_ids = {m["event_id"] for m in opened}
    events = [m for m in after if m["event_id"] in event_ids]
    first_new = opened[0] if opened else None
    clears = [m for m in events if m["state"] == "clear"]
    cleared_ids = {m["event_id"] for m in clears}
    last_clear = max((m["t_s"] for m in clears), default=None)
    all_cleared = bool(event_ids) and cleared_ids == event_ids
    updates_per_event = Counter(m["event_id"] for m in events if m["state"] == "update")
    downgrades = normal_flips = 0
    for event_id in event_ids:
        chain = [m for m in events if m["event_id"] == event_id]
        for previous, m in itertools.pairwise(chain):
            if m["state"] != "update":
                continue
            if "severity" in m["reason"] and SEVERITY_RANK[m["severity"]] < SEVERITY_RANK[previous["severity"]]:
                downgrades += 1
            if "defect" in m["reason"] and "normal" in (m["defect"], previous["defect"]):
                normal_flips += 1
    return {
        "machine": machine,
        "false_new_before_onset": sum(1 for m in before if m["state"] == "new"),
        "detected": first_new is not None,
        "detected_during_fault": first_new is not None and first_new["t_s"] <= end_s + 60,
        "delay_s": None if first_new is None else round(first_new["t_s"] - onset_s, 1),
        "first_alert_type": None if first_new is None else first_new["alert_type"],
        "delay_s_by_type": {
            t: round(min(m["t_s"] for m in opened if m["alert_type"] == t) - onset_s, 1)
            for t in sorted({m["alert_type"] for m in opened})
        },
        "first_severity": None if first_new is None else first_new["severity"],
        "events": len(event_ids),
        "events_by_type": dict(Counter(m["alert_type"] for m in opened)),
        "new": sum(1 for m in events if m["state"] == "new"),
        "update": sum(1 for m in events if m["state"] == "update"),
        "clear": len(clears),
        "update_reasons": dict(Counter(m["reason"] for m in events if m["state"] == "update")),
        "max_updates_per_event": max(updates_per_event.values(), default=0),
        "severity_downgrade_updates": downgrades,
        "defect_updates_to_or_from_normal": normal_flips,
        "all_cleared": all_cleared,
        "clear_reasons": dict(Counter(m["reason"] for m in clears)),
        "clear_after_end_s": round(last_clear - end_s, 1) if all_cleared and last_clear is not None else None,
        "open_at_end_of_run": sorted(event_ids - cleared_ids),
        "defects_named": dict(Counter(m["defect"] for m in events if m["state"] in ("new", "update") and m["defect"])),
        "new_defect": None if first_new is None else first_new["defect"],
    }


def reanalyse(result: dict[str, Any]) -> dict[str, Any]:
    """Recompute the per-machine outcomes and summaries of a stored result from its messages."""
    for f in result["faults"]:
        machines = sorted({m["machine"] for m in f["per_machine"]})
        f["per_machine"] = [_fault_outcome(name, f["messages"], f["onset_s"], f["end_s"]) for name in machines]
        f["summary"] = _fault_summary(f["per_machine"])
    return result


def _fault_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    delays = [r["delay_s"] for r in rows if r["detected_during_fault"]]
    reasons: Counter[str] = Counter()
    defects: Counter[str] = Counter()
    for r in rows:
        reasons.update(r["update_reasons"])
        defects.update({k: 1 for k in r["defects_named"]})
    clear_delays = [r["clear_after_end_s"] for r in rows if r["clear_after_end_s"] is not None]
    return {
        "detected": sum(r["detected_during_fault"] for r in rows),
        "machines": n,
        "delay_s_median": statistics.median(delays) if delays else None,
        "delay_s_min": min(delays) if delays else None,
        "delay_s_max": max(delays) if delays else None,
        "first_alert_types": dict(Counter(r["first_alert_type"] for r in rows if r["first_alert_type"])),
        "delay_s_median_by_type": {
            t: statistics.median(r["delay_s_by_type"][t] for r in rows if t in r["delay_s_by_type"])
            for t in sorted({t for r in rows for t in r["delay_s_by_type"]})
        },
        "events_per_fault": round(sum(r["events"] for r in rows) / n, 2),
        "new_per_fault": round(sum(r["new"] for r in rows) / n, 2),
        "update_per_fault": round(sum(r["update"] for r in rows) / n, 2),
        "clear_per_fault": round(sum(r["clear"] for r in rows) / n, 2),
        "max_updates_per_event": max((r["max_updates_per_event"] for r in rows), default=0),
        "severity_downgrade_updates_per_fault": round(sum(r["severity_downgrade_updates"] for r in rows) / n, 2),
        "defect_updates_to_or_from_normal_per_fault": round(
            sum(r["defect_updates_to_or_from_normal"] for r in rows) / n, 2
        ),
        "update_reasons": dict(reasons),
        "cleared": sum(r["all_cleared"] for r in rows),
        "clear_after_end_s_median": statistics.median(clear_delays) if clear_delays else None,
        "false_new_before_onset": sum(r["false_new_before_onset"] for r in rows),
        "defects_named": dict(defects),
        "defect_in_new": dict(Counter(r["new_defect"] or "(none)" for r in rows if r["detected"])),
    }


# -- record and replay ------------------------------------------------------------------------------------


def save_inputs(directory: Path, name: str, scenario: dict[str, Any]) -> None:
    """Pickle a scenario's engine inputs (and what the analysis needs) for ``--replay``."""
    inputs = scenario.pop("inputs")
    if inputs is None:
        return
    meta = {k: v for k, v in scenario.items() if k not in ("messages", "per_machine", "summary", "counters")}
    if "per_machine" in scenario:
        meta["machine_names"] = [m["machine"] for m in scenario["per_machine"]]
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{name.replace('/', '_')}.pkl").open("wb") as f:
        pickle.dump({"name": name, "meta": meta, "inputs": inputs}, f, protocol=pickle.HIGHEST_PROTOCOL)


def replay(
    inputs: Sequence[tuple[Any, ...]], rules: RuleBook, ignore_defects: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The messages a fresh engine with ``rules`` publishes for the recorded scores and ticks.

    ``ignore_defects``: defect verdicts of these classes are not passed to the engine (as if the engine
    never let, say, ``normal`` name or replace the defect of an anomalous event).
    """
    ids = iter(range(10**9))
    engine = AlertEngine(rules, new_event_id=lambda: f"{next(ids):08d}")
    out: list[dict[str, Any]] = []
    for record in inputs:
        if record[0] == "tick":
            alerts = engine.tick(record[1])
        else:
            defect = record[3]
            if defect is not None and defect["defect"] in ignore_defects:
                defect = None
            alerts = engine.observe(_as_score(record[2]), record[1], defect)
        out.extend(_message(alert_body(a, "replay")) for a in alerts if not a.silenced)
    return out


def _as_score(saved: Any) -> Score:
    """A ``Score`` from recorded fields (or a ``Score`` pickled by an older version of this script)."""
    names = [f.name for f in dataclasses.fields(Score)]
    values = saved if isinstance(saved, dict) else {n: getattr(saved, n) for n in names if hasattr(saved, n)}
    return Score(**{n: v for n, v in values.items() if n in names})


def replay_directory(directory: Path, rules: RuleBook, ignore_defects: Sequence[str] = ()) -> dict[str, Any]:
    """Replay every recorded scenario of ``directory`` under ``rules``; a result shaped like a run's."""
    result: dict[str, Any] = {"healthy": None, "faults": []}
    for path in sorted(directory.glob("*.pkl")):
        with path.open("rb") as f:
            saved = pickle.load(f)  # our own file, written by save_inputs
        meta, messages = saved["meta"], replay(saved["inputs"], rules, ignore_defects)
        if saved["name"] == "healthy":
            result["healthy"] = {**meta, **_healthy_summary(messages, meta["machines"], meta["simulated_s"])}
            continue
        per_machine = [_fault_outcome(n, messages, meta["onset_s"], meta["end_s"]) for n in meta["machine_names"]]
        result["faults"].append({**meta, "per_machine": per_machine, "summary": _fault_summary(per_machine)})
    order = list(FAULT_CASES)
    result["faults"].sort(key=lambda f: order.index(f["case"]["name"]) if f["case"]["name"] in order else len(order))
    return result


def rules_with(rules: RuleBook, settings: Sequence[str]) -> RuleBook:
    """``rules`` with ``knob=value`` (the default rule) or ``alert-type.knob=value`` overrides.

    >>> rules = rules_with(RuleBook(), ["update_min_interval_s=600", "vibration-anomaly.clear_after=25"])
    >>> rule = rules.rule("vibration-anomaly")
    >>> rule.clear_after, rule.update_min_interval_s, rules.default.update_min_interval_s
    (25, 600.0, 600.0)
    """
    counts = ("raise_n", "raise_m", "clear_after", "flap_max_transitions")
    changes: dict[str, dict[str, Any]] = {}
    for setting in settings:
        key, _, text = setting.partition("=")
        alert_type, _, knob = key.rpartition(".")
        changes.setdefault(alert_type, {})[knob] = int(text) if knob in counts else float(text)
    default = dataclasses.replace(rules.default, **changes.pop("", {}))
    types = dict(rules.by_type)
    for alert_type, knobs in changes.items():
        # As in config/agent.yaml: a type's own rule is the default rule with its keys replaced.
        types[alert_type] = dataclasses.replace(types.get(alert_type, default), **knobs)
    return RuleBook(default, types)


# -- report ---------------------------------------------------------------------------------------------

COUNTERS = ("alerts.suppressed", "windows.rejected", "windows.gaps", "defect.skipped", "pipeline.errors")


def counters(metrics: Metrics) -> dict[str, float]:
    """The counters that explain an outcome (suppressions, rejected windows, stream restarts)."""
    return {k: v for k, v in metrics.snapshot().items() if k.startswith(COUNTERS)}


def markdown(result: dict[str, Any]) -> str:
    lines: list[str] = []
    h = result["healthy"]
    if h is not None:
        lines.append(
            f"Healthy fleet: {h['machines']} machines x {h['simulated_s'] / 3600:.2f} h = {h['machine_hours']} "
            f"machine-hours ({h['wall_s']:g} s wall)."
        )
        lines.append("")
        lines.append(
            "| alert type | scores | hot (> enter) | largest score / threshold | false `new` | per machine-day |"
        )
        lines.append("|---|---|---|---|---|---|")
        for t, n in h["false_new"].items():
            st = h["scores"].get(t, {"scored": 0, "hot": 0, "max_ratio": 0.0})
            per_day = h["false_new_per_machine_day"][t]
            lines.append(f"| {t} | {st['scored']} | {st['hot']} | {st['max_ratio']:g} | {n} | {per_day:g} |")
        lines.append("")
    lines.append(
        "| fault (severity, ramp) | detected | delay onset→`new` s: median (min–max) | median delay by alert type, s "
        "| events / fault | new / update / clear per fault | update reasons | max updates in one event "
        "| cleared | last clear after end, s (median) | defect named (machines) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in result["faults"]:
        s, c = f["summary"], f["case"]
        delay = (
            "–"
            if s["delay_s_median"] is None
            else f"{s['delay_s_median']:g} ({s['delay_s_min']:g}–{s['delay_s_max']:g})"
        )
        sev = f" ({c['severity']:g}, {c['ramp_s']:g} s)" if c["kind"] not in ("sensor_stuck", "dropout") else ""
        clear = "–" if s["clear_after_end_s_median"] is None else f"{s['clear_after_end_s_median']:g}"
        by_type = _by_type(s.get("delay_s_median_by_type", {}))
        lines.append(
            f"| {c['name']}{sev} | {s['detected']}/{s['machines']} | {delay} | {by_type} "
            f"| {s['events_per_fault']:g} | {s['new_per_fault']:g} / {s['update_per_fault']:g} / "
            f"{s['clear_per_fault']:g} | {_counts(s['update_reasons'])} | {s['max_updates_per_event']} "
            f"| {s['cleared']}/{s['machines']} | {clear} "
            f"| {_counts(s['defects_named'])} |"
        )
    lines.append("")
    lines.append(
        "| fault | updates / fault | of which severity downgrades | defect updates to or from `normal` "
        "| defect in the `new` message (machines) |"
    )
    lines.append("|---|---|---|---|---|")
    for f in result["faults"]:
        s = f["summary"]
        lines.append(
            f"| {f['case']['name']} | {s['update_per_fault']:g} | {s['severity_downgrade_updates_per_fault']:g} "
            f"| {s['defect_updates_to_or_from_normal_per_fault']:g} | {_counts(s.get('defect_in_new', {}))} |"
        )
    return "\n".join(lines)


def _by_type(delays: dict[str, float]) -> str:
    return ", ".join(f"{t} {d:g}" for t, d in sorted(delays.items(), key=lambda kv: kv[1])) or "–"


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1])) or "–"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "agent.yaml")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours of the healthy fleet")
    parser.add_argument("--machines", type=int, default=4, help="machines of the healthy fleet (0: skip it)")
    parser.add_argument("--max-wall-s", type=float, default=600.0, help="stop the healthy run after this wall time")
    parser.add_argument("--snapshot-s", type=float, default=4.0, help="seconds of vibration per snapshot (healthy run)")
    parser.add_argument("--snapshot-period-s", type=float, default=60.0, help="one snapshot every this many seconds")
    parser.add_argument("--faults", default=",".join(FAULT_CASES), help="comma-separated fault cases ('' for none)")
    parser.add_argument("--fault-machines", type=int, default=4, help="machines per fault case (each gets the fault)")
    parser.add_argument("--onset-s", type=float, default=450.0, help="fault onset (commissioning takes 400 s)")
    parser.add_argument("--fault-duration-s", type=float, default=900.0, help="onset to end of the fault")
    parser.add_argument("--after-end-s", type=float, default=2100.0, help="run on this long after the fault ends")
    parser.add_argument(
        "--fault-vibration",
        choices=("continuous", "snapshot"),
        default="continuous",
        help="vibration of the fault runs: every block, or the healthy run's snapshots",
    )
    parser.add_argument(
        "--models", type=Path, help="load the model directories from here instead of the config's (same names)"
    )
    parser.add_argument(
        "--ignore-defect",
        action="append",
        default=[],
        metavar="CLASS",
        help="with --replay: withhold defect verdicts of this class from the engine (e.g. normal)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="recompute the analysis of an earlier JSON result from its messages, rewrite it, print the tables",
    )
    parser.add_argument("--record", type=Path, help="also save the engine's inputs of each scenario here")
    parser.add_argument("--replay", type=Path, help="replay the inputs saved by --record under the config's rules")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="with --replay: change a rule, e.g. update_min_interval_s=600 or commissioning-baseline.clear_after=30",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "alert_quality.json")
    args = parser.parse_args(argv)
    if args.report is not None:
        stored = reanalyse(json.loads(args.report.read_text(encoding="utf-8")))
        args.report.write_text(json.dumps(stored, indent=1) + "\n", encoding="utf-8")
        print(markdown(stored))
        return 0
    if args.replay is not None:
        rules = rules_with(load_config(args.config).alerts.rulebook(), args.set)
        print(f"rules: {rules}\n")
        print(markdown(replay_directory(args.replay, rules, args.ignore_defect)))
        return 0
    unknown = [name for name in filter(None, args.faults.split(",")) if name not in FAULT_CASES]
    if unknown:
        parser.error(f"unknown fault case(s) {', '.join(unknown)}; known: {', '.join(FAULT_CASES)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    config = load_config(args.config)
    if args.models is not None:
        config = with_models_dir(config, args.models)
    duty = DutyCycle(args.snapshot_s, args.snapshot_period_s)
    fault_duty = DutyCycle(1.0, 1.0) if args.fault_vibration == "continuous" else duty
    shown_argv = list(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/alert_quality.py", *shown_argv]),
        "rules": {
            "default": config.alerts.default.model_dump(),
            "types": {k: asdict(v) for k, v in config.alerts.rulebook().by_type.items()},
        },
        "models": model_files(config),
        "vibration_healthy": {**asdict(duty), "continuous": duty.continuous},
        "vibration_faults": {**asdict(fault_duty), "continuous": fault_duty.continuous},
        "healthy": None,
        "faults": [],
    }
    if args.machines > 0 and args.hours > 0:
        healthy = healthy_scenario(config, args.machines, args.hours, duty, args.max_wall_s, args.record is not None)
        if args.record is not None:
            save_inputs(args.record, "healthy", healthy)
        healthy.pop("inputs", None)
        result["healthy"] = healthy
        print(f"healthy: {healthy['machine_hours']} machine-hours in {healthy['wall_s']} s", file=sys.stderr)
    for name in filter(None, args.faults.split(",")):
        outcome = fault_scenario(
            config,
            FAULT_CASES[name],
            args.fault_machines,
            args.onset_s,
            args.fault_duration_s,
            args.after_end_s,
            fault_duty,
            args.record is not None,
        )
        if args.record is not None:
            save_inputs(args.record, name, outcome)
        outcome.pop("inputs", None)
        result["faults"].append(outcome)
        print(f"{name}: {outcome['wall_s']} s wall", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
