"""How close the agent runs to the limits of its machine: ``python benchmarks/run.py [--quick] [--out DIR]``.

Starts its own Mosquitto and InfluxDB 1.x (``pdm_tools.dev.services``), then measures, in one run:

1. limits: the receive rate of a bare paho subscriber (QoS 1, does nothing) for the benchmark's
   messages; the rate at which InfluxDB accepts the agent's points from a bare ``InfluxV1Sink``
   (batches of 5000) and through the agent's spool + ``SpoolWriter``; ONNX Runtime latency of the
   shipped models, FP32 vs INT8, at batch 1 and at a realistic batch;
2. end-to-end throughput: the agent (subprocess, every stage on) under a publisher whose rate rises
   step by step until the agent falls behind; the highest sustained rate with zero loss (every reading
   counted in InfluxDB), the lag, CPU and peak RSS of the agent;
3. alert latency at half the highest sustained rate, with bearing faults injected into vibration;
4. scaling: cost and memory vs number of machines and vs vibration sampling rate.

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

from agent.records import Reading  # noqa: E402
from agent.storage.influx_v1 import InfluxV1Sink  # noqa: E402
from agent.storage.points import RawVibrationPolicy, block_lines, reading_lines  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    SERVICE_PIDS,
    AgentProcess,
    BareSubscriber,
    Publisher,
    cpu_snapshot,
    cpu_usage,
)
from benchmarks.workload import Fleet  # noqa: E402
from pdm_tools.dev import services as devservices  # noqa: E402

NS = 1_000_000_000

# Broker: defaults (max_inflight_messages 20) except an unbounded per-client queue, so that an agent
# falling behind shows up as lag, not as messages the broker dropped.
BROKER_CONF = "max_queued_messages 0\n"

FULL: dict[str, Any] = {
    "fleet": (100, 10),  # machines, of which with vibration (10240 Hz, blocks of 2048 samples)
    "step_s": 8.0,
    "speeds": [1, 2, 4, 8, 16, 32, 64, 128],
    "refine": True,
    "bare_messages_s": 60.0,  # simulated seconds of the fleet for the bare subscriber
    "bare_points": 600_000,
    "onnx_runs": 400,
    "alert_s": 30.0,
    "influx_attempts": 2,
    "alerts_around": True,
    "scale_machines": [10, 100, 1000],
    "scale_machines_vib": [10, 100, 1000],
    "scale_rates": [10240, 20480, 40960],
    "scale_s": 15.0,
    "idle_s": 2.0,
}
QUICK: dict[str, Any] = {
    "fleet": (40, 4),
    "step_s": 2.5,
    "speeds": [2, 16],
    "refine": False,
    "bare_messages_s": 10.0,
    "bare_points": 60_000,
    "onnx_runs": 50,
    "alert_s": 3.0,
    "influx_attempts": 1,
    "alerts_around": False,
    "scale_machines": [10, 100],
    "scale_machines_vib": [],
    "scale_rates": [],
    "scale_s": 2.0,
    "idle_s": 1.0,
}
VIB_FRACTION = 0.1  # scaling runs: share of machines that also publish vibration
ALERT_PERIOD_BLOCKS = 16  # alert run: each vibration machine repeats 4 faulty blocks, then 12 healthy ones
ALERT_FAULTY_BLOCKS = 4
ALERT_WARMUP_BLOCKS = 10  # healthy blocks before the first fault (the windower needs 2)


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


def fleet_lines(fleet: Fleet, points: int) -> list[str]:
    """The points the agent stores for the fleet's messages (readings, raw vibration every 10th block)."""
    from agent.decode.base import DecodeLimits
    from agent.decode.json_v1 import decode
    from agent.decode.topic import TopicTemplate

    template = TopicTemplate("factory/{site}/{line}/{machine}/{sensor}")
    limits = DecodeLimits(max_payload_bytes=1 << 20, max_future_s=86_400)
    policy = RawVibrationPolicy("every_n", 10)
    lines: list[str] = []
    sim = 0.0
    while len(lines) < points:
        for event in fleet.events(sim, sim + 10.0):
            for item in decode(template.match(event.topic), event.payload, time.time_ns(), limits):
                if isinstance(item, Reading):
                    lines.extend(reading_lines(item))
                else:
                    for block in policy.decide(item):
                        lines.extend(block_lines(block))
        sim += 10.0
    return lines[:points]


