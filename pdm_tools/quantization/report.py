"""The quantization record of a manifest (``Manifest.quantization``) and its model-card section.

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
from pdm_tools.quantization.data import Rows
from pdm_tools.training import quantize as q


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
    layers = cands.dense_layers(model)
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
            "parameters": cands.parameter_count(model),
            "macs_per_sample": cands.macs_per_sample(model),
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


def render_card_section(qz: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the model card's "Quantization" section, from the record alone."""
    if "candidates" not in qz:
        return ["", "## Quantization", "", "(no quantization record)"]
    lat = qz["latency"]
    per = lat["per_candidate"]
    verdicts = qz["gate"]["verdicts"]
    parent, cal, ev = qz["parent"], qz["calibration"], qz.get("evaluation")
    lines = [
        "",
        "## Quantization",
        "",
        f"Shipped: **{qz['shipped']}** (`{qz['shipped_file']}`), because {qz['ship_reason']}.",
        "",
        f"- Parent: `{parent['file']}`, {parent['parameters']} parameters, {parent['macs_per_sample']} "
        f"multiply-adds per window, {parent['size_bytes']} bytes.",
        f"- Calibration: {cal['rows']} rows of `{cal.get('file') or 'given rows'}` (sha256 of the rows "
        f"`{cal['sha256'][:16]}…`).",
    ]
    if ev:
        lines.append(
            f"- Held-out evaluation: {ev['rows']} rows of `{ev.get('file') or 'given rows'}`, labels {ev['labels']} "
            f"(sha256 `{ev['sha256'][:16]}…`)."
        )
    lines += [
        f"- Latency: {lat['unit']}, batch {lat['batch']}, {lat['threads']} thread(s), {lat['runs']} runs each, on "
        f"{lat['cpu']}, in {lat.get('rounds', 1)} interleaved rounds (measured when this was built; a record of "
        "that machine, not a guarantee).",
        f"- Gate: {_criteria(qz['criteria'], qz.get('task', ''))}.",
        "",
        "| candidate | bits per layer | size (× FP32) | p50 / p99 us per window (× FP32) | "
        + ("Δaccuracy / ΔF1 points, agreement" if qz.get("task") == "classifier" else "ΔAUC, Δdetection points")
        + " | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in qz["candidates"]:
        name = c["name"]
        v = verdicts.get(name, {})
        verdict = ("**shipped**: " if name == qz["shipped"] else "") + "; ".join(v.get("reasons", []))
        if "error" in c:
            lines.append(f"| {name} | — | — | — | — | {verdict} |")
            continue
        bits = "/".join(str(layer["bits"]) for layer in c["layers"])
        p = per.get(name, {})
        lat_text = f"{p.get('p50_us', 0):.3g} / {p.get('p99_us', 0):.3g} ({p.get('p50_ratio', 0):.2f}×)"
        m = c.get("metrics", {})
        if not m:
            acc = "not measured"
        elif qz.get("task") == "classifier":
            acc = f"{m['accuracy_delta_points']:+.2f} / {m['macro_f1_delta_points']:+.2f}, {m['agreement']:.2%}"
        else:
            acc = f"{m['auc_delta']:+.4f}, {m['detection_delta_points']:+.2f}"
        lines.append(
            f"| {name} | {bits} | {c['size_bytes']} B ({c['size_ratio']:.2f}×) | {lat_text} | {acc} | {verdict} |"
        )
    lines += [
        "",
        "Per-layer error (SQNR in dB: weights / layer output against FP32 on the held-out rows, healthy rows "
        "only for an anomaly model; GPTQ trades weight SQNR for output SQNR):",
        "",
    ]
    layer_names = [layer["layer"] for layer in qz["candidates"][0]["layers"]]
    lines += ["| candidate | " + " | ".join(layer_names) + " |", "|---|" + "---|" * len(layer_names)]
    for c in qz["candidates"][1:]:
        if "error" in c:
            continue
        cells = []
        for layer in c["layers"]:
            w, o = layer.get("weight_sqnr_db"), layer.get("output_sqnr_db")
            cells.append(f"{layer['bits']}b: {_db(w)} / {_db(o)}")
        lines.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    for name, s in qz.get("sensitivity", {}).items():
        single = ", ".join(f"{k} {v:.1f}" for k, v in s["single_layer_sqnr_db"].items())
        lines += [
            "",
            f"Mixed precision `{name}`: single-layer sensitivity ({s['sensitivity_tensor']} SQNR in dB when only "
            f"that layer is quantized): {single}; rule: {s['rule']}; kept: {', '.join(s['sensitive_layers'])}.",
        ]
    return lines


def _criteria(c: Mapping[str, float], task: str) -> str:
    if task == "classifier":
        acc = (
            f"Δaccuracy and ΔF1 ≥ −{c['max_accuracy_drop_points_8bit']:g} points (8-bit) / "
            f"−{c['max_accuracy_drop_points_4bit']:g} (4-bit), agreement ≥ {c['min_agreement_8bit']:.0%} / "
            f"{c['min_agreement_4bit']:.0%}"
        )
    else:
        acc = (
            f"ΔAUC ≥ −{c['max_auc_drop']:g}, detection at the operating false-alarm rate ≥ "
            f"−{c['max_detection_drop_points']:g} points"
        )
    return (
        f"{acc}; p50 per window ≤ FP32's, overall and in every timing round; the cheapest passing candidate "
        "(p50, then size) ships"
    )


def _db(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return str(path)
