"""How close the agent runs to the limits of its machine: ``python benchmarks/run.py [--quick] [--out DIR]``.

Starts its own Mosquitto and InfluxDB 1.x (``pdm_tools.dev.services``), then measures, in one run:

1. limits: the receive rate of a bare paho subscriber (QoS 1, does nothing) for the benchmark's
   messages; the rate at which InfluxDB accepts the agent's points from a bare ``InfluxV1Sink``
   (batches of 5000) and through the agent's spool + ``SpoolWriter``; ONNX Runtime latency of the
   shipped models, FP32 vs INT8, at batch 1 and at a realistic batch;
2. end-to-end throughput: the agent (subprocess, every stage on) under a publisher whose rate rises
   step by step until the agent falls behind; the highest sustained rate with zero loss (every reading
   counted in InfluxDB), the lag, CPU and peak RSS of the agent;
3. alert latency with the shipped alert rules and ``raw_vibration`` mode, at the ramp's vibration load at half
   its highest sustained speed: bearing-fault episodes placed so that each can raise an event under the
   rule (``benchmarks/alert_accounting.py``), every episode accounted for (raised, or why not), latency
   percentiles refused below 100 alerts;
4. burst: a QoS 1 burst of 50,000 small process readings published while the agent runs, time until all
   are in InfluxDB, against a bare batcher (paho + line protocol + ``/write`` in batches) on the same burst
   (``benchmarks/burst.py``);
5. scaling: cost and memory vs number of machines and vs vibration sampling rate;
6. commissioned: peak RSS of 1,000 machines (10 % with vibration) once every commissioning baseline is full,
   proven from the agent's counters (``benchmarks/commissioned.py``).

The report ends with the targets table (``benchmarks/targets.py``): each target, the value measured in this
run, and whether it holds (or why it was not measured).

``--only alerts`` (or ``--skip``) runs a subset of the phases: limits, throughput, burst, alerts, scaling,
commissioned.

Writes ``bench.json`` and ``bench.md`` into ``--out`` (default ``benchmarks/results``); see
``docs/benchmarks.md`` for what each number means. Ratios are measured side by side in the same run;
absolute numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from agent.config.loader import load_config  # noqa: E402
from agent.health.selfmetrics import series_field  # noqa: E402
from agent.records import Reading, SampleBlock  # noqa: E402
from agent.spool.codec import Entry, encode_block, encode_readings  # noqa: E402
from agent.storage.influx_v1 import InfluxV1Sink  # noqa: E402
from agent.storage.points import RawVibrationPolicy, block_lines, reading_lines  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.alert_accounting import (  # noqa: E402
    MIN_SAMPLES,
    RAISED,
    REASON_TEXT,
    REASONS,
    AlertMessage,
    account,
    design_schedule,
    format_latency,
    latency_summary,
    longest_cool_run,
)
from benchmarks.burst import bench_burst  # noqa: E402
from benchmarks.commissioned import bench_commissioned  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    PERF_TO_EPOCH_NS,
    SERVICE_PIDS,
    AgentProcess,
    BareSubscriber,
    Publisher,
    cpu_snapshot,
    cpu_usage,
)
from benchmarks.targets import markdown_rows, target_rows  # noqa: E402
from benchmarks.workload import Event, Fleet  # noqa: E402
from pdm_tools.dev import services as devservices  # noqa: E402

NS = 1_000_000_000

# Broker: defaults (max_inflight_messages 20) except an unbounded per-client queue, so that an agent
# falling behind shows up as lag, not as messages the broker dropped.
BROKER_CONF = "max_queued_messages 0\n"

FULL: dict[str, Any] = {
    "fleet": (100, 10),  # machines, of which with vibration (10240 Hz, blocks of 2048 samples)
    "step_s": 8.0,
    "speeds": [1, 2, 4, 8, 16, 32, 64, 128],
    "refine": 3,  # bisection steps after the first speed the agent does not sustain
    # storage.raw_vibration.mode of the ramp: the shipped config's (held blocks, raw data around alerts)
    "ramp_raw_vibration": "around_alerts",
    "bare_messages_s": 60.0,  # simulated seconds of the fleet for the bare subscriber
    # Simulated seconds of the fleet queued at the broker while the subscriber is away, for the bare subscriber
    # and for the ramp's agent (stopped and started again): both work off the same backlog (45,000 messages).
    "backlog_s": 300.0,
    "bare_points": 600_000,
    "onnx_runs": 400,
    # Bare writer vs the agent's writer, interleaved, best of each: two attempts of the same code differed by
    # up to 18 % on this machine (bench-2026-12-03-run5), as much as the target's margin.
    "influx_attempts": 4,
    # Alert latency (see ALERT_* below): the raw_vibration modes to run, the first is the headline; the
    # fleet (machines, of which with vibration: the ramp's mix of 10 %); fault episodes per vibration
    # machine (capped by the flapping rule); healthy blocks before the first fault; the spread of the
    # machines' first episodes and the healthy-gap margin, in wall seconds; the speed (None: from the ramp).
    "alert_modes": ["around_alerts"],
    "alert_fleet": (480, 48),
    "alert_episodes": 3,
    "alert_warmup_blocks": 10,
    "alert_stagger_s": 10.0,
    "alert_margin_s": 15.0,
    "alert_tail_blocks": None,  # None: long enough for the last events to clear
    "alert_speed": None,
    "scale_machines": [10, 100, 1000],
    "scale_machines_vib": [10, 100, 1000],
    "scale_rates": [10240, 20480, 40960],
    "scale_s": 15.0,
    "idle_s": 2.0,
    # Burst (benchmarks/burst.py): QoS 1 process readings over these machines, agent vs bare batcher, best of N.
    "burst_messages": 50_000,
    "burst_machines": 100,
    "burst_attempts": 2,
    # 1,000 machines (10 % with vibration) past their commissioning baselines, then real time for this long.
    "commissioned_fleet": (1000, 100),
    "commissioned_realtime_s": 15.0,
}
QUICK: dict[str, Any] = {
    "fleet": (40, 4),
    "step_s": 2.5,
    "speeds": [2, 16],
    "refine": 0,
    "ramp_raw_vibration": "every_n",  # the smoke run checks the stored raw samples exactly
    "bare_messages_s": 10.0,
    "backlog_s": 150.0,
    "bare_points": 60_000,
    "onnx_runs": 50,
    "influx_attempts": 1,
    # One episode per machine (a second would wait out cooldown_s, a minute) on 120 vibration machines, so
    # that even the smoke run has >= 100 alerts; every_n, as around_alerts would store 20 blocks per alert.
    "alert_modes": ["every_n"],
    "alert_fleet": (120, 120),
    "alert_episodes": 1,
    "alert_warmup_blocks": 3,
    "alert_stagger_s": 3.0,
    "alert_margin_s": 5.0,
    "alert_tail_blocks": 2,
    "alert_speed": 0.25,
    "scale_machines": [10, 100],
    "scale_machines_vib": [],
    "scale_rates": [],
    "scale_s": 2.0,
    "idle_s": 1.0,
    "burst_messages": 5_000,
    "burst_machines": 100,
    "burst_attempts": 1,
    "commissioned_fleet": (20, 2),
    "commissioned_realtime_s": 3.0,
}
PHASES = ("limits", "throughput", "burst", "alerts", "scaling", "commissioned")
VIB_FRACTION = 0.1  # scaling runs: share of machines that also publish vibration
MIN_DRAIN_S = 1.0  # a backlog drain timed over less than this (two heartbeats apart) is not reported
ALERT_TYPE = "vibration-anomaly"  # the alert type (model id) whose events the alert run follows
ALERT_FAULTY_BLOCKS = 4  # faulty blocks per episode (at least what raise_n / min_duration_s need)
REFERENCE_RAMP_SPEED = 4.0  # highest sustained ramp speed of docs/benchmarks.md, when the ramp is not run


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_mb": mem_kb // 1024,
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


# -- limits ------------------------------------------------------------------------------------------------


def bench_bare_receive(host: str, port: int, fleet: Fleet, sim_s: float) -> dict[str, Any]:
    """A bare QoS 1 subscriber receiving the fleet's messages published as fast as possible."""
    events = fleet.events(0.0, sim_s)
    sub = BareSubscriber(host, port)
    pub = Publisher(host, port, "bare")
    try:
        t0 = time.perf_counter()
        pub_s = pub.publish(events, speed=None)
        ok = sub.wait_for(len(events), timeout_s=120)
        recv_s = max(sub.last - t0, 1e-9)
    finally:
        pub.close()
        sub.close()
    n = len(events)
    return {
        "messages": n,
        "received": sub.count,
        "complete": ok,
        "publish_msgs_per_s": n / pub_s,
        "receive_msgs_per_s": sub.count / recv_s,
        "receive_readings_per_s": sub.count / recv_s * fleet.readings_per_s / fleet.messages_per_s,
        "receive_samples_per_s": sub.count / recv_s * fleet.samples_per_s / fleet.messages_per_s,
    }


