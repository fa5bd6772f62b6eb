"""A probe, not part of the product: log every full garbage collection (and any collection over 10 ms) of
every Python process that starts with this folder on ``PYTHONPATH``, one file per process.

    PYTHONPATH=benchmarks/gc_probe GC_PROBE_DIR=/tmp/gc .venv/bin/python benchmarks/run.py --only alerts

Each line: wall time (s), generation, pause (ms), objects collected. Python imports ``sitecustomize`` at
start-up from the first folder on its path that has one, so the benchmark, the agent it starts and the
agent's writer process each write ``gc-<pid>.log`` to ``GC_PROBE_DIR`` (default: the current folder).
"""

import gc
import os
import time
from pathlib import Path
from typing import Any

_LOG = (Path(os.environ.get("GC_PROBE_DIR", ".")) / f"gc-{os.getpid()}.log").open("a", buffering=1)
_started = [0.0]


def _callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    took = time.perf_counter() - _started[0]
    if info["generation"] == 2 or took > 0.01:
        _LOG.write(f"{time.time():.3f} gen{info['generation']} {took * 1000:.1f} ms collected={info['collected']}\n")


gc.callbacks.append(_callback)
