"""The simulated factory gateway: machines' vibration blocks and process readings, published over MQTT.

Simulated time runs from 0 at the moment the broker connection is up; device timestamps are the wall
clock at that moment plus simulated time, and publishing is paced at real time divided by ``speed``.
A vibration block is published once all its samples exist (at the time of its last sample + 1 period),
a process reading at its own time. ``seq`` counts the messages published on each topic, so a gap in it
means a lost message; a dropout fault silences a sensor without touching ``seq`` (the agent sees it as
missing time, as with a real sensor that stops answering).
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.decode.encode import encode_block, encode_fields
from agent.records import NS_PER_S
from pdm_tools.simulator.config import SimulatorConfig
from pdm_tools.simulator.machine import Fault, SimulatedMachine
from pdm_tools.simulator.publisher import MqttPublisher, Publisher, PublisherCounters

logger = logging.getLogger(__name__)

VIBRATION = "vibration"
PROCESS = "process"
GROUND_TRUTH = "ground_truth"

# Tolerance on "does this event fall inside the duration" (float time arithmetic).
_EPS_S = 1e-9
# Warn once when publishing lags simulated time by more than this (in wall seconds).
_LAG_WARNING_S = 1.0


@dataclass(frozen=True, slots=True)
class GatewayStats:
    """What one run published. ``messages`` counts messages handed to MQTT (all kinds);
    ``suppressed``: messages not published because of a dropout fault; ``clipped``: i16le samples
    saturated; ``unacked``: QoS 1 messages without an acknowledgement when the run ended."""

    start_ns: int
    simulated_s: float
    messages: int
    by_kind: Mapping[str, int]
    per_machine: Mapping[str, int]
    samples: int
    readings: int
    suppressed: int
    clipped: int
    retries: int
    failed: int
    rejected: int
    disconnects: int
    unacked: int


def ground_truth_records(faults: tuple[Fault, ...], start_ns: int) -> list[dict[str, object]]:
    """One record per fault in device time; ``end_ns`` None means until the end of the run."""
    return [
        {
            "v": 1,
            "machine": f.machine,
            "kind": f.kind,
            "sensor": f.sensor,
            "severity": f.severity,
            "ramp_s": f.ramp_s,
            "start_ns": start_ns + round(f.start_s * NS_PER_S),
            "end_ns": None if f.end_s is None else start_ns + round(f.end_s * NS_PER_S),
        }
        for f in faults
    ]


def sample_time_ns(index: int, rate_hz: float) -> int:
    """Nanoseconds from the run start to sample ``index``, exact for integral rates.

    >>> sample_time_ns(3, 10240.0)
    292969
    """
    if float(rate_hz).is_integer():
        rate = int(rate_hz)
        return (2 * index * NS_PER_S + rate) // (2 * rate)
    return round(index * NS_PER_S / rate_hz)


class Gateway:
    """Runs the simulation described by ``config`` once; ``publisher`` defaults to a real MQTT client."""

    def __init__(self, config: SimulatorConfig, publisher: Publisher | None = None) -> None:
        self.config = config
        self._publisher = publisher if publisher is not None else MqttPublisher(config.broker, config.qos)
        self.machines = [
            SimulatedMachine(p, [f for f in config.faults if f.machine == p.name], config.seed)
            for p in config.profiles()
        ]

    def run(self, stop_event: threading.Event | None = None) -> GatewayStats:
        """Publish until ``duration_s`` of simulated time has passed or ``stop_event`` is set.

        Raises ``GatewayError`` if the broker cannot be reached at start; later disconnections are
        retried. Always waits (up to ``broker.ack_timeout_s``) for outstanding acknowledgements.
        """
        cfg = self.config
        stop = stop_event if stop_event is not None else threading.Event()
        self._publisher.connect(cfg.broker.connect_timeout_s)
        run = _Run(cfg, self._publisher, stop, time.time_ns())
        logger.info(
            "simulating %d machines for %s s at speed %g, publishing to %s:%s under %s/%s/%s",
            len(self.machines),
            "unlimited" if cfg.duration_s is None else f"{cfg.duration_s:g}",
            cfg.speed,
            cfg.broker.host,
            cfg.broker.port,
            cfg.topics.prefix,
            cfg.topics.site,
            cfg.topics.line,
        )
        for fault in cfg.faults:
            if cfg.duration_s is not None and fault.start_s >= cfg.duration_s:
                logger.warning(
                    "fault %s on %s starts at %g s, after the end of the run (%g s)",
                    fault.kind,
                    fault.machine,
                    fault.start_s,
                    cfg.duration_s,
                )
        try:
            run.publish_ground_truth()
            run.loop(self.machines)
        finally:
            unacked = self._publisher.wait_for_acks(cfg.broker.ack_timeout_s)
            self._publisher.close()
        stats = run.stats(unacked, self._publisher.counters())
        logger.info(
            "published %d messages (%s) over %.1f simulated s; %d unacknowledged, %d failed, %d retries",
            stats.messages,
            ", ".join(f"{k}={v}" for k, v in sorted(stats.by_kind.items())),
            stats.simulated_s,
            stats.unacked,
            stats.failed,
            stats.retries,
        )
        return stats


class _Run:
    """State of one run: the event schedule, seq counters and counts."""

    def __init__(self, cfg: SimulatorConfig, publisher: Publisher, stop: threading.Event, start_ns: int):
        self.cfg = cfg
        self.publisher = publisher
        self.stop = stop
        self.start_ns = start_ns
        self.start_mono = time.monotonic()
        self.seq: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.per_machine: Counter[str] = Counter()
        self.samples = 0
        self.readings = 0
        self.suppressed = 0
        self.clipped = 0
        self.simulated_s = 0.0
        self.lag_warned = False

    def publish_ground_truth(self) -> None:
        records = ground_truth_records(self.cfg.faults, self.start_ns)
        gt = self.cfg.ground_truth
        if gt.path is not None:
            path = Path(gt.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
            logger.info("wrote %d ground-truth faults to %s", len(records), path)
        if gt.topic is not None:
            # Retained, so an evaluator that subscribes later still learns what was injected.
            payload = json.dumps({"v": 1, "run_start_ns": self.start_ns, "faults": records}).encode("utf-8")
            if self.publisher.publish(gt.topic, payload, True, self.stop):
                self.by_kind[GROUND_TRUTH] += 1

    def loop(self, machines: list[SimulatedMachine]) -> None:
        cfg = self.cfg
        block = cfg.vibration.block_samples
        # (due simulated time, kind order, machine index, k): vibration block k ends at (k+1)*block
        # samples; process reading k is at k*period. Each event schedules its successor.
        events: list[tuple[float, int, int, int]] = []
        for m, machine in enumerate(machines):
            heapq.heappush(events, (block / machine.profile.rate_hz, 0, m, 0))
            heapq.heappush(events, (0.0, 1, m, 0))
        while events and not self.stop.is_set():
            due_s, kind, m, k = heapq.heappop(events)
            if cfg.duration_s is not None and due_s > cfg.duration_s + _EPS_S:
                continue
            if kind == 1 and cfg.duration_s is not None and due_s >= cfg.duration_s - _EPS_S:
                continue  # a reading at exactly duration_s belongs to the next run
            if self._wait_until(due_s):
                break
            self.simulated_s = due_s
            machine = machines[m]
            if kind == 0:
                self._vibration(machine, k)
                rate = machine.profile.rate_hz
                heapq.heappush(events, ((k + 2) * block / rate, 0, m, k + 1))
            else:
                self._process(machine, k)
                heapq.heappush(events, ((k + 1) * cfg.process.period_s, 1, m, k + 1))

    def _wait_until(self, due_s: float) -> bool:
        """Sleep until simulated time ``due_s`` is due on the wall clock; True if stopped meanwhile."""
        delay = self.start_mono + due_s / self.cfg.speed - time.monotonic()
        if delay > 0:
            return self.stop.wait(delay)
        if -delay > _LAG_WARNING_S and not self.lag_warned:
            self.lag_warned = True
            logger.warning(
                "publishing lags simulated time by %.1f s (broker away, or generation slower than speed)",
                -delay,
            )
        return self.stop.is_set()

    def _vibration(self, machine: SimulatedMachine, k: int) -> None:
        cfg, p = self.cfg, machine.profile
        block = cfg.vibration.block_samples
        first = k * block
        t0_s = first / p.rate_hz
        if not machine.publishes(VIBRATION, t0_s):
            self.suppressed += 1
            return
        samples = machine.vibration(t0_s, block)
        scale = cfg.vibration.scale
        if cfg.vibration.encoding == "i16le" and scale is not None:
            # A real ADC saturates: clip to the int16 range and count it.
            limit = np.float32(32767 * scale)
            self.clipped += int(np.count_nonzero(np.abs(samples) > limit))
            samples = np.clip(samples, -limit, limit)
        topic = cfg.topics.topic(p.name, VIBRATION)
        payload = encode_block(
            samples,
            p.rate_hz,
            ts_ns=self.start_ns + sample_time_ns(first, p.rate_hz),
            seq=self.seq[topic],
            encoding=cfg.vibration.encoding,
            scale=scale,
        )
        if self._send(topic, payload, VIBRATION, p.name):
            self.samples += block

    def _process(self, machine: SimulatedMachine, k: int) -> None:
        t_s = k * self.cfg.process.period_s
        values = machine.process(t_s)
        if values is None:
            self.suppressed += 1
            return
        topic = self.cfg.topics.topic(machine.profile.name, PROCESS)
        ts_ns = self.start_ns + round(t_s * NS_PER_S)
        if self._send(topic, encode_fields(values, ts_ns=ts_ns, seq=self.seq[topic]), PROCESS, machine.profile.name):
            self.readings += 1

    def _send(self, topic: str, payload: bytes, kind: str, machine: str) -> bool:
        if not self.publisher.publish(topic, payload, False, self.stop):
            return False
        self.seq[topic] += 1
        self.by_kind[kind] += 1
        self.per_machine[machine] += 1
        return True

    def stats(self, unacked: int, counters: PublisherCounters) -> GatewayStats:
        return GatewayStats(
            start_ns=self.start_ns,
            simulated_s=self.simulated_s,
            messages=sum(self.by_kind.values()),
            by_kind=dict(self.by_kind),
            per_machine=dict(self.per_machine),
            samples=self.samples,
            readings=self.readings,
            suppressed=self.suppressed,
            clipped=self.clipped,
            retries=counters.retries,
            failed=counters.failed,
            rejected=counters.rejected,
            disconnects=counters.disconnects,
            unacked=unacked,
        )
