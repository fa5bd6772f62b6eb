"""Benchmark workload: a fleet of simulated machines as precomputed inbound MQTT payloads.

A ``Fleet`` has ``machines`` machines that publish a process reading (temperature, current, pressure,
rpm: one ``fields`` message) every ``1 / process_hz`` seconds, and ``vibration_machines`` of them that
also publish blocks of ``block_samples`` float32 samples at ``rate_hz`` (``f32le`` encoding), one block
every ``block_samples / rate_hz`` seconds. Signals come from ``pdm_tools.simulator.machine.SimulatedMachine``
and payloads from ``agent.decode.encode``: before a run, each distinct block or process value is encoded
once with sentinel ``ts_ns``/``seq`` values; a message is then that payload with the real timestamp and
sequence number spliced in (a byte concatenation), so the publisher spends no time encoding.

Time: ``events(t0_s, t1_s)`` lists the messages of simulated seconds ``[t0_s, t1_s)`` in publishing
order, each with its simulated offset; the publisher sends them at ``offset / speed`` wall seconds, so
``speed`` scales the offered rate. Device timestamps are ``base_ns`` + simulated time, contiguous per
source (the agent's windower sees no gaps), and unique (InfluxDB keeps every reading, so counts match).

Faults: ``faulty(j, k)`` decides whether block ``k`` of vibration machine ``j`` comes from the pool with
a full-severity ``bearing_outer`` fault (``ramp_s = 0``) instead of the healthy pool. Both pools are
generated over the same sample indices with the same noise, so switching between them at a block
boundary adds only the fault's impacts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent.decode.encode import encode_block, encode_fields
from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile

NS = 1_000_000_000
_TS_SENTINEL = 1_111_111_111_111_111_111
_SEQ_SENTINEL = 222_222_222
SEED = 7
VIBRATION_POOLS = 4  # distinct vibration signals, shared round-robin by the vibration machines
PROCESS_POOLS = 8  # distinct process histories, shared round-robin by all machines
POOL_BLOCKS = 50  # contiguous blocks per vibration pool (10 s at the default block period)
PROCESS_POOL_STEPS = 600  # contiguous process readings per pool (10 min at 1 Hz)
_POOLS: dict[tuple[str, int, float, int], list[list[bytes]]] = {}  # encoded pools, shared by the fleets of a run


def _template(payload: bytes) -> bytes:
    """The payload after the sentinel ``seq``: the reusable tail of every message built from it."""
    head = b'{"v":1,"ts_ns":%d,"seq":%d' % (_TS_SENTINEL, _SEQ_SENTINEL)
    if not payload.startswith(head):
        raise AssertionError(f"unexpected payload layout: {payload[:60]!r}")
    return payload[len(head) :]


def splice(tail: bytes, ts_ns: int, seq: int) -> bytes:
    """A full payload: the header with ``ts_ns`` and ``seq``, then a precomputed tail."""
    return b'{"v":1,"ts_ns":%d,"seq":%d%s' % (ts_ns, seq, tail)


@dataclass(frozen=True)
class Event:
    """One message to publish: simulated offset (s), topic, payload; ``block`` is (vibration machine, k)."""

    t_s: float
    topic: str
    payload: bytes
    block: tuple[int, int] | None = None


def _first_index(t0_s: float, offset_s: float, step_s: float) -> int:
    """The smallest ``k >= 0`` whose time ``k * step_s + offset_s`` (computed exactly as ``Fleet.events``
    computes it) is not before ``t0_s``: the estimate from the division is corrected by that very expression,
    so the bound agrees with the ``< t1_s`` test of the previous interval to the last bit."""
    k = max(int(np.ceil((t0_s - offset_s) / step_s)), 0)
    while k > 0 and (k - 1) * step_s + offset_s >= t0_s:
        k -= 1
    while k * step_s + offset_s < t0_s:
        k += 1
    return k


@dataclass
class Fleet:
    machines: int
    vibration_machines: int
    rate_hz: float = 10240.0
    block_samples: int = 2048
    process_hz: float = 1.0
    base_ns: int = field(default_factory=lambda: (_now_s() - 3600) * NS)
    faulty: Callable[[int, int], bool] = field(default=lambda j, k: False, repr=False)
    _healthy: list[list[bytes]] = field(default_factory=list, repr=False)
    _faulty: list[list[bytes]] = field(default_factory=list, repr=False)
    _process: list[list[bytes]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.vibration_machines <= self.machines:
            raise ValueError("vibration_machines must be in [0, machines]")
        period_ns = self.block_samples * NS / self.rate_hz
        if period_ns != int(period_ns):
            raise ValueError("block_samples / rate_hz must be a whole number of nanoseconds")

    # -- rates per simulated second ------------------------------------------------------------------

    @property
    def block_period_s(self) -> float:
        return self.block_samples / self.rate_hz

    @property
    def messages_per_s(self) -> float:
        return self.machines * self.process_hz + self.vibration_machines / self.block_period_s

    @property
    def readings_per_s(self) -> float:
        return self.machines * self.process_hz

    @property
    def samples_per_s(self) -> float:
        return self.vibration_machines * self.rate_hz

    def describe(self) -> dict[str, float]:
        return {
            "machines": self.machines,
            "vibration_machines": self.vibration_machines,
            "vibration_rate_hz": self.rate_hz,
            "block_samples": self.block_samples,
            "process_hz": self.process_hz,
            "messages_per_sim_s": self.messages_per_s,
            "readings_per_sim_s": self.readings_per_s,
            "samples_per_sim_s": self.samples_per_s,
        }

    # -- payload pools -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Simulate and encode the pools (a few seconds at most); idempotent."""
        if self._process:
            return
        n = self.block_samples
        for p in range(min(VIBRATION_POOLS, self.vibration_machines)):
            key = ("vibration", p, self.rate_hz, n)
            if key in _POOLS:
                self._healthy.append(_POOLS[key][0])
                self._faulty.append(_POOLS[key][1])
                continue
            profile = fleet_profile(p, SEED, base=None)
            if self.rate_hz != profile.rate_hz:
                import dataclasses

                profile = dataclasses.replace(profile, rate_hz=self.rate_hz)
            healthy = SimulatedMachine(profile, seed=SEED).vibration(0.0, n * POOL_BLOCKS)
            fault = Fault(profile.name, "bearing_outer", start_s=0.0, severity=1.0, ramp_s=0.0)
            broken = SimulatedMachine(profile, [fault], seed=SEED).vibration(0.0, n * POOL_BLOCKS)
            self._healthy.append([self._block(healthy[i * n : (i + 1) * n]) for i in range(POOL_BLOCKS)])
            self._faulty.append([self._block(broken[i * n : (i + 1) * n]) for i in range(POOL_BLOCKS)])
            _POOLS[key] = [self._healthy[-1], self._faulty[-1]]
        for p in range(min(PROCESS_POOLS, self.machines)):
            key = ("process", p, self.process_hz, 0)
            if key in _POOLS:
                self._process.append(_POOLS[key][0])
                continue
            profile = fleet_profile(p, SEED + 1)
            machine = SimulatedMachine(profile, seed=SEED)
            tails = []
            for step in range(PROCESS_POOL_STEPS):
                values = machine.process(step / self.process_hz) or {}
                values = {**values, "rpm": profile.rpm}
                tails.append(_template(encode_fields(values, ts_ns=_TS_SENTINEL, seq=_SEQ_SENTINEL)))
            self._process.append(tails)
            _POOLS[key] = [tails]

    def _block(self, samples: np.ndarray) -> bytes:
        payload = encode_block(samples, self.rate_hz, ts_ns=_TS_SENTINEL, seq=_SEQ_SENTINEL, encoding="f32le")
        return _template(payload)

    # -- events --------------------------------------------------------------------------------------

    @staticmethod
    def topic(machine: int, sensor: str) -> str:
        return f"factory/bench/l{machine % 4}/m{machine:04d}/{sensor}"

    def events(self, t0_s: float, t1_s: float) -> list[Event]:
        """Messages of simulated time ``[t0_s, t1_s)``, sorted by offset (``t_s`` is relative to ``t0_s``).

        Consecutive calls over adjacent intervals (``t1_s`` of one is ``t0_s`` of the next) publish each message
        exactly once, whatever rounding the boundaries carry: a message's time is computed the same way for
        both bounds (``_first_index``), so none falls into two intervals (which would publish one reading twice,
        stored once, and read as a loss) or into none.
        """
        self.prepare()
        out: list[tuple[float, int, Event]] = []
        step_s = 1.0 / self.process_hz
        step_ns = round(step_s * NS)
        for i in range(self.machines):
            offset = i * step_s / self.machines
            k = _first_index(t0_s, offset, step_s)
            topic = self.topic(i, "process")
            pool = self._process[i % len(self._process)]
            while (t := k * step_s + offset) < t1_s:
                payload = splice(pool[k % len(pool)], self.base_ns + k * step_ns, k)
                out.append((t - t0_s, len(out), Event(t - t0_s, topic, payload)))
                k += 1
        period = self.block_period_s
        period_ns = round(period * NS)
        v = self.vibration_machines
        for j in range(v):
            offset = j * period / v
            k = _first_index(t0_s, offset, period)
            topic = self.topic(j, "vibration")
            p = j % len(self._healthy)
            while (t := k * period + offset) < t1_s:
                pool = self._faulty[p] if self.faulty(j, k) else self._healthy[p]
                payload = splice(pool[k % POOL_BLOCKS], self.base_ns + k * period_ns, k)
                out.append((t - t0_s, len(out), Event(t - t0_s, topic, payload, block=(j, k))))
                k += 1
        out.sort(key=lambda e: (e[0], e[1]))
        return [e for _, _, e in out]

    def block_start_ns(self, k: int) -> int:
        return self.base_ns + k * round(self.block_period_s * NS)

    def stored_samples_expected(self, blocks_per_machine: dict[int, int], every_n: int) -> int:
        """Raw samples the agent stores with ``raw_vibration: every_n`` (the first block, then every n-th)."""
        return sum(-(-count // every_n) * self.block_samples for count in blocks_per_machine.values())


def _now_s() -> int:
    import time

    return int(time.time())
