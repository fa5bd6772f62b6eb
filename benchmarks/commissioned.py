"""Peak RSS of the agent with a large fleet *after* every machine's commissioning baseline is full.

The shipped config (``config/agent.yaml``, ``commissioning``) learns each machine's normal from its first
``commissioning_steps`` = 400 process readings (``agent/commissioning/baseline.py``: one step per reading of
a ``process*`` sensor with the ``channels`` temperature, current and pressure; ``commissioning_s`` null, so
the count decides, not the time). While a machine commissions it buffers one array per step; the step
that completes it fits the detector and drops the buffer. At the 1 Hz of the workload that is 400 s of data
per machine, so the 15 s scaling runs never get there.

``bench_commissioned``, on one fresh agent (the harness's config, every stage on):

1. **commissioning, faster than real time**: the fleet's process readings of simulated seconds
   ``[0, steps + EXTRA_READINGS)`` (1 reading/s per machine, device timestamps an hour in the past,
   contiguous and unique per machine, so they are valid and kept), published as fast as the agent takes
   them (chunks of ``CHUNK_S`` simulated seconds, at most one chunk waiting in the broker). Vibration is not
   published yet: the baselines need process readings only, and a vibration backlog would only measure the
   queues;
2. **proof** that every baseline is full, from the agent's own heartbeat counters: each machine counts at
   most ``steps`` readings under ``commissioning.steps{phase=commissioning}``, so a total of
   ``machines × steps`` there, with ``machines × EXTRA_READINGS`` under ``phase=monitoring`` and nothing under
   ``commissioning.skipped``, means that every machine has passed its commissioning; after the run the
   ``commissioning-baseline`` scores in InfluxDB are counted per machine as a second, per-machine proof;
3. **steady state at real time**: the whole fleet (``vibration_machines`` also publishing 10240 Hz vibration,
   from simulated second ``steps + EXTRA_READINGS`` on, so its timestamps are contiguous too) at ×1 for
   ``realtime_s`` seconds; then ``VmHWM`` (peak resident set over the agent's whole life, the
   commissioning burst included) and ``VmRSS``; then the agent is stopped and the readings and raw samples in
   InfluxDB are counted (zero loss).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import schema
from agent.config.loader import load_config
from agent.health.selfmetrics import series_field
from benchmarks.burst import influx_query
from benchmarks.harness import AgentProcess, Publisher
from benchmarks.workload import NS, Fleet

EXTRA_READINGS = 5  # readings per machine after the one that completes its baseline
CHUNK_S = 20.0  # simulated seconds per published chunk of the commissioning phase
COMMISSIONING_MODEL_ID = "commissioning-baseline"  # agent/commissioning/scorer.py MODEL_ID


def _total(counters: dict[str, float], name: str, label: str | None = None) -> float:
    """A heartbeat field: ``name`` summed over its labels, or its series with the one ``label`` (``k=v``)."""
    return float(counters.get(series_field(f"{name}{{{label}}}" if label else name), 0.0))


def commissioning_state(counters: dict[str, float]) -> dict[str, float]:
    return {
        "steps_commissioning": _total(counters, "commissioning.steps", "phase=commissioning"),
        "steps_monitoring": _total(counters, "commissioning.steps", "phase=monitoring"),
        "skipped": _total(counters, "commissioning.skipped"),
        "windows_dropped": _total(counters, "windows.dropped"),
    }


def bench_commissioned(
    services: tuple[str, int, str],
    workdir: Path,
    machines: int,
    vibration_machines: int,
    realtime_s: float,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    host, port, url = services
    agent = AgentProcess(workdir, host, port, url, f"commissioned-{machines}")
    config = load_config(agent.write_config()).commissioning
    if not config.enabled:
        raise RuntimeError("commissioning is disabled in config/agent.yaml: nothing to fill")
    steps = int(config.commissioning_steps)
    base_ns = (int(time.time()) - 3600) * NS  # the whole run stays in the past: valid device timestamps
    process = Fleet(machines, 0, base_ns=base_ns)
    full = Fleet(machines, vibration_machines, base_ns=base_ns)
    if config.commissioning_s is not None:  # learning by time: done at the first step that many seconds in
        steps = max(math.ceil(config.commissioning_s * process.process_hz) + 1, config.smoothing_steps + 1)
    commissioning_sim_s = (steps + EXTRA_READINGS) / process.process_hz
    log(
        f"commissioned: {machines} machines ({vibration_machines} with vibration), baseline = {steps} readings per "
        f"machine (commissioning_steps {config.commissioning_steps}, commissioning_s {config.commissioning_s}); "
        f"publishing {machines * (steps + EXTRA_READINGS):,} process readings faster than real time"
    )
    process.prepare()
    full.prepare()
    readings = 0
    blocks: dict[int, int] = {}
    agent.start()
    publisher = Publisher(host, port, agent.name)
    try:
        idle_kb = agent.memory_kb()
        t0 = time.perf_counter()
        sim = 0.0
        while sim < commissioning_sim_s:
            events = process.events(sim, min(sim + CHUNK_S, commissioning_sim_s))
            sim = min(sim + CHUNK_S, commissioning_sim_s)
            # At most one chunk waiting in the broker: the agent's pace, not the publisher's.
            if agent.wait_caught_up(publisher.published - len(events), timeout_s=300, spool_below=1 << 62) is None:
                raise RuntimeError(f"the agent stopped taking messages; log: {agent.log_tail()}")
            publisher.publish(events, speed=None)
            readings += len(events)
        caught = agent.wait_caught_up(publisher.published, timeout_s=300, spool_below=5000)
        commissioning_wall_s = time.perf_counter() - t0
        # The baselines are fed by the scoring thread, after ingest: wait for its counters to add up.
        expected_steps = readings
        deadline = time.monotonic() + 120
        state = commissioning_state(agent.wait_heartbeat(timeout_s=2))
        while time.monotonic() < deadline:
            if state["steps_commissioning"] + state["steps_monitoring"] + state["skipped"] >= expected_steps:
                break
            state = commissioning_state(agent.wait_heartbeat(timeout_s=2))
        after_commissioning_kb = agent.memory_kb()
        proof = (
            state["steps_commissioning"] == machines * steps
            and state["steps_monitoring"] == readings - machines * steps
            and state["skipped"] == 0
        )
        log(
            f"commissioned: {readings:,} readings in {commissioning_wall_s:.0f} s (caught up: {caught is not None}); "
            f"agent counters: {state['steps_commissioning']:,.0f} commissioning steps (expected {machines * steps:,}), "
            f"{state['steps_monitoring']:,.0f} monitoring steps (expected {readings - machines * steps:,}), "
            f"{state['skipped']:.0f} skipped: every baseline full = {proof}; "
            f"RSS {after_commissioning_kb.get('VmRSS', 0) / 1024:.0f} MB, "
            f"peak {after_commissioning_kb.get('VmHWM', 0) / 1024:.0f} MB"
        )
        # Steady state: the whole fleet at real time, vibration included.
        events = full.events(commissioning_sim_s, commissioning_sim_s + realtime_s)
        for e in events:
            if e.block is not None:
                blocks[e.block[0]] = blocks.get(e.block[0], 0) + 1
            else:
                readings += 1
        elapsed = publisher.publish(events, speed=1.0)
        kept_up = agent.wait_caught_up(publisher.published, timeout_s=max(1.5, 0.2 * realtime_s)) is not None
        drained = agent.wait_caught_up(publisher.published, timeout_s=120, spool_below=100) is not None
        end_kb = agent.memory_kb()
        counters = dict(agent.counters)
    finally:
        publisher.close()
        code = agent.stop()
    stored = agent.stored()
    expected_samples = full.stored_samples_expected(blocks, agent.every_n)
    series = influx_query(
        url,
        agent.database,
        f'SELECT count("{schema.SCORE_FIELD}") FROM "{schema.SCORE}" '
        f'WHERE "{schema.TAG_MODEL_ID}" = \'{COMMISSIONING_MODEL_ID}\' GROUP BY "machine"',
        timeout_s=120,
    )
    scored_machines = sum(1 for s in series if any(int(v[1] or 0) > 0 for v in s.get("values", [])))
    final_state = commissioning_state(counters)
    result = {
        "machines": machines,
        "vibration_machines": vibration_machines,
        "commissioning_steps": steps,
        "commissioning_config": {
            "commissioning_steps": config.commissioning_steps,
            "commissioning_s": config.commissioning_s,
            "sensors": list(config.sensors),
            "channels": list(config.channels),
        },
        "commissioning_readings_per_machine": steps + EXTRA_READINGS,
        "commissioning_wall_s": commissioning_wall_s,
        "commissioning_msgs_per_s": machines * (steps + EXTRA_READINGS) / commissioning_wall_s,
        "state_after_commissioning": state,
        "state_at_end": final_state,
        "all_baselines_full": proof,
        "machines_with_baseline_scores": scored_machines,
        "realtime_s": realtime_s,
        "realtime_msgs_per_s": len(events) / elapsed,
        "realtime_kept_up": kept_up,
        "drained": drained,
        "rss_idle_mb": idle_kb.get("VmRSS", 0) / 1024,
        "rss_after_commissioning_mb": after_commissioning_kb.get("VmRSS", 0) / 1024,
        "peak_rss_after_commissioning_mb": after_commissioning_kb.get("VmHWM", 0) / 1024,
        "rss_end_mb": end_kb.get("VmRSS", 0) / 1024,
        "peak_rss_mb": end_kb.get("VmHWM", 0) / 1024,
        "readings_published": readings,
        "readings_stored": stored["readings"],
        "samples_stored": stored["samples"],
        "samples_expected": expected_samples,
        "zero_loss": stored["readings"] == readings and stored["samples"] == expected_samples,
        "exit_code": code,
    }
    log(
        f"commissioned: real time x1 for {realtime_s:g} s ({result['realtime_msgs_per_s']:.0f} msg/s, kept up "
        f"{kept_up}); peak RSS {result['peak_rss_mb']:.0f} MB (RSS now {result['rss_end_mb']:.0f} MB); machines "
        f"with commissioning-baseline scores in InfluxDB: {scored_machines}/{machines}; zero loss {result['zero_loss']}"
    )
    return result
