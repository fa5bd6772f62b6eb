"""The agent's CPU per message of the benchmark mix, per worker and message kind (one thread, no services).

``python benchmarks/pipeline_micro.py [--seconds 20] [--rounds 5] [--profile]`` builds the ingest and scoring
workers exactly as the agent does (``agent.bootstrap``, the shipped ``config/agent.yaml``, a real spool in a
temporary folder; only the broker is a stub that drops what is published), then feeds them the messages of
``make bench``'s throughput fleet (100 machines, 10 of them with 10 kHz vibration blocks: ``workload.Fleet``)
in batches as the threads would take them. It prints the CPU time (``time.process_time``) of the ingest
worker's ``process`` and of the scoring worker's ``process`` per message, for the process messages and the
vibration blocks separately, as the median over ``--rounds`` rounds of ``--seconds`` simulated seconds each
(the first round warms up and is not counted).

What it leaves out: paho's packet handling, the interpreter lock's hand-overs between the threads, and the
writer (``spool_micro.py``). It is the per-message cost the sustained and drain targets of
``docs/benchmarks.md`` depend on, measured without the noise of a whole run; compare two commits by running
it in each, alternately. ``--profile`` prints cProfile's top functions of one more round instead.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import yaml  # noqa: E402
from workload import Fleet  # noqa: E402

from agent import bootstrap  # noqa: E402
from agent.config.loader import load_config  # noqa: E402
from agent.metrics import Metrics  # noqa: E402
from agent.records import Message, ScoringItem  # noqa: E402
from agent.runtime.ingest import IngestWorker  # noqa: E402
from agent.runtime.scoring import ScoringWorker  # noqa: E402

INGEST_BATCH = 50
"""Messages per ingest batch: what the ingest thread typically drains at the benchmark's sustained rate."""
KINDS = ("process", "vibration")


class DropBroker:
    """Publishes nowhere, acknowledges nothing (the broker's side is not what this measures)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        return None

    def ack(self, mid: int, qos: int) -> None:
        return None

    def ack_batch(self, acks: Sequence[tuple[int, int]]) -> None:
        return None

    def dead_letter(self, topic: str, code: str, detail: str, payload: bytes) -> bool:
        return True


def build(workdir: Path) -> tuple[IngestWorker, ScoringWorker, queue.Queue[ScoringItem], int]:
    """The agent's two workers on the shipped config (models resolved, spool in ``workdir``)."""
    data = yaml.safe_load((REPO / "config" / "agent.yaml").read_text())
    data["spool"]["path"] = str(workdir / "spool.db")
    for model in [*data["inference"]["models"], data["inference"]["defect"]]:
        model["path"] = str((REPO / "config" / model["path"]).resolve())
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_config(path)
    metrics = Metrics()
    stages = bootstrap.build_stages(config, metrics)
    spool = bootstrap.build_spool(config, metrics)
    spool.start()
    windows: queue.Queue[ScoringItem] = queue.Queue()
    broker = DropBroker()
    ingest = bootstrap.build_ingest(
        config, stages, metrics, messages=queue.Queue(), windows=windows, spool=spool, broker=broker, arrivals=spool
    )
    scoring = bootstrap.build_scoring(
        config, stages, metrics, spool=ingest, broker=broker, windows=windows, store_raw=ingest.store_raw
    )
    return ingest, scoring, windows, config.inference.max_batch


def run(
    messages: Sequence[Message],
    ingest: IngestWorker,
    scoring: ScoringWorker,
    windows: queue.Queue[ScoringItem],
    max_batch: int,
) -> tuple[float, float]:
    """CPU seconds of ingest and of scoring for ``messages``, batch by batch as the threads would go."""
    ingest_s = scoring_s = 0.0
    for start in range(0, len(messages), INGEST_BATCH):
        t0 = time.process_time()
        ingest.process(messages[start : start + INGEST_BATCH])
        t1 = time.process_time()
        items: list[ScoringItem] = []
        while not windows.empty():
            items.append(windows.get_nowait())
        for first in range(0, len(items), max_batch):
            scoring.process(items[first : first + max_batch])
        ingest_s += t1 - t0
        scoring_s += time.process_time() - t1
    ingest.process([])  # what scoring handed over in the last batch is spooled too
    return ingest_s, scoring_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="simulated seconds per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds counted (after one warm-up round)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of one round")
    args = parser.parse_args(argv)
    fleet = Fleet(machines=100, vibration_machines=10)
    per_kind: dict[str, dict[str, list[float]]] = {k: {"ingest": [], "scoring": []} for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="pdm-pipeline-micro-") as tmp:
        ingest, scoring, windows, max_batch = build(Path(tmp))
        received_ns = time.time_ns()
        mid = 0
        for round_index in range(args.rounds + 1 + args.profile):
            t0 = round_index * args.seconds
            events = fleet.events(t0, t0 + args.seconds)
            by_kind: dict[str, list[Message]] = {k: [] for k in KINDS}
            for event in events:
                mid += 1
                kind = "vibration" if event.block is not None else "process"
                by_kind[kind].append(Message(event.topic, event.payload, 1, mid, received_ns))
            if round_index == args.rounds + 1:  # --profile: one more round, of the whole mix in time order
                profile = cProfile.Profile()
                mixed = [m for k in KINDS for m in by_kind[k]]
                mixed.sort(key=lambda m: m.mid)
                profile.runcall(run, mixed, ingest, scoring, windows, max_batch)
                out = io.StringIO()
                stats = pstats.Stats(profile, stream=out)
                stats.sort_stats("cumulative").print_stats(40)
                stats.sort_stats("tottime").print_stats(30)
                print(out.getvalue())
                break
            for kind in KINDS:
                ingest_s, scoring_s = run(by_kind[kind], ingest, scoring, windows, max_batch)
                if round_index > 0:
                    per_kind[kind]["ingest"].append(ingest_s / len(by_kind[kind]))
                    per_kind[kind]["scoring"].append(scoring_s / len(by_kind[kind]))
    per_s = {"process": fleet.machines * fleet.process_hz, "vibration": fleet.vibration_machines / fleet.block_period_s}
    print(f"CPU per message, median of {args.rounds} rounds of {args.seconds:g} simulated s (one thread)")
    print(f"{'message':12} {'ingest us':>10} {'scoring us':>11} {'per sim. s of the mix (ms)':>28}")
    total_ms = 0.0
    for kind in KINDS:
        ingest_us = statistics.median(per_kind[kind]["ingest"]) * 1e6
        scoring_us = statistics.median(per_kind[kind]["scoring"]) * 1e6
        ms = (ingest_us + scoring_us) * per_s[kind] / 1e3
        total_ms += ms
        print(f"{kind:12} {ingest_us:>10.1f} {scoring_us:>11.1f} {ms:>28.2f}")
    per_message = total_ms * 1e3 / fleet.messages_per_s
    print(f"{'mix':12} {'':>10} {'':>11} {total_ms:>28.2f}  = {per_message:.1f} us per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