def bench_influx(url: str, lines: list[str], workdir: Path, attempts: int, batch: int = 5000) -> dict[str, Any]:
    """Points/s into InfluxDB: a bare sink (batches of ``batch``) vs the agent's spool + SpoolWriter."""
    from agent.metrics import Metrics
    from agent.spool.sqlite import Spool
    from agent.storage.writer import SpoolWriter

    def bare(db: str) -> float:
        sink = InfluxV1Sink(url, db, None, None, None, timeout_s=120)
        sink.create_database()
        t0 = time.perf_counter()
        for i in range(0, len(lines), batch):
            sink.write(lines[i : i + batch])
        elapsed = time.perf_counter() - t0
        sink.close()
        return len(lines) / elapsed

    def spooled(db: str, tag: str) -> tuple[float, float]:
        sink = InfluxV1Sink(url, db, None, None, None, timeout_s=120)
        sink.create_database()
        spool = Spool(workdir / f"writer-{tag}.db", max_rows=10_000_000)
        t0 = time.perf_counter()
        for i in range(0, len(lines), 500):  # as the ingest worker does: many small appends
            spool.append(lines[i : i + 500])
        append_s = time.perf_counter() - t0
        writer = SpoolWriter(spool, sink, Metrics(), batch_size=batch, flush_interval_s=1.0)
        t0 = time.perf_counter()
        writer.start()
        if not writer.flush(600):
            raise RuntimeError("SpoolWriter did not drain its spool")
        elapsed = time.perf_counter() - t0
        writer.stop()
        spool.close()
        sink.close()
        return len(lines) / elapsed, len(lines) / append_s

    pid = os.getpid()
    bare_rates, writer_rates, append_rates = [], [], []
    for attempt in range(attempts):  # interleaved, so both see the same background load
        bare_rates.append(bare(f"bench_bare_{pid}_{attempt}"))
        w, a = spooled(f"bench_writer_{pid}_{attempt}", str(attempt))
        writer_rates.append(w)
        append_rates.append(a)
    return {
        "points": len(lines),
        "bare_points_per_s": max(bare_rates),
        "spool_writer_points_per_s": max(writer_rates),
        "spool_append_points_per_s": max(append_rates),
        "bare_runs": bare_rates,
        "spool_writer_runs": writer_rates,
    }