def bench_bare_backlog(host: str, port: int, fleet: Fleet, sim_s: float) -> dict[str, float]:
    """A bare QoS 1 subscriber working off a backlog the broker queued while it was away (no publisher running)."""
    events = fleet.events(0.0, sim_s)
    sub = BareSubscriber(host, port, persistent=True)
    sub.client.disconnect()
    sub.client.loop_stop()
    pub = Publisher(host, port, "backlog")
    try:
        pub.publish(events, speed=None)
    finally:
        pub.close()
    time.sleep(0.5)
    t0 = time.perf_counter()
    sub.count = 0
    sub.client.reconnect()
    sub.client.loop_start()
    ok = sub.wait_for(len(events), timeout_s=120)
    elapsed = max(sub.last - t0, 1e-9)
    sub.close()
    return {"messages": len(events), "received": sub.count, "complete": ok, "receive_msgs_per_s": sub.count / elapsed}


def fleet_points(fleet: Fleet, points: int) -> tuple[list[Entry], list[str]]:
    """What the agent spools for the fleet's messages (one entry per message's readings and per block, raw
    samples of every 10th block) and the same points as line protocol, for the bare writer."""
    from agent.decode.base import DecodeLimits
    from agent.decode.json_v1 import decode
    from agent.decode.topic import TopicTemplate

    template = TopicTemplate("factory/{site}/{line}/{machine}/{sensor}")
    limits = DecodeLimits(max_payload_bytes=1 << 20, max_future_s=86_400)
    policy = RawVibrationPolicy("every_n", 10)
    entries: list[Entry] = []
    lines: list[str] = []
    sim = 0.0
    while len(lines) < points:
        for event in fleet.events(sim, sim + 10.0):
            items = decode(template.match(event.topic), event.payload, time.time_ns(), limits)
            readings = [item for item in items if isinstance(item, Reading)]
            if readings:
                entries.append(encode_readings(readings))
                lines.extend(line for r in readings for line in reading_lines(r))
            for item in items:
                if isinstance(item, SampleBlock) and policy.decide(item) == "store":
                    entries.append(encode_block(item, store_raw=True))
                    lines.extend(block_lines(item))
        sim += 10.0
    return entries, lines


class _InfluxSinkFactory:
    """Builds the writer's sink in the writer process (picklable)."""

    def __init__(self, url: str, db: str) -> None:
        self.url, self.db = url, db

    def __call__(self) -> InfluxV1Sink:
        return InfluxV1Sink(self.url, self.db, None, None, None, timeout_s=120)


def bench_influx(
    url: str, data: tuple[list[Entry], list[str]], workdir: Path, attempts: int, batch: int = 5000
) -> dict[str, Any]:
    """Points/s into InfluxDB: a bare sink writing ready-made lines (batches of ``batch``) vs the agent's
    spool + writer making those lines from the spooled entries, in its own process (as shipped) and as
    threads of the caller."""
    from agent.metrics import Metrics
    from agent.spool.sqlite import Spool
    from agent.storage.process import WriterProcess, WriterSettings

    entries, lines = data

    def bare(db: str) -> float:
        sink = InfluxV1Sink(url, db, None, None, None, timeout_s=120)
        sink.create_database()
        t0 = time.perf_counter()
        for i in range(0, len(lines), batch):
            sink.write(lines[i : i + batch])
        elapsed = time.perf_counter() - t0
        sink.close()
        return len(lines) / elapsed

    def spooled(db: str, tag: str, process: bool) -> tuple[float, float]:
        InfluxV1Sink(url, db, None, None, None).create_database()
        spool = Spool(workdir / f"writer-{tag}.db", max_bytes=1 << 40, max_points=1 << 40)
        t0 = time.perf_counter()
        for i in range(0, len(entries), 100):  # as the ingest worker does: many small appends
            spool.append(entries[i : i + 100])
        append_s = time.perf_counter() - t0
        settings = WriterSettings(batch_size=batch, flush_interval_s=1.0)
        metrics = Metrics()
        factory = _InfluxSinkFactory(url, db)
        writer: Any = (
            WriterProcess(spool, "local", factory, settings, metrics)
            if process
            else settings.writer(spool.cursor("local"), factory(), metrics)
        )
        writer.start()  # the process starts before the clock: its start-up is not the writer's rate
        t0 = time.perf_counter()
        if not writer.flush(600):
            raise RuntimeError("the writer did not drain its spool")
        elapsed = time.perf_counter() - t0
        writer.stop()
        written = metrics.get("storage.points_written")
        if written != len(lines):
            raise RuntimeError(f"the writer wrote {written:.0f} points, not the {len(lines)} spooled")
        spool.close()
        return len(lines) / elapsed, len(lines) / append_s

    pid = os.getpid()
    bare_rates, process_rates, thread_rates, append_rates = [], [], [], []
    for attempt in range(attempts):  # interleaved, so all see the same background load
        bare_rates.append(bare(f"bench_bare_{pid}_{attempt}"))
        w, a = spooled(f"bench_writer_{pid}_{attempt}", f"p{attempt}", process=True)
        process_rates.append(w)
        append_rates.append(a)
        w, _ = spooled(f"bench_writer_t_{pid}_{attempt}", f"t{attempt}", process=False)
        thread_rates.append(w)
    return {
        "points": len(lines),
        "entries": len(entries),
        "bare_points_per_s": max(bare_rates),
        "spool_writer_points_per_s": max(process_rates),
        "spool_writer_thread_points_per_s": max(thread_rates),
        "spool_append_points_per_s": max(append_rates),
        "bare_runs": bare_rates,
        "spool_writer_runs": process_rates,
        "spool_writer_thread_runs": thread_rates,
    }


def bench_onnx(runs: int) -> dict[str, Any]:
    """Median latency of one ``session.run`` per model, FP32 vs INT8, batch 1 and batch 32 (1 thread)."""
    import onnxruntime as ort

    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for manifest_path in sorted((REPO / "models").glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        # Feature vectors (batch, width) and images (batch, 1, S, S) alike: the shape after the batch axis.
        item_shape = tuple(int(d) for d in manifest["inputs"][0]["shape"][1:])
        name = manifest["inputs"][0]["name"]
        sessions = {}
        for precision in ("fp32", "int8"):
            path = manifest_path.parent / f"model.{precision}.onnx"
            if not path.exists():
                continue
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[precision] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        result: dict[str, Any] = {"shipped_file": manifest.get("file")}
        for batch in (1, 32):
            x = rng.standard_normal((batch, *item_shape)).astype(np.float32)
            times: dict[str, list[float]] = {p: [] for p in sessions}
            for s in sessions.values():
                for _ in range(20):
                    s.run(None, {name: x})
            for _ in range(runs):  # interleaved
                for p, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, {name: x})
                    times[p].append(time.perf_counter() - t0)
            for p, ts in times.items():
                result[f"{p}_batch{batch}_us"] = statistics.median(ts) * 1e6
            if "int8" in times:
                result[f"int8_over_fp32_batch{batch}"] = (
                    result[f"int8_batch{batch}_us"] / result[f"fp32_batch{batch}_us"]
                )
        out[manifest_path.parent.name] = result
    return out


# -- the agent under load ----------------------------------------------------------------------------------


