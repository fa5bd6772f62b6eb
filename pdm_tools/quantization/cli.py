"""``pdm-agent model quantize MODEL_DIR --calibration DATA [--eval DATA]``: candidates, gate, record.

Reads the model directory's ``manifest.json`` to find the FP32 parent (``quantization.parent.file``, or
``model.fp32.onnx``) and the number of features; DATA files are ``.npz`` as documented in
``pdm_tools.quantization.data``. Writes every candidate into ``--out`` (default ``MODEL_DIR/candidates``) with
``quantization.json`` (the record), and prints a table. With ``--ship`` the gate's choice is copied into
the model directory (``model.<candidate>.onnx``) and the manifest and model card are rewritten to name it
and carry the record (an anomaly model shipped quantized gets its threshold recomputed by the shipped
rule on the held-out healthy rows, since the threshold belongs to the shipped model's scores).

Exit status: 0 done (whichever candidate the gate chose, FP32 included); 2 a usage error (bad options, a
MODEL_DIR or DATA file that cannot be read as one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from agent.inference.classifier import TASK as CLASSIFIER
from agent.inference.manifest import MANIFEST_FILE, Manifest, ModelError, sha256_file
from pdm_tools.common.modelcard import write_model_card
from pdm_tools.common.threshold import threshold_from_scores
from pdm_tools.quantization.data import DataError, Rows, load_rows
from pdm_tools.quantization.gate import PARENT
from pdm_tools.quantization.workflow import Outcome, Settings, quantize_model, run_task_output

RECORD_FILE = "quantization.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="model directory with manifest.json")
    parser.add_argument(
        "--calibration", type=Path, required=True, help=".npz with 'x': float32 calibration rows (n, F)"
    )
    parser.add_argument(
        "--eval",
        type=Path,
        default=None,
        help=".npz with 'x' and 'y' held-out rows (y: class ids, or 0 normal / 1 anomalous); without it "
        "nothing but FP32 can pass the gate",
    )
    parser.add_argument("--out", type=Path, default=None, help="candidate directory (default MODEL_DIR/candidates)")
    parser.add_argument("--batch", type=int, default=32, help="windows per run for the latency (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per round and candidate (default 200)")
    parser.add_argument(
        "--ship", action="store_true", help="name the gate's choice in the manifest and model card of MODEL_DIR"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of the table: the record (as in quantization.json), its file and what "
        "was shipped",
    )


def main(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir)
    if args.batch < 1 or args.threads < 1 or args.runs < 1:
        print("--batch, --threads and --runs must be >= 1", file=sys.stderr)
        return 2
    try:
        manifest = _read_manifest(model_dir)
        fp32 = model_dir / _parent_file(manifest)
        if not fp32.is_file():
            raise ModelError(f"{model_dir}: FP32 parent {fp32.name} not found")
        n_features = len(manifest["feature_names"])
        calibration = load_rows(args.calibration, n_features)
        evaluation = None if args.eval is None else load_rows(args.eval, n_features, labels=True)
    except (ModelError, DataError) as exc:
        print(f"model quantize: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out is not None else model_dir / "candidates"
    settings = Settings(batch=args.batch, threads=args.threads, runs=args.runs)
    files = {"calibration": _name(args.calibration, model_dir)}
    if args.eval is not None:
        files["evaluation"] = _name(args.eval, model_dir)
    outcome = quantize_model(fp32, calibration.x, evaluation, out, settings, data_files=files, relative_to=model_dir)
    (out / RECORD_FILE).write_text(json.dumps(outcome.record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    shipped = ship(model_dir, manifest, outcome, evaluation) if args.ship else None
    if args.json:
        result = {"record_file": str(out / RECORD_FILE), "shipped": shipped, "record": outcome.record}
        print(json.dumps(result, indent=2, allow_nan=False))
        return 0
    print(render_table(outcome.record))
    if shipped is not None:
        print(f"shipped {shipped} (manifest and model card updated)")
    return 0


def ship(model_dir: Path, manifest: dict[str, Any], outcome: Outcome, evaluation: Rows | None) -> str:
    """Name the gate's choice in ``model_dir``'s manifest and model card; return the shipped file name."""
    chosen = outcome.decision.chosen
    record = dict(outcome.record)
    if chosen == PARENT:
        file = Path(_parent_file(manifest)).name
    else:
        file = f"model.{chosen}.onnx"
        shutil.copyfile(outcome.chosen_path, model_dir / file)
    record["shipped_file"] = file
    data = dict(manifest, file=file, sha256=sha256_file(model_dir / file), quantization=record)
    if manifest["task"] != CLASSIFIER and chosen != PARENT and evaluation is not None and evaluation.y is not None:
        scores = run_task_output(model_dir / file, evaluation.x[evaluation.y == 0])
        data["threshold"] = threshold_from_scores(scores)
        data["threshold_rule"] = (
            manifest["threshold_rule"] + " Recomputed by `pdm-agent model quantize --ship` for the shipped "
            "quantized model, on the healthy rows of its evaluation set."
        )
    m = Manifest.from_dict(data)
    m.write(model_dir)
    write_model_card(m, model_dir)
    return file


def render_table(record: dict[str, Any]) -> str:
    """A plain-text table of every candidate: size, latency, accuracy deltas and the gate's verdict."""
    per = record["latency"]["per_candidate"]
    verdicts = record["gate"]["verdicts"]
    classifier = record["task"] == "classifier"
    head = f"{'candidate':<32} {'bits':<12} {'size':>8} {'x fp32':>7} {'p50 us':>8} {'p99 us':>8} {'x fp32':>7}  "
    head += "dAcc  dF1 agree" if classifier else "   dAUC  dDet"
    lines = [head]
    for c in record["candidates"]:
        name = c["name"]
        mark = "*" if name == record["shipped"] else " "
        if "error" in c:
            lines.append(f"{mark}{name:<31} error: {c['error']}")
            continue
        bits = "/".join(str(layer["bits"]) for layer in c["layers"])
        p = per[name]
        m = c.get("metrics") or {}
        if not m:
            acc = "  (no eval data)"
        elif classifier:
            acc = f"{m['accuracy_delta_points']:+5.2f} {m['macro_f1_delta_points']:+5.2f} {m['agreement']:.3f}"
        else:
            acc = f"{m['auc_delta']:+7.4f} {m['detection_delta_points']:+5.2f}"
        lines.append(
            f"{mark}{name:<31} {bits:<12} {c['size_bytes']:>8} {c['size_ratio']:>7.2f} {p['p50_us']:>8.3g} "
            f"{p['p99_us']:>8.3g} {p['p50_ratio']:>7.2f}  {acc}"
        )
        if name != record["shipped"]:
            lines.append(f"    {'; '.join(verdicts[name]['reasons'])}")
    lat = record["latency"]
    lines.append(
        f"* shipped: {record['shipped']} — {record['ship_reason']} (batch {lat['batch']}, {lat['threads']} thread(s), "
        f"{lat['cpu']})"
    )
    return "\n".join(lines)


def _read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict) or "feature_names" not in data or "task" not in data:
        raise ModelError(f"{path}: not a model manifest (needs task and feature_names)")
    return data


def _parent_file(manifest: dict[str, Any]) -> str:
    qz = manifest.get("quantization") or {}
    parent = qz.get("parent", {}).get("file") if isinstance(qz.get("parent"), dict) else qz.get("fp32_file")
    return str(parent or "model.fp32.onnx")


def _name(path: Path, model_dir: Path) -> str:
    try:
        return Path(path).resolve().relative_to(model_dir.resolve()).as_posix()
    except ValueError:
        return Path(path).name
