"""What an image model costs and how well it does: accuracy against labels, FP32 vs INT8, latency, throughput.

Shared by training (the quantization gate and the manifest), ``pdm-agent evaluate neu`` and the agent's
benchmark (``bare_throughput``: the ONNX Runtime rate an agent could reach at best, beside its live rate).
All timings use one intra-op thread, like the agent's scoring worker; they describe this machine only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.images.preprocess import prepare
from agent.inference.image import INPUT, OUTPUT, TASK
from agent.inference.manifest import Manifest
from agent.inference.session import open_session

BATCHES = (1, 16)


def run_probs(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities float32 ``(N, C)`` of prepared images ``(N, 1, S, S)``, in batches."""
    out = [sess.run([OUTPUT], {INPUT: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def agreement(fp32: np.ndarray, int8: np.ndarray) -> float:
    """Share of images on which INT8 predicts FP32's class."""
    return round(float(np.mean(fp32.argmax(axis=1) == int8.argmax(axis=1))), 6)


def latency(
    paths: Mapping[str, Path], x: np.ndarray, batches: Sequence[int] = BATCHES, runs: int = 100, rounds: int = 5
) -> dict[str, dict[str, Any]]:
    """p50 milliseconds per image (time of one run / batch) per model and batch size, one thread.

    The models take turns run by run (FP32, INT8, FP32, ...) in each of ``rounds`` rounds, so that a noisy
    neighbour on a shared box hits them alike: turns of a whole round per model let a burst of load land on
    one model only (a 0.52x INT8 graph measured 0.68x in one round that way). Each record also has the p50
    of every round (``round_p50_ms``: what the quantization gate checks).
    """
    sessions = {name: open_session(Path(p), 1) for name, p in paths.items()}
    feeds = {b: {INPUT: np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))} for b in batches}
    for sess in sessions.values():  # first runs allocate and pre-pack the weights
        for b in batches:
            for _ in range(5):
                sess.run([OUTPUT], feeds[b])
    samples: dict[tuple[str, int], list[list[float]]] = {(n, b): [] for n in sessions for b in batches}
    for _ in range(rounds):
        for b in batches:
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(runs):
                for name, sess in sessions.items():
                    t0 = time.perf_counter_ns()
                    sess.run([OUTPUT], feeds[b])
                    times[name].append((time.perf_counter_ns() - t0) / 1e6 / b)
            for name in sessions:
                samples[(name, b)].append(times[name])
    out: dict[str, dict[str, Any]] = {}
    for name in sessions:
        out[name] = {}
        for b in batches:
            per_round = samples[(name, b)]
            out[name][f"batch{b}"] = {
                "p50_ms": round(float(np.median(np.concatenate(per_round))), 4),
                "round_p50_ms": [round(float(np.median(r)), 4) for r in per_round],
            }
    return out


def bare_throughput(model_dir: Path, grays: Sequence[np.ndarray], batch: int = 16) -> dict[str, Any]:
    """Images per second through bare ONNX Runtime (one thread), preprocessing included, over ``grays``.

    ``model_dir``: an image model folder (its manifest is verified; the file it names is run). ``grays``:
    uint8 frames as a camera sends them (e.g. 200 x 200); each is prepared with the agent's ``prepare``
    and scored in batches of ``batch``. This is the ceiling the live agent's rate (decode, store, queue,
    write) is compared with in the benchmark.
    """
    if len(grays) == 0:
        raise ValueError("bare_throughput needs at least one frame")
    manifest = Manifest.load(model_dir, TASK)
    size = int(manifest.feature_spec["size"])
    sess = open_session(Path(model_dir) / manifest.file, 1)
    sess.run([OUTPUT], {INPUT: np.zeros((batch, 1, size, size), dtype=np.float32)})  # allocate before timing
    t0 = time.perf_counter()
    prep = 0.0
    for lo in range(0, len(grays), batch):
        p0 = time.perf_counter()
        x = np.stack([prepare(g, size) for g in grays[lo : lo + batch]])
        prep += time.perf_counter() - p0
        sess.run([OUTPUT], {INPUT: x})
    total = time.perf_counter() - t0
    return {
        "model": f"{manifest.model_id} {manifest.version} ({manifest.file})",
        "images": len(grays),
        "batch": batch,
        "threads": 1,
        "images_per_s": round(len(grays) / total, 1),
        "preprocess_share": round(prep / total, 3),
        "frame_shape": list(grays[0].shape),
    }
