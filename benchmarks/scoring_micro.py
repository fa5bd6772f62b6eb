"""Micro-benchmarks of the scoring path's per-batch work (single thread, no services).

``python benchmarks/scoring_micro.py`` prints the median time of:

- ``extract_matrix`` on 128 vibration windows (4096 samples, the shipped bands) and on 256 process windows
  (50 readings, 3 channels), beside the feature computation alone (``Modality.features``): the ratio is what
  the checks around it cost;
- ``Windower.add`` per 1024-sample vibration block;
- ``Metrics.inc`` without and with labels (it is called per message and per batch).

Run it at two commits to compare them; the numbers of one machine are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from agent.features.extract import extract_matrix  # noqa: E402
from agent.features.registry import modality  # noqa: E402
from agent.features.spec import FeatureSpec  # noqa: E402
from agent.features.windows import Windower  # noqa: E402
from agent.metrics import Metrics  # noqa: E402
from agent.records import NS_PER_S, Reading, SampleBlock, Source, Window  # noqa: E402

T0 = 1_790_000_000 * NS_PER_S
RATE = 10240.0
VIBRATION = FeatureSpec(
    kind="vibration",
    window_samples=4096,
    hop_samples=2048,
    channels=("value",),
    band_edges_hz=(0.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 3000.0, 4000.0, 5120.0),
)
PROCESS = FeatureSpec(kind="process", window_samples=50, hop_samples=5, channels=("a", "b", "c"))
SOURCE = Source.of(site="s1", line="l1", machine="m01", sensor="x")


def median_s(fn: Callable[[], object], rounds: int = 15, number: int = 5) -> float:
    """Median over ``rounds`` of the mean time of ``number`` calls."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def vibration_blocks(n: int) -> list[SampleBlock]:
    rng = np.random.default_rng(0)
    return [
        SampleBlock(SOURCE, T0 + round(i * 1024 * NS_PER_S / RATE), RATE, rng.standard_normal(1024).astype(np.float32))
        for i in range(n)
    ]


def windows(spec: FeatureSpec, items: list[SampleBlock] | list[Reading], count: int) -> list[Window]:
    windower = Windower(lambda source: spec, Metrics())
    out = [w for item in items for w in windower.add(item)]
    return out[:count]


def main() -> int:
    vib = windows(VIBRATION, vibration_blocks(300), 128)
    readings = [Reading(SOURCE, T0 + i * NS_PER_S, {"a": float(i % 7), "b": 2.0, "c": 0.1 * i}) for i in range(2000)]
    proc = windows(PROCESS, readings, 256)
    print(f"{'what':52} {'median':>12} {'features alone':>15} {'ratio':>6}")
    for name, spec, batch in (
        ("extract_matrix, 128 vibration windows", VIBRATION, vib),
        ("extract_matrix, 256 process windows", PROCESS, proc),
    ):
        whole = median_s(lambda spec=spec, batch=batch: extract_matrix(spec, batch))
        alone = median_s(lambda spec=spec, batch=batch: modality(spec.kind).features(spec, batch))
        print(f"{name:52} {whole * 1e3:>9.2f} ms {alone * 1e3:>12.2f} ms {whole / alone:>6.2f}")
    blocks = vibration_blocks(2000)

    def window_all() -> None:
        windower = Windower(lambda source: VIBRATION, Metrics())
        for block in blocks:
            windower.add(block)

    print(f"{'Windower.add per 1024-sample block':52} {median_s(window_all, 5, 1) / len(blocks) * 1e6:>9.2f} us")
    metrics = Metrics()
    plain = median_s(lambda: metrics.inc("ingest.messages"), 15, 20_000)
    labelled = median_s(lambda: metrics.inc("windows.emitted", kind="vibration"), 15, 20_000)
    print(f"{'Metrics.inc without labels':52} {plain * 1e6:>9.2f} us")
    print(f"{'Metrics.inc with a label':52} {labelled * 1e6:>9.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
