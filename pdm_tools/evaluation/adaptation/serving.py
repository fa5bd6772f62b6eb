"""What serving an adapted machine costs: latency of each way to run it and memory per machine."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from agent.adaptation.graph import adapter_parameters, build_adaptable
from agent.adaptation.lora import BaseMlp, LoraWeights
from agent.adaptation.runtime import merged_session, open_model


def measure_serving(
    base_path: Path, weights: LoraWeights, rows: np.ndarray, runs: int = 300, repeats: int = 7
) -> dict[str, Any]:
    """p50 µs per ``session.run`` at batch 1 and 32 of every way to serve an adapted machine, and its memory.

    Variants: the original base; the shared adaptable base with no adapter active and with ``weights``
    active through ``RunOptions.add_active_adapter``; the same with overridable input standardization
    (an adapter carrying the machine's mean/scale); the merged per-machine model. Raw ``session.run`` calls
    in interleaved rounds, so background load hits every variant alike.
    """
    proto = onnx.load(str(base_path))
    base = BaseMlp.from_onnx(proto)
    with_std = replace(weights, standardization=(base.mean.copy(), base.scale.copy()))
    keep: list[Any] = []

    def active(adapter_weights: LoraWeights, tmp: Path) -> ort.RunOptions:
        params = adapter_parameters(adapter_weights)
        values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()}
        fmt = ort.AdapterFormat()
        fmt.set_parameters(values)
        fmt.export_adapter(str(tmp))
        adapter = ort.LoraAdapter()
        adapter.Load(str(tmp))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        keep.append((params, values, adapter, options))
        return options

    with tempfile.TemporaryDirectory(prefix="pdm-serving-") as tmp_name:
        tmp = Path(tmp_name)
        original = open_model(proto)
        shared = open_model(build_adaptable(proto, weights.layers, standardization=False))
        shared_std = open_model(build_adaptable(proto, weights.layers, standardization=True))
        merged = merged_session(proto, weights)
        plain_options = active(weights, tmp / "plain.onnx_adapter")
        std_options = active(with_std, tmp / "std.onnx_adapter")
        out = [o.name for o in original.get_outputs()]
        variants: dict[str, tuple[ort.InferenceSession, ort.RunOptions | None]] = {
            "base": (original, None),
            "shared_no_adapter": (shared, None),
            "shared_with_adapter": (shared, plain_options),
            "shared_std_with_adapter": (shared_std, std_options),
            "merged": (merged, None),
        }
        feeds = {
            b: {"features": np.ascontiguousarray(np.resize(rows, (b, rows.shape[1])), dtype=np.float32)}
            for b in (1, 32)
        }
        samples: dict[tuple[str, int], list[float]] = {(v, b): [] for v in variants for b in feeds}
        for session, options in variants.values():
            for f in feeds.values():
                for _ in range(20):
                    session.run(out, f, options)
        for _ in range(repeats):
            for b, f in feeds.items():
                for name, (session, options) in variants.items():
                    times = samples[(name, b)]
                    for _ in range(runs):
                        t0 = time.perf_counter_ns()
                        session.run(out, f, options)
                        times.append((time.perf_counter_ns() - t0) / 1e3)
        memory = _memory_per_machine(proto, weights, tmp)
    p50 = {name: {f"batch{b}_us": round(float(np.median(samples[(name, b)])), 2) for b in feeds} for name in variants}

    def overhead(name: str) -> dict[str, float]:
        return {
            f"batch{b}_us_per_window": round((p50[name][f"batch{b}_us"] - p50["base"][f"batch{b}_us"]) / b, 2)
            for b in feeds
        }

    return {
        "unit": "microseconds per session.run, p50, 1 thread",
        "runs": runs * repeats,
        "adapted_layers": list(weights.layers),
        "rank": weights.rank,
        "p50": p50,
        "overhead": {name: overhead(name) for name in variants if name != "base"},
        "memory_and_load": memory,
    }


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_per_machine(proto: onnx.ModelProto, weights: LoraWeights, tmp: Path) -> dict[str, float]:
    """RSS growth and set-up time per machine: 20 loaded adapters vs 20 merged sessions (Linux RSS)."""
    n = 20
    path = tmp / "memory.onnx_adapter"
    params = adapter_parameters(weights)
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()}
    fmt = ort.AdapterFormat()
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))
    x = np.zeros((1, BaseMlp.from_onnx(proto).n_features), np.float32)
    has_rss = Path("/proc/self/statm").exists()
    before = _rss() if has_rss else 0
    t0 = time.perf_counter()
    keep: list[Any] = []
    for _ in range(n):
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        keep.append((adapter, options))
    t1 = time.perf_counter()
    after_adapters = _rss() if has_rss else 0
    for _ in range(n):
        session = merged_session(proto, weights)
        session.run(None, {"features": x})
        keep.append(session)
    t2 = time.perf_counter()
    after_merged = _rss() if has_rss else 0
    return {
        "shared_adapter_bytes": max(0, (after_adapters - before) // n),
        "merged_session_bytes": max(0, (after_merged - after_adapters) // n),
        "shared_adapter_load_ms": round(1e3 * (t1 - t0) / n, 3),
        "merged_build_and_first_run_ms": round(1e3 * (t2 - t1) / n, 3),
    }
