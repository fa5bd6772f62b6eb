"""One call for the device: adapt the shipped base of ``model_dir`` to one machine and save the adapter.

The live agent (a later step) collects a machine's rows — commissioning windows of normal operation for an
anomaly model, technician-confirmed labelled windows for the classifier — and calls ``adapt_machine``. It
trains in this thread (seconds; run it off the inference worker), writes ``adapter.onnx_adapter`` and
``adapter.json`` into ``out_dir``, and returns the manifest; ``MachineAdapters.add_adapter`` then serves it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent.adaptation.adapter import (
    KIND,
    SCHEMA_VERSION,
    AdapterManifest,
    BaseIdentity,
    data_sha256,
    read_manifest,
    write_adapter,
)
from agent.adaptation.lora import BaseMlp, LoraConfig, LoraFitReport, LoraWeights, train_lora

# Anomaly threshold of an adapted machine: this factor times the largest score on its held-out commissioning
# rows (label-free, the rule of the commissioning baseline; too few rows for the fleet's tail fit).
THRESHOLD_FACTOR = 1.5


def adapt_machine(
    model_dir: Path,
    machine: str,
    x: np.ndarray,
    out_dir: Path,
    y: np.ndarray | None = None,
    *,
    config: LoraConfig | None = None,
    seed: int = 0,
    description: str = "",
) -> AdapterManifest:
    """Train a LoRA adapter of the model in ``model_dir`` on ``machine``'s rows and write it to ``out_dir``.

    ``x``: float32 ``(n, F)`` feature rows in time order; ``y``: class indices for a classifier, else
    ``None``. An autoencoder holds out the last ``config.val_fraction`` of the rows (later in time), a
    classifier a stratified random slice. Metrics before/after are on that held-out slice.
    """
    config = config or LoraConfig()
    identity = BaseIdentity.from_model_dir(model_dir)
    file = json.loads((Path(model_dir) / "manifest.json").read_text(encoding="utf-8"))["file"]
    base = BaseMlp.from_onnx(Path(model_dir) / file)
    x = np.asarray(x, dtype=np.float32)
    x_val = None
    x_fit = x
    if base.kind == "autoencoder":
        cut = max(1, round((1 - config.val_fraction) * len(x)))
        x_fit, x_val = x[:cut], x[cut:]
    weights, report = train_lora(base, x_fit, y, seed=seed, config=config, x_val=x_val, measure_memory=True)
    held_out = x_val if x_val is not None else x
    metrics, threshold = _metrics(base, weights, report, held_out)
    manifest = new_manifest(identity, machine, weights, report, x, y, metrics, config, seed, description, threshold)
    write_adapter(out_dir, weights, manifest)
    return read_manifest(out_dir)  # as written: with the file name and its sha256


def new_manifest(
    identity: BaseIdentity,
    machine: str,
    weights: LoraWeights,
    report: LoraFitReport,
    x: np.ndarray,
    y: np.ndarray | None,
    metrics: dict[str, Any],
    config: LoraConfig,
    seed: int,
    description: str = "",
    threshold: float | None = None,
) -> AdapterManifest:
    """The manifest of a freshly trained adapter (``write_adapter`` fills in the file name and sha256)."""
    return AdapterManifest(
        schema_version=SCHEMA_VERSION,
        kind=KIND,
        base=identity.to_dict(),
        machine=machine,
        rank=weights.rank,
        alpha=weights.alpha,
        layers={name: [int(a.shape[0]), int(b.shape[1])] for name, (a, b) in weights.factors.items()},
        standardization=weights.standardization is not None,
        file="",
        sha256="0" * 64,
        threshold=threshold,
        data={
            "count": len(x),
            "sha256": data_sha256(x, y),
            "labelled": y is not None,
            "per_class": None if y is None else np.bincount(np.asarray(y, dtype=np.int64)).tolist(),
            "description": description,
        },
        metrics=metrics,
        training={"seed": seed, "config": config.to_dict(), **report.to_dict()},
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _metrics(
    base: BaseMlp, weights: LoraWeights, report: LoraFitReport, held_out: np.ndarray
) -> tuple[dict[str, Any], float | None]:
    before: dict[str, Any] = {"held_out_loss": round(report.val_loss_before, 6)}
    after: dict[str, Any] = {"held_out_loss": round(report.val_loss_after, 6)}
    threshold = None
    if base.kind == "autoencoder":
        s0, s1 = base.score(held_out), base.score(held_out, weights)
        before["held_out_score_max"] = round(float(s0.max()), 6)
        after["held_out_score_max"] = round(float(s1.max()), 6)
        threshold = round(THRESHOLD_FACTOR * float(s1.max()), 6)
    return {"rows": len(held_out), "before": before, "after": after}, threshold
