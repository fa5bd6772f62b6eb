"""Cost of the defect classifier's features per window, the feature sets side by side in one run:
``extract_bearing_matrix`` on CWRU-like windows (4096 samples at 12 kHz, shaft speeds 1700-1800 rpm, one per
window), batches of 1 and 64, the sets interleaved call by call so that a busy box's drift falls on all.

    .venv/bin/python benchmarks/bearing_features.py [--seconds 20] [--batches 1,64]

Prints the median milliseconds per window of each set and its ratio to version 1 (``v1``), one BLAS thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from agent.features.bearing import extract_bearing_matrix  # noqa: E402
from agent.records import Source, Window  # noqa: E402
from pdm_tools.evaluation.cwru import FEATURE_SETS  # noqa: E402

RATE_HZ = 12000.0


def windows(m: int, n: int, seed: int = 0) -> list[Window]:
    rng = np.random.default_rng(seed)
    source = Source((("machine", "m1"), ("sensor", "vibration")))
    return [
        Window(source, "vibration", 0, 1, ("value",), rng.standard_normal((1, n)), np.arange(n) / RATE_HZ, RATE_HZ)
        for _ in range(m)
    ]


def measure(batch: int, seconds: float) -> dict[str, float]:
    """Median ms per window of every feature set at one batch size."""
    batch_windows = windows(batch, 4096)
    rpm = np.random.default_rng(1).uniform(1700, 1800, batch)
    times: dict[str, list[float]] = {name: [] for name in FEATURE_SETS}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times["v1"]) < 5:
        for name, spec in FEATURE_SETS.items():
            t0 = time.perf_counter()
            extract_bearing_matrix(spec, batch_windows, rpm)
            times[name].append((time.perf_counter() - t0) * 1e3 / batch)
    return {name: float(np.median(t[1:])) for name, t in times.items()}  # the first call warms caches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per batch size (default 20)")
    parser.add_argument("--batches", default="1,64", help="batch sizes (default 1,64)")
    args = parser.parse_args(argv)
    with open("/proc/loadavg") as f:
        print(f"load average {f.read().split()[0]} at the start")
    with threadpool_limits(limits=1, user_api="blas"):
        for batch in (int(b) for b in args.batches.split(",")):
            ms = measure(batch, args.seconds)
            cells = ", ".join(f"{name} {v:.2f} ms ({v / ms['v1']:.2f}x v1)" for name, v in ms.items())
            print(f"batch {batch}: per window {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
