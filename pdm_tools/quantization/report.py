"""The quantization record of a manifest (``Manifest.quantization``); its model-card section is rendered from
the record alone by ``pdm_tools.common.modelcard``.

Record layout (all sizes in bytes, latencies in microseconds per window)::

    tool, onnxruntime, cpu
    parent        file, sha256, size_bytes, parameters, macs_per_sample
    calibration   file, rows, sha256 (of the float32 rows)
    evaluation    file, rows, sha256, labels (rows per label)
    criteria      the gate's limits (pdm_tools.quantization.gate.Criteria)
    sensitivity   per mixed-precision candidate: single-layer task SQNR, the rule, the layers kept
    candidates    list: name, file, sha256, recipe, size_bytes, size_ratio, layers (bits, weight and
                  output SQNR in dB), metrics (held-out, against FP32), error
    latency       batch, threads, runs, and per candidate p50/p99 and p50 ratio to FP32
    gate          chosen, reason, and every candidate's verdict (the losers' reasons)
    shipped, shipped_file, ship_reason

Everything but ``latency`` and ``gate`` (and ``shipped``/``ship_reason`` that follow from them) is a
function of the model and the data: reruns give the same values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from agent.inference.manifest import sha256_file
from pdm_tools.quantization import candidates as cands
from pdm_tools.quantization import gate
from pdm_tools.quantization import static as q
from pdm_tools.quantization.data import Rows
from pdm_tools.quantization.layers import dense_layers, macs_per_sample, parameter_count


def build_record(
    *,
    fp32_path: Path,
    model: onnx.ModelProto,
    task: str,
    built: Sequence[cands.Candidate],
    paths: Mapping[str, Path],
    calibration: np.ndarray,
    evaluation: Rows | None,
    metrics: Mapping[str, Mapping[str, float]],
    out_sqnr: Mapping[str, Mapping[str, float | None]],
    latency: Mapping[str, Any],
    settings: Any,
    sensitivity: Mapping[str, Any],
    decision: gate.Decision,
    data_files: Mapping[str, str],
    relative_to: Path,
) -> dict[str, Any]:
    parent_size = fp32_path.stat().st_size
    layers = dense_layers(model)
    entries: list[dict[str, Any]] = [
        {
            "name": gate.PARENT,
            "file": _rel(fp32_path, relative_to),
            "sha256": sha256_file(fp32_path),
            "recipe": {"method": "none", "bits": 32},
            "size_bytes": parent_size,
            "size_ratio": 1.0,
            "layers": [
                {"layer": lay.name, "shape": [lay.k, lay.n], "bits": 32, "weight_sqnr_db": None, "output_sqnr_db": None}
                for lay in layers
            ],
            "metrics": dict(metrics.get(gate.PARENT, {})),
        }
    ]
    for c in built:
        entry: dict[str, Any] = {"name": c.name, "recipe": c.recipe.to_dict()}
        if c.path is None:
            entry["error"] = c.error
        else:
            size = c.path.stat().st_size
            sq = out_sqnr.get(c.name, {})
            entry |= {
                "file": _rel(c.path, relative_to),
                "sha256": sha256_file(c.path),
                "size_bytes": size,
                "size_ratio": round(size / parent_size, 4),
                "layers": [lr.to_dict() | {"output_sqnr_db": sq.get(lr.name)} for lr in c.layers],
                "metrics": dict(metrics.get(c.name, {})),
            }
        entries.append(entry)
    p50_parent = latency[gate.PARENT].p50_us
    labels = None
    if evaluation is not None and evaluation.y is not None:
        values, counts = np.unique(evaluation.y, return_counts=True)
        labels = {str(int(v)): int(n) for v, n in zip(values, counts, strict=True)}
    shipped_entry = next(e for e in entries if e["name"] == decision.chosen)
    return {
        "tool": "pdm-agent model quantize (pdm_tools.quantization)",
        "onnxruntime": ort.__version__,
        "task": task,
        "parent": {
            "file": _rel(fp32_path, relative_to),
            "sha256": sha256_file(fp32_path),
            "size_bytes": parent_size,
            "parameters": parameter_count(model),
            "macs_per_sample": macs_per_sample(model),
        },
        "calibration": {
            "file": data_files.get("calibration"),
            "rows": len(calibration),
            "sha256": cands.rows_sha256(calibration),
        },
        "evaluation": None
        if evaluation is None
        else {
            "file": data_files.get("evaluation"),
            "rows": len(evaluation.x),
            "sha256": cands.rows_sha256(evaluation.x),
            "labels": labels,
        },
        "criteria": settings.criteria.to_dict(),
        "sensitivity": dict(sensitivity),
        "candidates": entries,
        "latency": {
            "unit": "microseconds per window (time of one run / batch)",
            "batch": settings.batch,
            "threads": settings.threads,
            "runs": settings.runs * settings.repeats,
            "cpu": q.cpu_description(),
            "rounds": settings.repeats,
            "per_candidate": {
                name: {
                    "p50_us": lat.p50_us,
                    "p99_us": lat.p99_us,
                    "p50_ratio": round(lat.p50_us / p50_parent, 3),
                    "round_p50_us": list(lat.round_p50_us),
                }
                for name, lat in latency.items()
            },
        },
        "gate": decision.to_dict(),
        "shipped": decision.chosen,
        "shipped_file": shipped_entry["file"],
        "ship_reason": decision.reason,
    }


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return str(path)