def bench_onnx(runs: int) -> dict[str, Any]:
    """Median latency of one ``session.run`` per model, FP32 vs INT8, batch 1 and batch 32 (1 thread)."""
    import onnxruntime as ort

    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for manifest_path in sorted((REPO / "models").glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        width = int(manifest["inputs"][0]["shape"][1])
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
            x = rng.standard_normal((batch, width)).astype(np.float32)
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

    def __init__(self, services: tuple[str, int, str], workdir: Path, name: str, fleet: Fleet) -> None:
        host, port, url = services
        self.fleet = fleet
        self.agent = AgentProcess(workdir, host, port, url, name)
        self.publisher: Publisher | None = None
        self.host, self.port = host, port
        self.name = name
        self.sim_t = 0.0
        self.blocks: dict[int, int] = {}
        self.readings = 0

    def __enter__(self) -> Run:
        self.fleet.prepare()
        self.agent.start()
        self.publisher = Publisher(self.host, self.port, self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.agent.stop()

    def step(self, speed: float, wall_s: float, sent_at: dict | None = None, drain_s: float = 0.0) -> dict[str, Any]:
        """Publish ``wall_s`` seconds of the fleet at ``speed`` x real time and see whether the agent keeps up."""
        assert self.publisher is not None
        sim_s = wall_s * speed
        events = self.fleet.events(self.sim_t, self.sim_t + sim_s)
        self.sim_t += sim_s
        for e in events:
            if e.block is not None:
                self.blocks[e.block[0]] = self.blocks.get(e.block[0], 0) + 1
            else:
                self.readings += 1
        before = dict(self.agent.counters)
        cpu0, t0 = self.agent.cpu_s(), time.perf_counter()
        snap0 = cpu_snapshot(self.agent.process.pid)  # type: ignore[union-attr]
        elapsed = self.publisher.publish(events, speed, sent_at)
        usage = cpu_usage(snap0, cpu_snapshot(self.agent.process.pid))  # type: ignore[union-attr]
        pub_end = time.perf_counter()
        cpu_pub = self.agent.cpu_s()
        lag_at_end = self.publisher.published - self.agent.counter("ingest.messages")
        allowed = max(1.5, 0.2 * wall_s)
        self.agent.wait_heartbeat(timeout_s=2)
        n1, h1 = self.agent.counter("ingest.messages"), self.agent.counters_at
        backlog = self.publisher.published - n1
        caught_up = self.agent.wait_caught_up(self.publisher.published, timeout_s=allowed)
        t1, cpu1 = time.perf_counter(), self.agent.cpu_s()
        after = dict(self.agent.counters)
        drain_rate = None
        if caught_up is None and drain_s > 0:
            # Fell behind: the rate at which it works off its backlog with the publisher idle.
            self.agent.wait_caught_up(self.publisher.published, timeout_s=drain_s, spool_below=1 << 30)
            n2, h2 = self.agent.counter("ingest.messages"), self.agent.counters_at
            if backlog > 200 and h2 > h1:
                drain_rate = (n2 - n1) / (h2 - h1)

        def delta(key: str) -> float:
            return sum(v for k, v in after.items() if k.split("{")[0] == key) - sum(
                v for k, v in before.items() if k.split("{")[0] == key
            )

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
        drained = self.agent.wait_caught_up(self.publisher.published, timeout_s=180, spool_below=100)
        memory = self.agent.memory_kb()
        counters = dict(self.agent.counters)
        code = self.agent.stop()
        stored = self.agent.stored()
        expected_samples = self.fleet.stored_samples_expected(self.blocks, self.agent.every_n)
        return {
            "drained": drained is not None,
            "exit_code": code,
            "messages_published": self.publisher.published,
            "readings_published": self.readings,
            "readings_stored": stored["readings"],
            "samples_stored": stored["samples"],
            "samples_expected": expected_samples,
            "raw_vibration": self.agent.raw_vibration,
            # Raw samples are only predictable with every_n (around_alerts depends on the alerts).
            "zero_loss": stored["readings"] == self.readings
            and (self.agent.raw_vibration != "every_n" or stored["samples"] == expected_samples),
            "peak_rss_mb": memory.get("VmHWM", 0) / 1024,
            "decode_errors": sum(v for k, v in counters.items() if k.startswith("decode.errors")),
            "spool_dropped": sum(v for k, v in counters.items() if k.startswith("spool.dropped")),
            "windows_dropped": sum(v for k, v in counters.items() if k.startswith("windows.dropped")),
        }


def bench_throughput(services: tuple[str, int, str], workdir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    machines, vib = cfg["fleet"]
    fleet = Fleet(machines, vib)
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    with Run(services, workdir, "ramp", fleet) as run:
        speeds = list(cfg["speeds"])
        refine = bool(cfg["refine"])
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
                continue
            # Fell behind (step() let it drain): try once between the last good speed and this one.
            if run.agent.wait_caught_up(run.publisher.published, timeout_s=30) is None:  # type: ignore[union-attr]
                log("ramp: the agent did not drain its backlog within 90 s; stopping the ramp")
                break
            if refine and best is not None and speed / best["speed"] > 1.3:
                refine = False
                speeds = [round(math.sqrt(speed * best["speed"]), 1)]
                continue
            break
        final = run.finish()
    log(
        f"ramp: stored {final['readings_stored']}/{final['readings_published']} readings, "
        f"zero loss {final['zero_loss']}"
    )
    return {"fleet": fleet.describe(), "step_s": cfg["step_s"], "steps": steps, "max_sustained": best, "final": final}


def bench_alerts(
    services: tuple[str, int, str], workdir: Path, cfg: dict[str, Any], speed: float, raw: str = "every_n"
) -> dict[str, Any]:
    """Alert latency at ``speed`` (half the highest sustained speed), faults injected into vibration."""
    machines, vib = cfg["fleet"]

    def faulty(j: int, k: int) -> bool:
        if k < ALERT_WARMUP_BLOCKS:
            return False
        return (k + 3 * j) % ALERT_PERIOD_BLOCKS < ALERT_FAULTY_BLOCKS

    fleet = Fleet(machines, vib, faulty=faulty)
    sent_at: dict[tuple[int, int], float] = {}
    run = Run(services, workdir, f"alerts-{raw.replace('_', '-')}", fleet)
    run.agent.raw_vibration = raw  # before start(): it goes into the agent's config file
    with run:
        warm_s = ALERT_WARMUP_BLOCKS * fleet.block_period_s / speed
        step = run.step(speed, warm_s + cfg["alert_s"], sent_at)
        time.sleep(0.5)
        alerts = list(run.agent.alerts)
        final = run.finish()
    period_ns = round(fleet.block_period_s * NS)
    onset, decision, false_alerts, raised = [], [], 0, 0
    for alert in alerts:
        body = alert.body
        if body.get("state") != "new" or body.get("sensor") != "vibration":
            continue
        raised += 1
        j = int(body["machine"][1:])
        end_ns = _parse_rfc3339_ns(body["window"]["end"])
        k_end = round((end_ns - fleet.base_ns) / period_ns) - 1  # block holding the window's last sample
        # The first faulty block of the episode this window belongs to.
        k0 = next(
            (
                k
                for k in range(k_end, max(k_end - ALERT_PERIOD_BLOCKS, -1), -1)
                if faulty(j, k) and not faulty(j, k - 1)
            ),
            None,
        )
        if k0 is None or (j, k0) not in sent_at or (j, k_end) not in sent_at:
            false_alerts += 1
            continue
        onset.append(alert.arrived - sent_at[(j, k0)])
        decision.append(alert.arrived - sent_at[(j, k_end)])
    episodes = sum(
        1 for (j, k) in sent_at if faulty(j, k) and not faulty(j, k - 1) and (j, k + ALERT_FAULTY_BLOCKS) in sent_at
    )

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(np.array(xs) * 1e3, q)) if xs else None

    return {
        "raw_vibration": raw,
        "speed": speed,
        "published_msgs_per_s": step["published_msgs_per_s"],
        "agent_cpu_pct": step["agent_cpu_pct"],
        "block_period_wall_ms": 1e3 * fleet.block_period_s / speed,
        "episodes": episodes,
        "alerts_raised": raised,
        "alerts_matched": len(onset),
        "false_alerts": false_alerts,
        "onset_p50_ms": pct(onset, 50),
        "onset_p99_ms": pct(onset, 99),
        "onset_max_ms": pct(onset, 100),
        "decision_p50_ms": pct(decision, 50),
        "decision_p99_ms": pct(decision, 99),
        "decision_max_ms": pct(decision, 100),
        "final": final,
    }


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
    thr = result["throughput"]
    best = thr["max_sustained"] or {}
    bare = result["limits"]["bare_receive"]
    influx = result["limits"]["influx"]
    onnx = result["limits"]["onnx"]
    alerts = result.get("alerts") or {}
    agent_rate = best.get("published_msgs_per_s", 0.0)
    drains = [st["drain_msgs_per_s"] for st in thr["steps"] if st.get("drain_msgs_per_s")]
    agent_drain = max(drains) if drains else None
    bare_backlog = bare.get("backlog", {}).get("receive_msgs_per_s")
    summary = {
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
        "bare_backlog_drain_msgs_per_s": bare_backlog,
        "ratio_agent_over_bare_backlog_drain": agent_drain / bare_backlog if agent_drain and bare_backlog else None,
        "bare_influx_points_per_s": influx["bare_points_per_s"],
        "writer_influx_points_per_s": influx["spool_writer_points_per_s"],
        "ratio_writer_over_bare_influx": influx["spool_writer_points_per_s"] / influx["bare_points_per_s"],
        "agent_points_per_s_at_max": (best.get("points_written") or 0) / thr["step_s"] if best else 0.0,
        "int8_over_fp32": {
            name: {k: v for k, v in r.items() if k.startswith("int8_over_fp32")} for name, r in onnx.items()
        },
        "alert_onset_p50_ms": alerts.get("onset_p50_ms"),
        "alert_onset_p99_ms": alerts.get("onset_p99_ms"),
        "alert_decision_p99_ms": alerts.get("decision_p99_ms"),
    }
    machines = result.get("scaling", {}).get("machines", [])
    with_vib = result.get("scaling", {}).get("machines_vibration", [])
    rss_1000 = [p["peak_rss_mb"] for p in machines + with_vib if p["machines"] == 1000]
    big = {"peak_rss_mb": max(rss_1000)} if rss_1000 else None
    summary["targets"] = {
        "throughput_ge_0.8_bare_receive": _ok(summary["ratio_agent_over_bare_receive"], lambda r: r >= 0.8),
        "alert_p99_le_250ms_at_half_max": _ok(summary["alert_onset_p99_ms"], lambda v: v <= 250),
        "peak_rss_le_300mb_at_1000_machines": _ok(big and big["peak_rss_mb"], lambda v: v <= 300),
        "cpu_per_reading_flat_with_machines": _ok(
            machines[-1].get("cost_per_unit_vs_first") if len(machines) >= 2 else None, lambda v: v <= 1.25
        ),
        "memory_per_machine_flat": _ok(_rss_slope_flat(machines), lambda v: v),
    }
    return summary


def _rss_slope_flat(rows: list[dict[str, Any]]) -> bool | None:
    """Peak RSS above the idle agent, per machine: not larger at the largest fleet than at the middle one."""
    if len(rows) < 3:
        return None
    per = [(r["peak_rss_mb"] - r["rss_after_start_mb"]) / r["machines"] for r in rows]
    for r, v in zip(rows, per, strict=True):
        r["rss_growth_kb_per_machine"] = v * 1024
    return per[-1] <= max(per[1], 0.05) * 1.25


def _ok(value: Any, test: Any) -> bool | None:
    return None if value is None else bool(test(value))


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
    thr = result["throughput"]
    lines = [
        f"# Benchmark results ({'quick' if result['quick'] else 'full'} run, {result['started']})",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_mb']} MB RAM, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}. Duration {result['duration_s']:.0f} s.",
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
        f"| Bare subscriber working off a queued backlog (no publisher running) | "
        f"{_f(s['bare_backlog_drain_msgs_per_s'])} msg/s |",
        f"| Agent working off its backlog after falling behind (no publisher running) | "
        f"{_f(s['agent_backlog_drain_msgs_per_s'])} msg/s |",
        f"| **Agent / bare, backlog drain** | **{_f(s['ratio_agent_over_bare_backlog_drain'], 2)}** |",
        f"| Bare InfluxV1Sink writes (batches of 5000) | {_f(s['bare_influx_points_per_s'])} points/s |",
        f"| Agent spool + SpoolWriter drain | {_f(s['writer_influx_points_per_s'])} points/s |",
        f"| **Agent writer / bare writer** | **{_f(s['ratio_writer_over_bare_influx'], 2)}** |",
        f"| Agent (subprocess) points written/s at its highest sustained rate | {_f(s['agent_points_per_s_at_max'])} |",
        f"| Alert latency from the first faulty block, p50 / p99 | {_f(s['alert_onset_p50_ms'])} / "
        f"{_f(s['alert_onset_p99_ms'])} ms |",
        f"| Alert latency from the block completing the raising window, p99 | {_f(s['alert_decision_p99_ms'])} ms |",
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
        f"{fin['samples_stored']:,} of {fin['samples_expected']:,} raw vibration samples (every 10th block); "
        f"decode errors {fin['decode_errors']:.0f}, spool drops {fin['spool_dropped']:.0f}, "
        f"window drops {fin['windows_dropped']:.0f}.",
    ]
    runs = [a for a in (result.get("alerts"), result.get("alerts_around_alerts")) if a]
    if runs:
        a = runs[0]
        lines += [
            "",
            f"## Alert latency (x{a['speed']:g} = {a['published_msgs_per_s']:.0f} msg/s, block period "
            f"{a['block_period_wall_ms']:.0f} ms wall)",
            "",
            "| raw_vibration | Episodes | Raised | Matched | Unmatched | From first faulty block p50 / p99 / max ms | "
            "From deciding block p50 / p99 / max ms | Agent CPU % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for a in runs:
            lines.append(
                f"| {a['raw_vibration']} | {a['episodes']} | {a['alerts_raised']} | {a['alerts_matched']} | "
                f"{a['false_alerts']} | {_f(a['onset_p50_ms'])} / {_f(a['onset_p99_ms'])} / {_f(a['onset_max_ms'])} | "
                f"{_f(a['decision_p50_ms'])} / {_f(a['decision_p99_ms'])} / {_f(a['decision_max_ms'])} | "
                f"{_f(a['agent_cpu_pct'])} |"
            )
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
    lines += ["", "## Targets", "", "| Target | Holds |", "|---|---|"]
    for name, ok in s["targets"].items():
        lines.append(f"| {name} | {_f(ok)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short CI version (< 60 s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: alerts, scaling")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    skip = {s for s in args.skip.split(",") if s}
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "config": {k: v for k, v in cfg.items()},
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
            log("limits: ONNX Runtime latency")
            onnx = bench_onnx(cfg["onnx_runs"])
            log("limits: bare subscriber")
            bare = bench_bare_receive(broker.host, broker.port, Fleet(machines, vib), cfg["bare_messages_s"])
            backlog = bench_bare_backlog(broker.host, broker.port, Fleet(machines, vib), cfg["bare_messages_s"])
            bare["backlog"] = backlog
            log(
                f"limits: bare subscriber {bare['receive_msgs_per_s']:.0f} msg/s live (publisher "
                f"{bare['publish_msgs_per_s']:.0f} msg/s), {backlog['receive_msgs_per_s']:.0f} msg/s from a backlog"
            )
            influx_result = bench_influx(
                influx.url, fleet_lines(Fleet(machines, vib), cfg["bare_points"]), workdir, cfg["influx_attempts"]
            )
            log(
                f"limits: InfluxDB bare {influx_result['bare_points_per_s']:.0f} points/s, "
                f"spool+writer {influx_result['spool_writer_points_per_s']:.0f} points/s"
            )
            result["limits"] = {"bare_receive": bare, "influx": influx_result, "onnx": onnx}
            result["throughput"] = bench_throughput(services, workdir, cfg)
            best = result["throughput"]["max_sustained"]
            if "alerts" not in skip:
                speed = max(0.5, (best["speed"] if best else 1.0) / 2)
                log(f"alert latency at x{speed:g}")
                result["alerts"] = bench_alerts(services, workdir, cfg, speed)
                if cfg["alerts_around"]:
                    # The example config's raw_vibration mode: 10 blocks before and after each alert stored.
                    log(f"alert latency at x{speed:g} with raw_vibration around_alerts")
                    result["alerts_around_alerts"] = bench_alerts(services, workdir, cfg, speed, "around_alerts")
            if "scaling" not in skip:
                result["scaling"] = bench_scaling(services, workdir, cfg)
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
