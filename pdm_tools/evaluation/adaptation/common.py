"""What the CWRU and SKAB adaptation measurements share: the seed, the missing-data error, LoRA training
measured for time and memory, and writing an adapter directory."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent.adaptation.adapter import AdapterManifest, BaseIdentity, data_sha256, write_adapter
from agent.adaptation.lora import BaseMlp, LoraConfig, LoraWeights, train_lora

SEED = 42


class DataMissing(Exception):
    """The datasets folder (or one dataset) is not there."""


def train_measured(
    base: BaseMlp, x: np.ndarray, y: np.ndarray | None, config: LoraConfig, x_val: np.ndarray | None = None
) -> tuple[LoraWeights, Any]:
    """Train twice: timed without tracing, then traced for the peak memory; both runs must agree bit for bit."""
    weights, fit = train_lora(base, x, y, seed=SEED, config=config, x_val=x_val)
    traced, traced_fit = train_lora(base, x, y, seed=SEED, config=config, x_val=x_val, measure_memory=True)
    for name, (a, b) in weights.factors.items():
        if not (np.array_equal(a, traced.factors[name][0]) and np.array_equal(b, traced.factors[name][1])):
            raise RuntimeError("LoRA training is not deterministic: two runs with the same seed differ")
    return weights, replace(fit, peak_memory_bytes=traced_fit.peak_memory_bytes)


def save_adapter(
    directory: Path,
    identity: BaseIdentity,
    machine: str,
    weights: LoraWeights,
    fit: Any,
    x: np.ndarray,
    y: np.ndarray | None,
    before: dict[str, Any],
    after: dict[str, Any],
) -> Path:
    manifest = AdapterManifest(
        schema_version=1,
        kind="lora-adapter",
        base=identity.to_dict(),
        machine=machine,
        rank=weights.rank,
        alpha=weights.alpha,
        layers={},
        standardization=weights.standardization is not None,
        file="",
        sha256="0" * 64,
        threshold=None,
        data={"count": len(x), "sha256": data_sha256(x, y), "description": "evaluation rows"},
        metrics={"before": _brief(before), "after": _brief(after)},
        training=fit.to_dict(),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    a_shapes = {name: [int(a.shape[0]), int(b.shape[1])] for name, (a, b) in weights.factors.items()}
    return write_adapter(directory, weights, replace(manifest, layers=a_shapes))


def _brief(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if k in ("accuracy", "macro_f1", "f1", "far", "mar")}
