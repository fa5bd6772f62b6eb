"""SKAB per-file commissioning: a fleet autoencoder, adapted to each file on its own commissioning rows, against
the fleet model alone and a model trained from scratch on the same rows (see ``pdm_tools.evaluation.adaptation``)."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from agent.adaptation.adapter import BaseIdentity, sha256_path
from agent.adaptation.lora import BaseMlp, LoraConfig, LoraWeights, machine_standardization
from agent.adaptation.runtime import MachineAdapters
from pdm_tools.common.threshold import threshold_from_scores
from pdm_tools.evaluation.adaptation.common import SEED, DataMissing, save_adapter, train_measured
from pdm_tools.evaluation.skab import TRAIN_ROWS, Confusion, DatasetError, load_skab
from pdm_tools.evaluation.skab_alternatives import lag_stack, moving_average
from pdm_tools.models.autoencoder import AutoencoderConfig, fit_autoencoder
from pdm_tools.models.export import build_onnx

# Rank 1 on the first and the last layer of the 80-32-8-32-80 autoencoder (all four layers would be 10.7 % of
# the base's size with the standardization); "+std" also carries the file's own input mean and scale.
SKAB_LORA = LoraConfig(rank=1, alpha=2.0, layers=("layer0_matmul", "layer3_matmul"))
SKAB_LORA_STD = replace(SKAB_LORA, refit_standardization=True)
SKAB_LAG = 10
SKAB_SMOOTH = 10
SKAB_FACTORS = (1.5, 2.0, 3.0)
SKAB_HEADLINE_FACTOR = 2.0


def evaluate_skab(
    data_dir: Path, *, config: LoraConfig = SKAB_LORA, config_std: LoraConfig = SKAB_LORA_STD
) -> dict[str, Any]:
    """Per-file commissioning of a fleet autoencoder (module docstring); JSON-ready result."""
    try:
        files, _ = load_skab(data_dir)
    except DatasetError as exc:
        raise DataMissing(str(exc)) from exc
    free_path = Path(data_dir) / "anomaly-free" / "anomaly-free.csv"
    if not free_path.is_file():
        raise DataMissing(f"{free_path} not found: the fleet model is trained on SKAB's anomaly-free run")
    free = pd.read_csv(free_path, sep=";")[list(files[0].channels)].to_numpy(dtype=np.float64)
    w, k = SKAB_LAG, SKAB_SMOOTH
    folds = [files[0::2], files[1::2]]
    variants = ("base_fleet_threshold", "base", "standardization_only", "adapted", "adapted_std", "scratch")
    configs = {"adapted": config, "adapted_std": config_std}
    totals = {v: {f: Confusion() for f in SKAB_FACTORS} for v in variants}
    per_file: list[dict[str, Any]] = []
    fits: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    sizes: dict[str, Any] = {}
    ae_config = AutoencoderConfig(max_epochs=200)
    with tempfile.TemporaryDirectory(prefix="pdm-adapt-skab-") as tmp_name, threadpool_limits(1, user_api="blas"):
        tmp = Path(tmp_name)
        for i, fold in enumerate(folds):
            others = folds[1 - i]
            fleet_free = lag_stack(free, w)[w - 1 :]
            split = int(0.8 * len(fleet_free))
            fleet_rows = np.concatenate(
                [fleet_free[:split], *[lag_stack(f.values, w)[w - 1 : TRAIN_ROWS] for f in others]]
            )
            fleet, _ = fit_autoencoder(fleet_rows, fleet_free[split:], seed=SEED, config=ae_config)
            fleet_threshold = threshold_from_scores(moving_average(fleet.score(fleet_free[split:])[:, None], k)[:, 0])
            path = tmp / f"fleet{i}.onnx"
            path.write_bytes(build_onnx(fleet, {"model_id": "skab-fleet", "version": str(i)}).SerializeToString())
            base = BaseMlp.from_onnx(path)
            sizes["base_fp32_bytes"] = path.stat().st_size
            identity = BaseIdentity("skab-fleet", str(i), sha256_path(path))
            for f in fold:
                x = lag_stack(f.values, w)
                train = x[w - 1 : TRAIN_ROWS]
                cut = int(0.8 * len(train))
                trained = {
                    name: train_measured(base, train[:cut], None, cfg, x_val=train[cut:])
                    for name, cfg in configs.items()
                }
                scratch, _ = fit_autoencoder(train[:cut], train[cut:], seed=SEED, config=ae_config)
                std_only = LoraWeights(1, 1.0, {}, machine_standardization(train[:cut]))
                raw = {
                    "base": base.score(x),
                    "standardization_only": base.score(x, std_only),
                    **{name: base.score(x, weights) for name, (weights, _) in trained.items()},
                    "scratch": scratch.score(x),
                }
                smooth = {name: moving_average(s[:, None], k)[:, 0] for name, s in raw.items()}
                start = w + k - 2
                labels = f.labels[TRAIN_ROWS:]
                row: dict[str, Any] = {"file": f.name}
                for name, s in smooth.items():
                    top = float(np.max(s[start:TRAIN_ROWS]))
                    for factor in SKAB_FACTORS:
                        c = Confusion.of(s[TRAIN_ROWS:] > factor * top, labels)
                        totals[name][factor] = totals[name][factor] + c
                        if factor == SKAB_HEADLINE_FACTOR:
                            row[name] = {"f1": round(c.f1, 3), "far": round(c.far, 1), "mar": round(c.mar, 1)}
                fleet_flags = smooth["base"][TRAIN_ROWS:] > fleet_threshold
                for factor in SKAB_FACTORS:
                    totals["base_fleet_threshold"][factor] += Confusion.of(fleet_flags, labels)
                per_file.append(row)
                for name, (weights, fit) in trained.items():
                    fits[name].append(fit.to_dict())
                    if f is not fold[0]:
                        continue
                    adir = save_adapter(tmp / f"{name}{i}", identity, f.name, weights, fit, train, None, {}, {})
                    served = MachineAdapters(path, identity, mode="shared", standardization=True)
                    served.add_adapter(f.name, adir)
                    onnx_scores = served.run(f.name, x.astype(np.float32), ["score"])[0]
                    sizes[name] = {
                        "adapter_bytes": (adir / "adapter.onnx_adapter").stat().st_size,
                        "adapter_parameters": weights.n_parameters,
                        "max_abs_diff_onnx_vs_numpy": float(np.max(np.abs(onnx_scores - raw[name]))),
                    }
    return {
        "protocol": (
            f"SKAB per file: first {TRAIN_ROWS} rows commissioning, rest test, point-wise, pooled; lag window {w}, "
            f"score MA {k}; threshold = factor x max commissioning score (fleet threshold: the fleet model's own)"
        ),
        "lora": {name: cfg.to_dict() for name, cfg in configs.items()},
        "files": len(files),
        "pooled": {name: {str(f): totals[name][f].to_dict() for f in SKAB_FACTORS} for name in variants},
        "headline_factor": SKAB_HEADLINE_FACTOR,
        "per_file": per_file,
        "training": {
            name: {
                "seconds_median": round(float(np.median([f["seconds"] for f in runs])), 3),
                "seconds_max": round(float(np.max([f["seconds"] for f in runs])), 3),
                "peak_memory_bytes_max": int(np.max([f["peak_memory_bytes"] for f in runs])),
                "epochs_median": float(np.median([f["epochs_run"] for f in runs])),
                "rows": runs[0]["train_rows"] + runs[0]["val_rows"],
            }
            for name, runs in fits.items()
        },
        "sizes": sizes,
    }
