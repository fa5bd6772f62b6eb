"""Probe (not part of the product): log every full (generation 2) collection and any collection over 10 ms."""
import gc
import os
import time

_log = open(f"/tmp/gcprobe/gc-{os.getpid()}.log", "a", buffering=1)
_start = [0.0]


def _callback(phase, info):
    if phase == "start":
        _start[0] = time.perf_counter()
        return
    took = time.perf_counter() - _start[0]
    if info["generation"] == 2 or took > 0.01:
        _log.write(f"{time.time():.3f} gen{info['generation']} {took * 1000:.1f} ms collected={info['collected']}\n")


gc.callbacks.append(_callback)