class Run:
    """One agent subprocess fed by one publisher; keeps the totals needed for the loss check."""

    def __init__(
        self,
        services: tuple[str, int, str],
        workdir: Path,
        name: str,
        fleet: Fleet,
        raw: str = "every_n",
        session_expiry_s: int = 0,
    ) -> None:
        host, port, url = services
        self.fleet = fleet
        self.agent = AgentProcess(workdir, host, port, url, name, raw_vibration=raw, session_expiry_s=session_expiry_s)
        self.publisher: Publisher | None = None
        self.host, self.port = host, port
        self.name = name
        self.sim_t = 0.0
        self.blocks: dict[int, int] = {}
        self.readings = 0
        self.taken_before = 0  # messages taken by the agent's earlier processes (before backlog_drain's restart)

    def __enter__(self) -> Run:
        self.fleet.prepare()
        self.agent.start()
        self.publisher = Publisher(self.host, self.port, self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.agent.stop()

    def due(self) -> int:
        """Messages the running agent process must have taken (its counters start at 0)."""
        assert self.publisher is not None
        return self.publisher.published - self.taken_before

    def _next_events(self, sim_s: float) -> list[Event]:
        """The fleet's next ``sim_s`` simulated seconds, counted for the loss check."""
        events = self.fleet.events(self.sim_t, self.sim_t + sim_s)
        self.sim_t += sim_s
        for e in events:
            if e.block is not None:
                self.blocks[e.block[0]] = self.blocks.get(e.block[0], 0) + 1
            else:
                self.readings += 1
        return events

    def backlog_drain(self, sim_s: float, timeout_s: float = 300.0) -> dict[str, Any]:
        """Stop the agent (keeping its MQTT session), publish ``sim_s`` of the fleet as fast as possible (the
        broker queues it for the session), start the agent again: the rate at which it works off that backlog,
        between its first heartbeat that counts a message and the first that counts them all. The same
        situation as ``bench_bare_backlog``'s subscriber, which comes back to the same number of messages."""
        assert self.publisher is not None
        if not self.agent.session_expiry_s:
            raise ValueError("a backlog drain needs an agent with a session expiry (its session must outlive it)")
        if self.agent.wait_caught_up(self.due(), timeout_s=timeout_s, spool_below=1 << 30) is None:
            # What it had not taken would come back to the restarted process and count as the backlog's.
            return {"messages": 0, "msgs_per_s": None, "not_measured": "the agent had not caught up with the ramp"}
        events = self._next_events(sim_s)
        self.agent.stop(keep_session=True)
        self.taken_before = self.publisher.published
        self.publisher.publish(events, speed=None)  # returns once the broker acknowledged (queued) every one
        restarted, restarted_clock = time.perf_counter(), time.time()
        self.agent.start()
        n = len(events)
        done = self.agent.wait_caught_up(n, timeout_s=timeout_s, spool_below=1 << 30)  # the new process counts from 0
        beats = [(t, m) for t, m in self.agent.history if t >= restarted_clock]
        first = next(((t, m) for t, m in beats if m > 0), None)
        last = next(((t, m) for t, m in beats if m >= n), None)
        rate = None
        why = None
        if done is None or first is None or last is None:
            why = f"the agent did not work off the {n:,} messages within {timeout_s:.0f} s"
        elif last[0] - first[0] < MIN_DRAIN_S:
            why = f"drained between two heartbeats {last[0] - first[0]:.2f} s apart: too short to time"
        else:
            rate = (last[1] - first[1]) / (last[0] - first[0])
        return {
            "messages": n,
            "msgs_per_s": rate,
            "not_measured": why,
            "timed_msgs": (last[1] - first[1]) if rate else None,
            "timed_s": (last[0] - first[0]) if rate else None,
            "start_to_done_s": (time.perf_counter() - restarted) if done is not None else None,
        }

    def step(self, speed: float, wall_s: float, sent_at: dict | None = None, drain_s: float = 0.0) -> dict[str, Any]:
        """Publish ``wall_s`` seconds of the fleet at ``speed`` x real time and see whether the agent keeps up."""
        assert self.publisher is not None
        events = self._next_events(wall_s * speed)
        before = dict(self.agent.counters)
        cpu0, t0 = self.agent.cpu_s(), time.perf_counter()
        snap0 = cpu_snapshot(self.agent.process.pid)  # type: ignore[union-attr]
        elapsed = self.publisher.publish(events, speed, sent_at)
        usage = cpu_usage(snap0, cpu_snapshot(self.agent.process.pid))  # type: ignore[union-attr]
        pub_end = time.perf_counter()
        cpu_pub = self.agent.cpu_s()
        lag_at_end = self.due() - self.agent.counter("ingest.messages")
        allowed = max(1.5, 0.2 * wall_s)
        self.agent.wait_heartbeat(timeout_s=2)
        n1, h1 = self.agent.counter("ingest.messages"), self.agent.counters_time_s
        backlog = self.due() - n1
        caught_up = self.agent.wait_caught_up(self.due(), timeout_s=allowed)
        t1, cpu1 = time.perf_counter(), self.agent.cpu_s()
        after = dict(self.agent.counters)
        drain_rate = None
        if caught_up is None and drain_s > 0:
            # Fell behind: the rate at which it works off its backlog with the publisher idle.
            self.agent.wait_caught_up(self.due(), timeout_s=drain_s, spool_below=1 << 30)
            n2, h2 = self.agent.counter("ingest.messages"), self.agent.counters_time_s
            if backlog > 200 and h2 > h1:
                drain_rate = (n2 - n1) / (h2 - h1)

        def delta(key: str) -> float:
            return float(after.get(series_field(key), 0.0)) - float(before.get(series_field(key), 0.0))

        n = len(events)
        target = n / wall_s
        achieved = n / elapsed
        windows_dropped = delta("windows.dropped")
        result = {
            "speed": speed,
            "messages": n,
            "target_msgs_per_s": target,
            "published_msgs_per_s": achieved,
            "readings_per_s": achieved * self.fleet.readings_per_s / self.fleet.messages_per_s,
            "samples_per_s": achieved * self.fleet.samples_per_s / self.fleet.messages_per_s,
            "backlog_at_end_msgs": lag_at_end,
            "backlog_after_publish_msgs": backlog,
            "drain_msgs_per_s": drain_rate,
            "catch_up_s": caught_up,
            "agent_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "agent_cpu_pct_while_publishing": 100 * (cpu_pub - cpu0) / (pub_end - t0),
            "cpu_while_publishing": usage,
            "agent_cpu_us_per_msg": 1e6 * (cpu1 - cpu0) / n if caught_up is not None else None,
            "points_written": delta("storage.points_written"),
            "spool_depth_after": self.agent.counter("spool.depth"),
            "windows_scored": delta("windows.scored"),
            "windows_dropped": windows_dropped,
            "alerts_published": delta("alerts.published"),
            "rss_mb": self.agent.memory_kb().get("VmRSS", 0) / 1024,
            "peak_rss_mb": self.agent.memory_kb().get("VmHWM", 0) / 1024,
        }
        result["sustained"] = bool(caught_up is not None and achieved >= 0.95 * target and windows_dropped == 0)
        result["publisher_bound"] = achieved < 0.95 * target
        return result

    def finish(self) -> dict[str, Any]:
        """Drain, stop the agent (it flushes its spool), and count what reached InfluxDB."""
        assert self.publisher is not None
        # The heartbeat adds a point to the spool every beat, so "empty" is rarely seen: wait for "almost
        # empty"; on SIGTERM the agent writes the rest before it exits.
        drained = self.agent.wait_caught_up(self.due(), timeout_s=180, spool_below=100)
        # A raw-data release is a spool row of no points (its blocks' points count when written), so "drained"
        # can come before the writer wrote the last releases: wait until the released count stops changing.
        counters = dict(self.agent.counters)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.agent.wait_heartbeat(timeout_s=2)
            later = self.agent.wait_heartbeat(timeout_s=2)
            if later.get(series_field("storage.raw_released")) == counters.get(series_field("storage.raw_released")):
                break
            counters = later
        memory = self.agent.memory_kb()
        code = self.agent.stop()
        stored = self.agent.stored()
        expected_samples = self.fleet.stored_samples_expected(self.blocks, self.agent.every_n)
        released = counters.get(series_field("storage.raw_released"), 0.0)
        missing = counters.get(series_field("storage.raw_missing"), 0.0)
        after_alerts = 0
        if self.agent.raw_vibration == "every_n":
            raw_complete = stored["samples"] == expected_samples
        else:
            # around_alerts: what is stored depends on the alerts. None released went missing; what is stored
            # is the held blocks the alerts released (counted by the agent when written; a release empties the
            # ring, so no block is released twice) plus up to keep_blocks blocks after each vibration alert
            # (stored as they arrive; fewer when the run ended first): nothing stored without an alert.
            raised = [a for a in self.agent.alerts if a.body.get("state") == "new"]
            after_alerts = (
                sum(1 for a in raised if a.body.get("sensor") == "vibration")
                * int(self.agent.config["storage"]["raw_vibration"]["keep_blocks"])
                * self.fleet.block_samples
            )
            raw_complete = missing == 0 and stored["samples"] <= released + after_alerts
        return {
            "drained": drained is not None,
            "exit_code": code,
            "messages_published": self.publisher.published,
            "readings_published": self.readings,
            "readings_stored": stored["readings"],
            "samples_stored": stored["samples"],
            "samples_expected": expected_samples,
            "raw_vibration": self.agent.raw_vibration,
            "raw_released": released,
            "raw_missing": missing,
            **({"raw_after_alerts_max": after_alerts} if self.agent.raw_vibration != "every_n" else {}),
            "zero_loss": stored["readings"] == self.readings and raw_complete,
            "peak_rss_mb": memory.get("VmHWM", 0) / 1024,
            "decode_errors": counters.get(series_field("decode.errors"), 0.0),
            "spool_dropped": counters.get(series_field("spool.dropped"), 0.0),
            "windows_dropped": counters.get(series_field("windows.dropped"), 0.0),
        }


def bench_throughput(services: tuple[str, int, str], workdir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    machines, vib = cfg["fleet"]
    fleet = Fleet(machines, vib)
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    # A session that outlives the agent's process: the backlog drain after the ramp restarts it.
    with Run(services, workdir, "ramp", fleet, raw=cfg["ramp_raw_vibration"], session_expiry_s=600) as run:
        speeds = list(cfg["speeds"])
        refine = int(cfg["refine"])
        failed: float | None = None  # the lowest speed the agent did not sustain
        while speeds:
            speed = speeds.pop(0)
            step = run.step(speed, cfg["step_s"], drain_s=90.0)
            steps.append(step)
            log(
                f"ramp x{speed:g}: {step['published_msgs_per_s']:.0f} msg/s published, backlog "
                f"{step['backlog_at_end_msgs']:.0f}, catch-up {step['catch_up_s']}, agent CPU "
                f"{step['agent_cpu_pct']:.0f} %, sustained={step['sustained']}"
            )
            if step["sustained"]:
                best = step
            else:
                failed = speed if failed is None else min(failed, speed)
                # Fell behind (step() let it drain): it must have worked off its backlog before the next step.
                if run.agent.wait_caught_up(run.due(), timeout_s=30) is None:
                    log("ramp: the agent did not drain its backlog within 90 s; stopping the ramp")
                    break
            if failed is None:
                continue
            # Bisect (geometrically) between the highest sustained speed and the lowest failed one, ``refine``
            # times at most, while they are more than 15 % apart: doubling alone leaves the result up to 2x low.
            if refine and best is not None and failed / best["speed"] > 1.15:
                refine -= 1
                speeds = [round(math.sqrt(failed * best["speed"]), 1)]
                continue
            break
        drain = run.backlog_drain(cfg["backlog_s"])
        log(
            f"backlog drain: {drain['messages']:,} messages queued while the agent was away, worked off at "
            f"{_f(drain['msgs_per_s'])} msg/s" + (f" ({drain['not_measured']})" if drain["not_measured"] else "")
        )
        final = run.finish()
    log(
        f"ramp: stored {final['readings_stored']}/{final['readings_published']} readings, "
        f"zero loss {final['zero_loss']}"
    )
    return {
        "fleet": fleet.describe(),
        "step_s": cfg["step_s"],
        "steps": steps,
        "max_sustained": best,
        "backlog_drain": drain,
        "final": final,
    }


def _raw_stored(fin: dict[str, Any]) -> str:
    """What the ramp's raw vibration check compared, by the ramp's ``raw_vibration`` mode."""
    if fin.get("raw_vibration", "every_n") == "every_n":
        return f"{fin['samples_stored']:,} of {fin['samples_expected']:,} raw vibration samples (every 10th block)"
    return (
        f"{fin['samples_stored']:,} raw vibration samples ({fin['raw_vibration']}: "
        f"{fin.get('raw_released', 0):,.0f} held before alerts and released, at most "
        f"{fin.get('raw_after_alerts_max', 0):,.0f} stored after them, {fin.get('raw_missing', 0):,.0f} missing)"
    )


def alert_speed(cfg: dict[str, Any], ramp_speed: float) -> float:
    """The alert run's speed: the vibration blocks per wall second of the ramp fleet at half its highest
    sustained speed (``ramp_speed``), spread over the alert fleet's vibration machines."""
    if cfg.get("alert_speed"):
        return float(cfg["alert_speed"])
    return ramp_speed / 2 * cfg["fleet"][1] / cfg["alert_fleet"][1]


def screen_healthy_vibration(agent: AgentProcess, fleet: Fleet, exit_ratio: float) -> dict[int, dict[str, float]]:
    """How the agent's models score the fleet's *healthy* vibration, per vibration machine of one cycle of pools.

    The fleet loops over a few precomputed healthy signals (``benchmarks/workload.py``); a signal whose
    windows do not give ``clear_after`` cool windows in a row never lets an event clear. Scored in this process
    by the agent's own scoring path (``benchmarks/alert_quality.build_pipeline``) on the config ``agent`` runs
    with, from the exact payloads the publisher sends (two loops, so the window across the loop seam counts).
    Returns, per machine index (= pool), the longest cyclic run of cool windows and the largest ratio.
    """
    from agent.decode.base import DecodeLimits
    from agent.decode.json_v1 import decode
    from agent.decode.topic import TopicTemplate
    from benchmarks.alert_quality import build_pipeline
    from benchmarks.workload import POOL_BLOCKS, VIBRATION_POOLS

    pools = min(VIBRATION_POOLS, fleet.vibration_machines)
    probe = Fleet(pools, pools, rate_hz=fleet.rate_hz, block_samples=fleet.block_samples, base_ns=fleet.base_ns)
    pipeline = build_pipeline(load_config(agent.write_config()), record=True)
    template = TopicTemplate("factory/{site}/{line}/{machine}/{sensor}")
    limits = DecodeLimits(max_payload_bytes=1 << 22, max_future_s=10**9)
    for event in probe.events(0.0, (2 * POOL_BLOCKS + 1) * probe.block_period_s):
        if event.block is None:
            continue
        items = list(decode(template.match(event.topic), event.payload, time.time_ns(), limits))
        pipeline.score(pipeline.feed(items), fleet.base_ns + round((event.t_s + probe.block_period_s) * NS))
    ratios: dict[int, list[tuple[int, float]]] = {}
    for entry in pipeline.engine.inputs or []:
        if entry[0] != "observe" or entry[2]["model_id"] != ALERT_TYPE:
            continue
        fields = entry[2]
        ratios.setdefault(int(fields["source"].machine[1:]), []).append(
            (fields["start_ns"], fields["score"] / fields["threshold"])
        )
    out = {}
    for j, scored in sorted(ratios.items()):
        # One loop of the pool, from the window across the seam (blocks POOL_BLOCKS - 1 and POOL_BLOCKS) on.
        seq = [r for _, r in sorted(scored)][POOL_BLOCKS - 1 : 2 * POOL_BLOCKS - 1]
        out[j] = {
            "windows": len(seq),
            "longest_cool_run": longest_cool_run(seq, exit_ratio),
            "max_ratio": max(seq),
            "median_ratio": statistics.median(seq),
        }
    return out


def bench_alerts(
    services: tuple[str, int, str], workdir: Path, cfg: dict[str, Any], speed: float, raw: str = "around_alerts"
) -> dict[str, Any]:
    """Alert latency with the shipped alert rules: fault episodes placed so that each can raise, all accounted for.

    The schedule comes from the alert rule of the config the agent runs with (``design_schedule``); every
    episode ends up raised or with the reason it was not (``account``); latency percentiles are refused
    below ``MIN_SAMPLES`` alerts.
    """
    machines, vib = cfg["alert_fleet"]
    fleet = Fleet(machines, vib)
    run = Run(services, workdir, f"alerts-{raw.replace('_', '-')}", fleet)
    run.agent.raw_vibration = raw  # before start(): it goes into the agent's config file
    rule = run.agent.alert_rule(ALERT_TYPE)
    spec = run.agent.feature_spec(ALERT_TYPE)
    window_blocks = math.ceil(spec["window_samples"] / fleet.block_samples)
    hop_blocks = spec["hop_samples"] / fleet.block_samples
    single: list[int] = []
    screening: dict[int, dict[str, float]] = {}
    if cfg["alert_episodes"] > 1:
        # A machine whose healthy signal cannot clear an event gets one episode: a second could not raise.
        screening = screen_healthy_vibration(run.agent, fleet, rule.exit)
        pools = len(screening)
        single = [j for j in range(vib) if screening[j % pools]["longest_cool_run"] < rule.clear_after]
        for p, s in screening.items():
            log(
                f"alerts: healthy vibration of pool {p}: longest run of cool windows {s['longest_cool_run']}, "
                f"median ratio {s['median_ratio']:.2f}, max {s['max_ratio']:.2f} (clear_after {rule.clear_after})"
            )
    schedule, design = design_schedule(
        rule,
        speed=speed,
        block_period_s=fleet.block_period_s,
        window_blocks=window_blocks,
        hop_blocks=hop_blocks,
        machines=vib,
        episodes=cfg["alert_episodes"],
        warmup_blocks=cfg["alert_warmup_blocks"],
        faulty_blocks=ALERT_FAULTY_BLOCKS,
        stagger_s=cfg["alert_stagger_s"],
        margin_s=cfg["alert_margin_s"],
        tail_blocks=cfg["alert_tail_blocks"],
        single=single,
    )
    design["healthy_screening"] = {  # JSON has no infinity: "all" = every healthy window is cool
        str(p): {**s, "longest_cool_run": "all" if math.isinf(s["longest_cool_run"]) else s["longest_cool_run"]}
        for p, s in screening.items()
    }
    fleet.faulty = schedule.faulty
    log(
        f"alerts ({raw}): {design['episodes']} episodes ({vib} machines x {schedule.episodes}, "
        f"{len(single)} of them x 1), "
        f"{schedule.faulty_blocks} faulty + {schedule.gap_blocks} healthy blocks (clear {design['clear_blocks']} "
        f"+ cooldown {design['cooldown_blocks']} + margin {design['margin_blocks']}), "
        f"{design['run_wall_s']:.0f} s of publishing at x{speed:g}"
    )
    sent_at: dict[tuple[int, int], float] = {}
    with run:
        step = run.step(speed, design["run_wall_s"], sent_at)
        final = run.finish()  # waits until the agent has taken everything, then stops it (it drains first)
        counters = dict(run.agent.counters)
        received = list(run.agent.alerts)
    period_ns = round(fleet.block_period_s * NS)
    messages: list[AlertMessage] = []
    other: dict[str, int] = {}
    for alert in received:
        body = alert.body
        if body.get("alert_type") != ALERT_TYPE or body.get("sensor") != "vibration":
            key = f"{body.get('alert_type')}/{body.get('state')}"
            other[key] = other.get(key, 0) + 1
            continue
        end_ns = _parse_rfc3339_ns(body["window"]["end"])
        messages.append(
            AlertMessage(
                machine=int(body["machine"][1:]),
                event_id=body["event_id"],
                state=body["state"],
                reason=body["reason"],
                block=round((end_ns - fleet.base_ns) / period_ns) - 1,  # block holding the window's last sample
                time_ns=_parse_rfc3339_ns(body["time"]),
                arrived_s=alert.arrived,
            )
        )
    episodes = schedule.episode_list()
    acc = account(
        episodes,
        messages,
        sent_at,
        cooldown_s=rule.cooldown_s,
        window_blocks=window_blocks,
        perf_to_epoch_ns=PERF_TO_EPOCH_NS,
    )
    onset, decision = latency_summary(acc.onset_s), latency_summary(acc.decision_s)
    in_agent = latency_summary(acc.agent_s)

    def suppressed(reason: str) -> float:
        return float(counters.get(series_field(f"alerts.suppressed{{reason={reason},alert_type={ALERT_TYPE}}}"), 0.0))

    result = {
        "raw_vibration": raw,
        "speed": speed,
        "fleet": fleet.describe(),
        "schedule": design,
        "published_msgs_per_s": step["published_msgs_per_s"],
        "agent_cpu_pct": step["agent_cpu_pct"],
        "block_period_wall_ms": 1e3 * fleet.block_period_s / speed,
        "episodes": len(episodes),
        "accounting": acc.counts,
        "alerts_raised": sum(1 for m in messages if m.state == "new"),
        "alerts_matched": acc.counts[RAISED],
        "false_alerts": len(acc.false_alerts),
        "clears": acc.clears,
        "flapping_holds": acc.flapping_holds,
        "open_at_end": acc.open_at_end,
        "other_alerts": other,
        "agent_suppressed_cooldown": suppressed("cooldown"),
        "agent_suppressed_flapping": suppressed("flapping"),
        "onset": onset,
        "decision": decision,
        "decision_in_agent": in_agent,
        # Per episode (schedule order): which machine and episode a latency belongs to, to locate a tail.
        "episode_latencies": [
            {
                "machine": o.episode.machine,
                "episode": o.episode.index,
                "first_block": o.episode.first_block,
                "reason": o.reason,
                "onset_ms": None if o.onset_s is None else round(o.onset_s * 1e3, 1),
                "decision_ms": None if o.decision_s is None else round(o.decision_s * 1e3, 1),
                "in_agent_ms": None if o.agent_s is None else round(o.agent_s * 1e3, 1),
            }
            for o in acc.outcomes
        ],
        "onset_p50_ms": onset["p50_ms"],
        "onset_p99_ms": onset["p99_ms"],
        "onset_max_ms": onset["max_ms"],
        "decision_p50_ms": decision["p50_ms"],
        "decision_p99_ms": decision["p99_ms"],
        "decision_max_ms": decision["max_ms"],
        "not_raised": [
            {
                "machine": o.episode.machine,
                "episode": o.episode.index,
                "first_block": o.episode.first_block,
                "reason": o.reason,
                "event_id": o.event_id,
            }
            for o in acc.outcomes
            if o.reason != RAISED
        ],
        "false_alert_windows": [(m.machine, m.block) for m in acc.false_alerts],
        "final": final,
    }
    log(
        f"alerts ({raw}): "
        + ", ".join(f"{k} {v}" for k, v in acc.counts.items())
        + f"; false alerts {result['false_alerts']}; clears {acc.clears}; flapping holds {acc.flapping_holds}; "
        f"onset {format_latency(onset)}; deciding block {format_latency(decision)} "
        f"(of which until the agent decided {format_latency(in_agent)})"
    )
    return result


def _parse_rfc3339_ns(text: str) -> int:
    from datetime import datetime

    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(dt.timestamp()) * NS + dt.microsecond * 1000


def bench_scaling(services: tuple[str, int, str], workdir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Real-time runs: CPU per message/reading/sample and peak RSS vs machines and vs vibration rate."""
    points: dict[str, list[dict[str, Any]]] = {"machines": [], "machines_vibration": [], "vibration_rate": []}
    plans = [("machines", m, Fleet(m, 0)) for m in cfg["scale_machines"]]
    plans += [("machines_vibration", m, Fleet(m, round(m * VIB_FRACTION))) for m in cfg["scale_machines_vib"]]
    plans += [
        ("vibration_rate", r, Fleet(20, 10, rate_hz=float(r), block_samples=int(2048 * r / 10240)))
        for r in cfg["scale_rates"]
    ]
    for kind, value, fleet in plans:
        with Run(services, workdir, f"scale-{kind[:4]}-{value}", fleet) as run:
            idle_mb = run.agent.memory_kb().get("VmRSS", 0) / 1024
            c0, t0 = run.agent.cpu_s(), time.perf_counter()
            time.sleep(cfg["idle_s"])
            idle_pct = 100 * (run.agent.cpu_s() - c0) / (time.perf_counter() - t0)
            step = run.step(1.0, cfg["scale_s"])
            final = run.finish()
        cpu_s = max(step["agent_cpu_pct"] - idle_pct, 0.0) / 100  # net of the idle agent (heartbeat, polls)
        point = {
            "series": kind,
            **fleet.describe(),
            "published_msgs_per_s": step["published_msgs_per_s"],
            "sustained": step["sustained"],
            "catch_up_s": step["catch_up_s"],
            "agent_cpu_pct": step["agent_cpu_pct"],
            "agent_idle_cpu_pct": idle_pct,
            "cpu_us_per_msg": 1e6 * cpu_s / fleet.messages_per_s,
            "cpu_us_per_reading_equiv": 1e6 * cpu_s / fleet.readings_per_s,
            "cpu_ns_per_sample_equiv": 1e9 * cpu_s / fleet.samples_per_s if fleet.samples_per_s else None,
            "rss_after_start_mb": idle_mb,
            "peak_rss_mb": final["peak_rss_mb"],
            "zero_loss": final["zero_loss"],
        }
        points[kind].append(point)
        log(
            f"scaling {kind}={value}: {point['published_msgs_per_s']:.0f} msg/s, CPU {point['agent_cpu_pct']:.0f} %, "
            f"{point['cpu_us_per_msg'] or float('nan'):.0f} us/msg, peak RSS {point['peak_rss_mb']:.0f} MB"
        )
    series = (
        ("machines", "cpu_us_per_reading_equiv"),
        ("machines_vibration", "cpu_us_per_msg"),
        ("vibration_rate", "cpu_ns_per_sample_equiv"),
    )
    for kind, unit in series:
        rows = points[kind]
        if len(rows) >= 2 and rows[0][unit] and rows[-1][unit]:
            for row in rows:
                row["cost_per_unit_vs_first"] = (row[unit] / rows[0][unit]) if row[unit] else None
    return points


# -- report ------------------------------------------------------------------------------------------------


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    summary = _throughput_summary(result) if "throughput" in result and "limits" in result else {}
    alerts = result.get("alerts") or {}
    summary.update(
        {
            "alert_raw_vibration": alerts.get("raw_vibration"),
            "alert_episodes": alerts.get("episodes"),
            "alert_raised": alerts.get("alerts_matched"),
            "alert_latency_n": (alerts.get("onset") or {}).get("n"),
            "alert_block_period_wall_ms": alerts.get("block_period_wall_ms"),
            # None below MIN_SAMPLES alerts: the percentile is refused, not estimated.
            "alert_onset_p50_ms": alerts.get("onset_p50_ms"),
            "alert_onset_p99_ms": alerts.get("onset_p99_ms"),
            "alert_decision_p50_ms": alerts.get("decision_p50_ms"),
            "alert_decision_p99_ms": alerts.get("decision_p99_ms"),
        }
    )
    burst = result.get("burst") or {}
    summary.update(
        {
            "burst_messages": burst.get("messages"),
            "burst_agent_readings_per_s": (burst.get("agent") or {}).get("readings_per_s"),
            "burst_bare_readings_per_s": (burst.get("bare") or {}).get("readings_per_s"),
            "ratio_burst_agent_over_bare": burst.get("ratio_agent_over_bare"),
            "burst_all_complete": burst.get("all_complete"),
            "commissioned_peak_rss_mb": (result.get("commissioned") or {}).get("peak_rss_mb"),
        }
    )
    machines = result.get("scaling", {}).get("machines", [])
    # The targets table (benchmarks/targets.py); "targets" keeps the name -> holds (None: not measured) view.
    rows = target_rows(result, memory_flat=_rss_slope_flat(machines))
    summary["target_rows"] = rows
    summary["targets"] = {row["name"]: row["holds"] for row in rows}
    return summary


def _throughput_summary(result: dict[str, Any]) -> dict[str, Any]:
    thr = result["throughput"]
    best = thr["max_sustained"] or {}
    bare = result["limits"]["bare_receive"]
    influx = result["limits"]["influx"]
    onnx = result["limits"]["onnx"]
    agent_rate = best.get("published_msgs_per_s", 0.0)
    drains = [st["drain_msgs_per_s"] for st in thr["steps"] if st.get("drain_msgs_per_s")]
    agent_drain = (thr.get("backlog_drain") or {}).get("msgs_per_s")
    bare_backlog = bare.get("backlog", {}).get("receive_msgs_per_s")
    return {
        "agent_max_msgs_per_s": agent_rate,
        "agent_max_readings_per_s": best.get("readings_per_s", 0.0),
        "agent_max_samples_per_s": best.get("samples_per_s", 0.0),
        "agent_zero_loss": thr["final"]["zero_loss"],
        "agent_catch_up_s_at_max": best.get("catch_up_s"),
        "agent_cpu_pct_at_max": best.get("agent_cpu_pct"),
        "agent_peak_rss_mb": thr["final"]["peak_rss_mb"],
        "bare_receive_msgs_per_s": bare["receive_msgs_per_s"],
        "ratio_agent_over_bare_receive": agent_rate / bare["receive_msgs_per_s"]
        if bare["receive_msgs_per_s"]
        else None,
        "bare_publish_msgs_per_s": bare["publish_msgs_per_s"],
        "agent_backlog_drain_msgs_per_s": agent_drain,
        "agent_backlog_drain_not_measured": (thr.get("backlog_drain") or {}).get("not_measured"),
        "agent_ramp_drain_msgs_per_s": max(drains) if drains else None,
        "backlog_messages": (thr.get("backlog_drain") or {}).get("messages"),
        "bare_backlog_drain_msgs_per_s": bare_backlog,
        "ratio_agent_over_bare_backlog_drain": agent_drain / bare_backlog if agent_drain and bare_backlog else None,
        "bare_influx_points_per_s": influx["bare_points_per_s"],
        "writer_influx_points_per_s": influx["spool_writer_points_per_s"],
        "writer_thread_influx_points_per_s": influx.get("spool_writer_thread_points_per_s"),
        "ratio_writer_over_bare_influx": influx["spool_writer_points_per_s"] / influx["bare_points_per_s"],
        "agent_points_per_s_at_max": (best.get("points_written") or 0) / thr["step_s"] if best else 0.0,
        "int8_over_fp32": {
            name: {k: v for k, v in r.items() if k.startswith("int8_over_fp32")} for name, r in onnx.items()
        },
    }


def _rss_slope_flat(rows: list[dict[str, Any]]) -> bool | None:
    """Peak RSS above the idle agent, per machine: not larger at the largest fleet than at the middle one."""
    if len(rows) < 3:
        return None
    per = [(r["peak_rss_mb"] - r["rss_after_start_mb"]) / r["machines"] for r in rows]
    for r, v in zip(rows, per, strict=True):
        r["rss_growth_kb_per_machine"] = v * 1024
    return per[-1] <= max(per[1], 0.05) * 1.25


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    m = result["machine"]
    lines = [
        f"# Benchmark results ({'quick' if result['quick'] else 'full'} run, {result['started']})",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_mb']} MB RAM, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}. Duration {result['duration_s']:.0f} s. "
        f"Command: `{result['command']}`.",
    ]
    if result.get("config_overrides"):
        settings = ", ".join(f"`{k}` = {json.dumps(v)}" for k, v in result["config_overrides"].items())
        lines += ["", f"**Not the shipped config**: every agent of this run had {settings} (`--set`)."]
    if "throughput" in result and "limits" in result:
        lines += _markdown_throughput(result)
    runs = list((result.get("alert_runs") or {}).values())
    if runs:
        lines += _markdown_alerts(runs)
    sc = result.get("scaling", {})
    if sc.get("machines") or sc.get("vibration_rate"):
        lines += [
            "",
            "## Scaling (real time, 1 process reading/s per machine)",
            "",
            "| Series | Machines | With vibration | Vib. rate Hz | msg/s | Agent CPU % | µs CPU/msg "
            "| µs CPU per reading-equiv | "
            "ns CPU per sample-equiv | cost/unit vs first | RSS after start MB | Peak RSS MB | Kept up | Zero loss |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in sc.get("machines", []) + sc.get("machines_vibration", []) + sc.get("vibration_rate", []):
            lines.append(
                f"| {p['series']} | {p['machines']} | {p['vibration_machines']} | {p['vibration_rate_hz']:.0f} | "
                f"{_f(p['published_msgs_per_s'])} | {_f(p['agent_cpu_pct'])} | {_f(p['cpu_us_per_msg'])} | "
                f"{_f(p['cpu_us_per_reading_equiv'])} | {_f(p['cpu_ns_per_sample_equiv'])} | "
                f"{_f(p.get('cost_per_unit_vs_first'), 2)} | {_f(p['rss_after_start_mb'])} | {_f(p['peak_rss_mb'])} | "
                f"{_f(p['sustained'])} | {_f(p['zero_loss'])} |"
            )
    for key, section in (("burst", _markdown_burst), ("commissioned", _markdown_commissioned)):
        if result.get(key) and "error" in result[key]:
            lines += ["", f"## {key.capitalize()}: failed", "", f"`{result[key]['error']}`"]
        elif result.get(key):
            lines += section(result[key])
    lines += ["", "## Targets (each measured in this run)", "", *markdown_rows(s["target_rows"])]
    return "\n".join(lines) + "\n"


def _markdown_burst(b: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Burst ({b['messages']:,} QoS 1 process readings over {b['machines']} machines, published as fast as "
        f"possible while the subscriber runs; best of {b['attempts']}, alternating)",
        "",
        "| Subscriber | Stored | Duplicates | Machines with exactly seq 0..n-1 | Published in s | All received s "
        "| All stored s | Readings/s (until stored) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for who, r in (("agent (shipped config, persistent session)", b["agent"]), ("bare batcher", b["bare"])):
        lines.append(
            f"| {who} | {r['stored']:,}/{b['messages']:,} | {r['duplicates']} | "
            f"{r['machines_exact']}/{b['machines']} | {_f(r['publish_s'], 2)} | {_f(r['received_s'], 2)} | "
            f"{_f(r['stored_s'], 2)} | {_f(r['readings_per_s'])} |"
        )
    lines += [
        "",
        f"**Agent / bare batcher: {_f(b['ratio_agent_over_bare'], 2)}**; every attempt of both complete with no "
        f"duplicate: {_f(b['all_complete'] and b['duplicates_max'] == 0)}. The bare batcher: paho (MQTT 5, QoS 1, "
        "automatic PUBACK) → line protocol in the callback → `/write` in batches of 5000 or every 1 s (no spool); "
        f'"stored" = `count("seq")` of `reading` polled every {b["poll_s"]:g} s; the agent\'s "received" comes '
        "from its heartbeat (0.5 s steps).",
    ]
    return lines


def _markdown_commissioned(c: dict[str, Any]) -> list[str]:
    st = c["state_after_commissioning"]
    return [
        "",
        f"## Memory with every commissioning baseline full ({c['machines']:,} machines, "
        f"{c['vibration_machines']} with vibration)",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| Baseline per machine (config: commissioning_steps {c['commissioning_config']['commissioning_steps']}, "
        f"commissioning_s {c['commissioning_config']['commissioning_s']}) | {c['commissioning_steps']} readings |",
        f"| Process readings published faster than real time for commissioning | "
        f"{c['machines'] * c['commissioning_readings_per_machine']:,} "
        f"({c['commissioning_readings_per_machine']} per machine) in {_f(c['commissioning_wall_s'])} s "
        f"({_f(c['commissioning_msgs_per_s'])} msg/s) |",
        f"| Agent counters: commissioning / monitoring steps, skipped | {st['steps_commissioning']:,.0f} "
        f"(= {c['machines']:,} × {c['commissioning_steps']}) / {st['steps_monitoring']:,.0f} / {st['skipped']:,.0f} |",
        f"| Every baseline full (from the counters) | {_f(c['all_baselines_full'])} |",
        f"| Machines with commissioning-baseline scores in InfluxDB | {c['machines_with_baseline_scores']:,} |",
        f"| Then real time (x1, vibration on) for {c['realtime_s']:g} s | {_f(c['realtime_msgs_per_s'])} msg/s, "
        f"kept up {_f(c['realtime_kept_up'])} |",
        f"| RSS idle / after commissioning / at the end | {_f(c['rss_idle_mb'])} / "
        f"{_f(c['rss_after_commissioning_mb'])} / {_f(c['rss_end_mb'])} MB |",
        f"| **Peak RSS (VmHWM), whole run** | **{_f(c['peak_rss_mb'])} MB** (after commissioning: "
        f"{_f(c['peak_rss_after_commissioning_mb'])} MB) |",
        f"| Zero loss | {_f(c['zero_loss'])} ({c['readings_stored']:,}/{c['readings_published']:,} readings, "
        f"{c['samples_stored']:,}/{c['samples_expected']:,} raw samples) |",
    ]


def _markdown_throughput(result: dict[str, Any]) -> list[str]:
    s = result["summary"]
    thr = result["throughput"]
    lines = [
        "",
        "## Summary",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| Agent, highest sustained rate (zero loss: {_f(s['agent_zero_loss'])}) | "
        f"{_f(s['agent_max_msgs_per_s'])} msg/s = "
        f"{_f(s['agent_max_readings_per_s'])} readings/s + {_f(s['agent_max_samples_per_s'])} samples/s |",
        f"| Agent CPU at that rate (100 % = one core) | {_f(s['agent_cpu_pct_at_max'])} % |",
        f"| Agent catch-up after the step at that rate | {_f(s['agent_catch_up_s_at_max'], 2)} s |",
        f"| Agent peak RSS (VmHWM) during the ramp | {_f(s['agent_peak_rss_mb'])} MB |",
        f"| Bare paho subscriber, QoS 1, live (publisher running as fast as it can) | "
        f"{_f(s['bare_receive_msgs_per_s'])} msg/s |",
        f"| (publisher alone, as fast as it can) | {_f(s['bare_publish_msgs_per_s'])} msg/s |",
        f"| **Agent sustained / bare live receive** | **{_f(s['ratio_agent_over_bare_receive'], 2)}** |",
        f"| Bare subscriber working off a backlog queued while it was away ({_f(s['backlog_messages'])} messages) | "
        f"{_f(s['bare_backlog_drain_msgs_per_s'])} msg/s |",
        f"| Agent working off the same backlog, queued while it was stopped (timed from its first message) | "
        f"{_f(s['agent_backlog_drain_msgs_per_s'])} msg/s"
        + (f" ({s['agent_backlog_drain_not_measured']})" if s["agent_backlog_drain_not_measured"] else "")
        + " |",
        f"| (in the ramp, working off what it fell behind by, publisher idle: best step) | "
        f"{_f(s['agent_ramp_drain_msgs_per_s'])} msg/s |",
        f"| **Agent / bare, backlog drain** | **{_f(s['ratio_agent_over_bare_backlog_drain'], 2)}** |",
        f"| Bare InfluxV1Sink writes (batches of 5000) | {_f(s['bare_influx_points_per_s'])} points/s |",
        f"| Agent spool + writer process drain (lines made from the spooled entries) | "
        f"{_f(s['writer_influx_points_per_s'])} points/s |",
        f"| (the same writer as threads of the agent) | {_f(s.get('writer_thread_influx_points_per_s'))} points/s |",
        f"| **Agent writer / bare writer** | **{_f(s['ratio_writer_over_bare_influx'], 2)}** |",
        f"| Agent (subprocess) points written/s at its highest sustained rate | {_f(s['agent_points_per_s_at_max'])} |",
        "",
        "## ONNX Runtime latency (median per run, 1 thread)",
        "",
        "| Model | FP32 b=1 µs | INT8 b=1 µs | INT8/FP32 b=1 | FP32 b=32 µs | INT8 b=32 µs | INT8/FP32 b=32 "
        "| shipped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["limits"]["onnx"].items():
        lines.append(
            f"| {name} | {_f(r.get('fp32_batch1_us'), 1)} | {_f(r.get('int8_batch1_us'), 1)} | "
            f"{_f(r.get('int8_over_fp32_batch1'), 2)} | {_f(r.get('fp32_batch32_us'), 1)} | "
            f"{_f(r.get('int8_batch32_us'), 1)} | {_f(r.get('int8_over_fp32_batch32'), 2)} | {r.get('shipped_file')} |"
        )
    lines += [
        "",
        f"## Throughput ramp ({thr['fleet']['machines']} machines, {thr['fleet']['vibration_machines']} with vibration "
        f"at {thr['fleet']['vibration_rate_hz']:.0f} Hz, {thr['step_s']:g} s per step)",
        "",
        "| Speed | Published msg/s | readings/s | samples/s | Backlog at end (msgs) | Catch-up s | Agent CPU % | "
        "µs CPU/msg | Drain msg/s | Machine busy % / influxd % / mosquitto % | Points written | Windows scored | "
        "Spool depth after | Peak RSS MB | Sustained |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for st in thr["steps"]:
        lines.append(
            f"| x{st['speed']:g} | {_f(st['published_msgs_per_s'])} | {_f(st['readings_per_s'])} | "
            f"{_f(st['samples_per_s'])} | {_f(st['backlog_at_end_msgs'])} | {_f(st['catch_up_s'], 2)} | "
            f"{_f(st['agent_cpu_pct'])} | {_f(st['agent_cpu_us_per_msg'])} | {_f(st.get('drain_msgs_per_s'))} | "
            f"{_f(st['cpu_while_publishing'].get('machine_busy_pct'))} / "
            f"{_f(st['cpu_while_publishing'].get('influxd_cpu_pct'))} / "
            f"{_f(st['cpu_while_publishing'].get('mosquitto_cpu_pct'))} | "
            f"{_f(st['points_written'])} | "
            f"{_f(st['windows_scored'])} | {_f(st['spool_depth_after'])} | {_f(st['peak_rss_mb'])} | "
            f"{_f(st['sustained'])} |"
        )
    fin = thr["final"]
    lines += [
        "",
        f"Stored in InfluxDB after the ramp: {fin['readings_stored']:,} of {fin['readings_published']:,} readings, "
        f"{_raw_stored(fin)}; "
        f"decode errors {fin['decode_errors']:.0f}, spool drops {fin['spool_dropped']:.0f}, "
        f"window drops {fin['windows_dropped']:.0f}.",
    ]
    return lines


def _markdown_alerts(runs: list[dict[str, Any]]) -> list[str]:
    """The alert section: the schedule, every episode accounted for, latencies (refused below MIN_SAMPLES)."""
    a = runs[0]
    d = a["schedule"]
    rule = d["rule"]
    fleet = a["fleet"]
    lines = [
        "",
        f"## Alert latency (x{a['speed']:g} = {a['published_msgs_per_s']:.0f} msg/s, {fleet['machines']} machines, "
        f"{fleet['vibration_machines']} with vibration; block period {a['block_period_wall_ms']:.0f} ms wall)",
        "",
        f"Alert rule `{ALERT_TYPE}` of the agent's config: raise {rule['raise_n']} of {rule['raise_m']} hot windows, "
        f"clear after {rule['clear_after']} cool windows, cooldown {rule['cooldown_s']:g} s, flapping "
        f"{rule['flap_max_transitions']} transitions in {rule['flap_window_s']:g} s. Schedule per vibration machine: "
        f"{d['warmup_blocks']} healthy blocks + a stagger of up to {d['stagger_blocks']}, then "
        f"{d['episodes_per_machine']} x ({d['faulty_blocks']} faulty + {d['gap_blocks']} healthy blocks: clear "
        f"{d['clear_blocks']} + cooldown {d['cooldown_blocks']} + margin {d['margin_blocks']}; "
        f"{d['gap_wall_s']:.1f} s wall), at most {d['flap_limit_per_window']} events per machine before the "
        f"flapping hold; {len(d['single_episode_machines'])} machines get one episode only (their healthy "
        f"signal never gives {rule['clear_after']} cool windows in a row: "
        + (
            ", ".join(
                f"signal {p}: {s['longest_cool_run']}, max {s['max_ratio']:.2f} x threshold"
                for p, s in d.get("healthy_screening", {}).items()
            )
            or "not screened"
        )
        + f"); {d['episodes']} episodes, {d['run_wall_s']:.0f} s of publishing.",
        "",
        "| raw_vibration | Episodes | " + " | ".join(REASONS) + " | False alerts | Clears | Flapping holds "
        "| Open at end | Agent cooldown suppressions | Agent CPU % |",
        "|---|---|" + "---|" * len(REASONS) + "---|---|---|---|---|---|",
    ]
    for r in runs:
        clears = ", ".join(f"{k} {v}" for k, v in sorted(r["clears"].items())) or "0"
        lines.append(
            f"| {r['raw_vibration']} | {r['episodes']} | "
            + " | ".join(str(r["accounting"][k]) for k in REASONS)
            + f" | {r['false_alerts']} | {clears} | {r['flapping_holds']} | {r['open_at_end']} | "
            f"{_f(r['agent_suppressed_cooldown'])} | {_f(r['agent_cpu_pct'])} |"
        )
    lines += [
        "",
        "| raw_vibration | From the first faulty block: p50 / p99 / max | "
        "From the block completing the raising window: p50 / p99 / max | ... of which until the agent decided |",
        "|---|---|---|---|",
    ]
    for r in runs:
        in_agent = format_latency(r["decision_in_agent"]) if "decision_in_agent" in r else "–"
        lines.append(
            f"| {r['raw_vibration']} | {format_latency(r['onset'])} | {format_latency(r['decision'])} | {in_agent} |"
        )
    lines.append("")
    for r in runs:
        fin = r.get("final") or {}
        if fin:
            lines.append(
                f"- {r['raw_vibration']}: stored {fin['readings_stored']:,} of {fin['readings_published']:,} readings "
                f"and {_raw_stored(fin)}; zero loss {_f(fin['zero_loss'])}."
            )
    lines += ["", f"Percentiles are refused below {MIN_SAMPLES} alerts. Reasons:"]
    lines += [f"- `{k}`: {v}" for k, v in REASON_TEXT.items()]
    return lines


def _phase(name: str, run: Any) -> dict[str, Any]:
    """``run()``, or ``{"error": ...}`` when it raised: the report then says why its targets were not measured."""
    try:
        return run()
    except Exception as exc:  # an agent that fails to start or to drain must not cost the rest of the run
        log(f"{name}: failed: {exc!r}")
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short CI version (< 60 s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: " + ", ".join(PHASES))
    parser.add_argument("--only", default="", help="comma-separated phases to run (default all): " + ", ".join(PHASES))
    parser.add_argument(
        "--alert-modes",
        default="",
        help="raw_vibration modes of the alert runs, the first is the headline (default: around_alerts, the "
        "shipped default; the quick run: every_n); e.g. around_alerts,every_n",
    )
    parser.add_argument(
        "--alert-speed",
        type=float,
        default=None,
        help="speed of the alert runs (default: the ramp's vibration blocks per wall second at half its highest "
        f"sustained speed, spread over the alert fleet; x{REFERENCE_RAMP_SPEED:g} assumed when the ramp does not run)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key of every agent, dotted, VALUE in YAML (e.g. storage.raw_vibration.release_points_s=null), "
        "for A/B runs; repeatable; the report lists them",
    )
    args = parser.parse_args(argv)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        harness.CONFIG_OVERRIDES[key] = yaml.safe_load(value)
    cfg = dict(QUICK if args.quick else FULL)
    if args.alert_modes:
        cfg["alert_modes"] = [m for m in args.alert_modes.split(",") if m]
    if args.alert_speed:
        cfg["alert_speed"] = args.alert_speed
    skip = {s for s in args.skip.split(",") if s}
    only = {s for s in args.only.split(",") if s}
    unknown = (skip | only) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}; phases: {', '.join(PHASES)}")
    phases = [p for p in PHASES if (not only or p in only) and p not in skip]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "phases": phases,
        "config": {k: v for k, v in cfg.items()},
        "config_overrides": dict(harness.CONFIG_OVERRIDES),
    }
    with tempfile.TemporaryDirectory(prefix="pdm-bench-") as tmp:
        workdir = Path(tmp)
        broker = devservices.start_mosquitto(workdir / "mosquitto", extra_conf=BROKER_CONF)
        influx = devservices.start_influxdb_v1(workdir / "influxdb")
        try:
            services = (broker.host, broker.port, influx.url)
            SERVICE_PIDS.update(
                {"mosquitto": broker.process.pid, "influxd": influx.process.pid}  # type: ignore[union-attr]
            )
            machines, vib = cfg["fleet"]
            if "limits" in phases:
                log("limits: ONNX Runtime latency")
                onnx = bench_onnx(cfg["onnx_runs"])
                log("limits: bare subscriber")
                bare = bench_bare_receive(broker.host, broker.port, Fleet(machines, vib), cfg["bare_messages_s"])
                backlog = bench_bare_backlog(broker.host, broker.port, Fleet(machines, vib), cfg["backlog_s"])
                bare["backlog"] = backlog
                log(
                    f"limits: bare subscriber {bare['receive_msgs_per_s']:.0f} msg/s live (publisher "
                    f"{bare['publish_msgs_per_s']:.0f} msg/s), {backlog['receive_msgs_per_s']:.0f} msg/s from a backlog"
                )
                influx_result = bench_influx(
                    influx.url, fleet_points(Fleet(machines, vib), cfg["bare_points"]), workdir, cfg["influx_attempts"]
                )
                log(
                    f"limits: InfluxDB bare {influx_result['bare_points_per_s']:.0f} points/s, "
                    f"spool+writer {influx_result['spool_writer_points_per_s']:.0f} points/s"
                )
                result["limits"] = {"bare_receive": bare, "influx": influx_result, "onnx": onnx}
            ramp_speed = REFERENCE_RAMP_SPEED
            if "throughput" in phases:
                result["throughput"] = bench_throughput(services, workdir, cfg)
                best = result["throughput"]["max_sustained"]
                ramp_speed = best["speed"] if best else 1.0
            if "burst" in phases:
                log(f"burst: {cfg['burst_messages']:,} QoS 1 readings over {cfg['burst_machines']} machines")
                result["burst"] = _phase(
                    "burst",
                    lambda: bench_burst(
                        services, workdir, cfg["burst_messages"], cfg["burst_machines"], cfg["burst_attempts"], log
                    ),
                )
            if "alerts" in phases:
                speed = alert_speed(cfg, ramp_speed)
                runs: dict[str, Any] = {}
                for mode in cfg["alert_modes"]:
                    log(f"alert latency at x{speed:g} with raw_vibration {mode}")
                    runs[mode] = bench_alerts(services, workdir, cfg, speed, mode)
                result["alert_runs"] = runs
                result["alerts"] = runs[cfg["alert_modes"][0]]  # the headline run
            if "scaling" in phases:
                result["scaling"] = bench_scaling(services, workdir, cfg)
            if "commissioned" in phases:
                machines, vib = cfg["commissioned_fleet"]
                result["commissioned"] = _phase(
                    "commissioned",
                    lambda: bench_commissioned(services, workdir, machines, vib, cfg["commissioned_realtime_s"], log),
                )
        finally:
            broker.stop()
            influx.stop()
    result["duration_s"] = time.perf_counter() - started
    result["summary"] = summarize(result)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "bench.md").write_text(markdown(result))
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'} in {result['duration_s']:.0f} s")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
