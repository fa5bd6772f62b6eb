"""Quantization targets, measured in one run: ``python benchmarks/quantization.py [--quick] [--json FILE]``.

For the shipped models (``models/``, with their ``calibration.npz`` and ``eval.npz``) and for two wider
variants trained by the same code on the same data, so that the targets for models of ≥ 50 K parameters
are measured where they apply:

- ``wide-vibration-anomaly``: the vibration autoencoder with hidden layers 256-128-256 (simulator data);
- ``wide-defect-classifier``: the defect classifier MLP with hidden layers 256-256 (CWRU; skipped with a
  message when ``../shared/datasets/cwru`` or ``$PDM_DATASETS/cwru`` is missing),

it builds every candidate (``pdm_tools.quantization``), measures size, accuracy on held-out data and latency
(p50 per window, batch 32, 1 thread) side by side, runs the gate, and prints:

1. one row per model: size ratios, accuracy deltas, latency ratio, what the gate ships;
2. the targets of the quantization issue with the measured value and met / not met;
3. a latency sweep for the wide models: INT8 variants (per tensor / per channel, reduce_range on/off,
   U8U8, dynamic) and 4-bit against FP32 at batch 1/16/32/128 and 1/2 threads.

Ratios are measured in the same process, interleaved; absolute numbers depend on the machine and on
whatever else runs on it. See docs/quantization.md for a recorded run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pdm_tools.quantization import candidates as cands  # noqa: E402
from pdm_tools.quantization import static as q  # noqa: E402
from pdm_tools.quantization.data import Rows, load_rows, subsample  # noqa: E402
from pdm_tools.quantization.workflow import Settings, measure_latency, quantize_model  # noqa: E402

SHIPPED = ("vibration_anomaly", "process_anomaly", "defect_classifier")
INT8 = "int8-static-minmax-tensor"
BIG_PARAMS = 50_000
BIG_MACS = 50_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / "models", help="shipped model folders")
    parser.add_argument("--cwru", type=Path, default=None, help="CWRU folder (default as pdm-agent train)")
    parser.add_argument("--quick", action="store_true", help="fewer timed runs, smaller wide autoencoder data")
    parser.add_argument("--json", type=Path, default=None, help="also write every record to this JSON file")
    args = parser.parse_args(argv)
    runs = 40 if args.quick else 200
    settings = Settings(batch=32, threads=1, runs=runs, repeats=5)
    started = time.monotonic()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in SHIPPED:
            d = args.models / name
            if not (d / "calibration.npz").exists() or not (d / "eval.npz").exists():
                print(f"{name}: skipped (no calibration.npz / eval.npz in {d}; run make models)", file=sys.stderr)
                continue
            cal, ev = load_rows(d / "calibration.npz"), load_rows(d / "eval.npz", labels=True)
            results[name.replace("_", "-")] = _run(d / "model.fp32.onnx", cal.x, ev, tmp / name, settings)
        fp32, cal_x, ev = _wide_autoencoder(tmp / "wide_ae", args.quick)
        results["wide-vibration-anomaly"] = _run(fp32, cal_x, ev, tmp / "wide_ae" / "c", settings)
        wide_cls = _wide_classifier(tmp / "wide_cls", args.cwru)
        if wide_cls is not None:
            fp32, cal_x, ev = wide_cls
            results["wide-defect-classifier"] = _run(fp32, cal_x, ev, tmp / "wide_cls" / "c", settings)
        sweep = {
            name: _latency_sweep(Path(rec["_fp32"]), Path(rec["_dir"]), rec["_rows"], runs)
            for name, rec in results.items()
            if name.startswith("wide-")
        }
    for rec in results.values():
        for key in ("_dir", "_rows", "_fp32"):
            rec.pop(key, None)
    print(f"# Quantization benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {q.cpu_description()})")
    print()
    print(_models_table(results))
    print()
    print(_targets_table(results))
    print()
    print(_sweep_table(sweep))
    print(f"\n({time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"models": results, "latency_sweep": sweep}, indent=1) + "\n")
    return 0


def _run(fp32: Path, cal_x: np.ndarray, ev: Rows, out: Path, settings: Settings) -> dict[str, Any]:
    outcome = quantize_model(fp32, cal_x, ev, out, settings, relative_to=out)
    rec = outcome.record
    rec["_dir"] = str(out)
    rec["_rows"] = ev.x if ev.y is None or rec["task"] == "classifier" else ev.x[ev.y == 0]
    rec["_fp32"] = str(fp32)
    return rec


def _wide_autoencoder(out: Path, quick: bool) -> tuple[Path, np.ndarray, Rows]:
    from pdm_tools.models.autoencoder import AutoencoderConfig, fit_autoencoder
    from pdm_tools.models.export import export_onnx
    from pdm_tools.training.simdata import DataPlan, vibration_dataset
    from pdm_tools.training.train import anomaly_eval_rows

    plan = DataPlan(seed=42, vibration_minutes=0.5 if quick else 1.5)
    data = vibration_dataset(plan)
    config = AutoencoderConfig(hidden=(256, 128, 256), max_epochs=30 if quick else 150, patience=10)
    model, _ = fit_autoencoder(data.train, data.val, 42, config)
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out / "model.fp32.onnx")
    ev = anomaly_eval_rows(data.test, data.faults)
    assert ev is not None
    return out / "model.fp32.onnx", data.train[subsample(len(data.train), 512)], ev


def _wide_classifier(out: Path, data_dir: Path | None) -> tuple[Path, np.ndarray, Rows] | None:
    from agent.features.bearing import BearingFeatureSpec
    from pdm_tools.datasets.cwru import CLASS_NAMES, default_data_dir, load_cwru
    from pdm_tools.models.defect_mlp import MlpConfig, export_onnx, fit_mlp
    from pdm_tools.training.defect_train import training_rows

    data_dir = data_dir or default_data_dir()
    if not (Path(data_dir) / "index.json").exists():
        print(f"wide-defect-classifier: skipped, no CWRU data at {data_dir}", file=sys.stderr)
        return None
    spec = BearingFeatureSpec()
    x, y, x_held, y_held = training_rows(load_cwru(Path(data_dir)), spec)
    model = fit_mlp(x, y, CLASS_NAMES, 42, MlpConfig(hidden=(256, 256)))
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out / "model.fp32.onnx")
    return out / "model.fp32.onnx", x[subsample(len(x), 512)], Rows(x_held, y_held)


def _latency_sweep(fp32: Path, out: Path, rows: np.ndarray, runs: int) -> dict[str, Any]:
    """FP32 vs INT8 variants and 4-bit at several batch sizes and thread counts (same process)."""
    variants = [
        cands.Recipe("int8-tensor-rr", "static", calibration="minmax"),
        cands.Recipe("int8-channel-rr", "static", calibration="minmax", per_channel=True),
        cands.Recipe("int8-tensor-full", "static", calibration="minmax", reduce_range=False),
        cands.Recipe("int8-u8u8", "static", calibration="minmax", reduce_range=False, weight_type="uint8"),
        cands.Recipe("int8-dynamic", "dynamic", per_channel=True),
        cands.Recipe("w4-gptq", "nbits", bits=4, algorithm="gptq"),
    ]
    cal = rows[subsample(len(rows), 512)]
    paths = {"fp32": fp32}
    for recipe in variants:
        cand = cands.build(recipe, fp32, cal, out / "sweep" / f"{recipe.name}.onnx")
        if cand.path is not None:
            paths[recipe.name] = cand.path
    table: dict[str, Any] = {}
    for threads in (1, 2):
        for batch in (1, 16, 32, 128):
            lat = measure_latency(paths, rows, Settings(batch=batch, threads=threads, runs=max(20, runs // 2)))
            base = lat["fp32"].p50_us
            table[f"b{batch}-t{threads}"] = {
                name: {"p50_us": v.p50_us, "ratio": round(v.p50_us / base, 3)} for name, v in lat.items()
            }
    return table


def _cand(rec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in rec["candidates"] if c["name"] == name)


def _acc(rec: dict[str, Any], name: str) -> str:
    m = _cand(rec, name).get("metrics", {})
    if rec["task"] == "classifier":
        return f"{m['accuracy_delta_points']:+.2f} pt / {m['agreement']:.1%}"
    return f"{m['auc_delta']:+.4f}"


def _models_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | params | MACs/window | INT8 size × | 4-bit GPTQ size × | INT8 Δacc/agree or ΔAUC | "
        "GPTQ | RTN | INT8 p50 × (b32, 1 thr) | GPTQ p50 × | shipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rec in results.items():
        per = rec["latency"]["per_candidate"]
        lines.append(
            f"| {name} | {rec['parent']['parameters']:,} | {rec['parent']['macs_per_sample']:,} | "
            f"{_cand(rec, INT8)['size_ratio']:.3f} | {_cand(rec, 'w4-gptq')['size_ratio']:.3f} | {_acc(rec, INT8)} | "
            f"{_acc(rec, 'w4-gptq')} | {_acc(rec, 'w4-rtn')} | {per[INT8]['p50_ratio']:.2f} | "
            f"{per['w4-gptq']['p50_ratio']:.2f} | {rec['shipped']} |"
        )
    return "\n".join(lines)


def _targets_table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, bool]] = []
    for name, rec in results.items():
        big = rec["parent"]["parameters"] >= BIG_PARAMS
        heavy = rec["parent"]["macs_per_sample"] >= BIG_MACS
        int8 = _cand(rec, INT8)
        gptq, rtn = _cand(rec, "w4-gptq"), _cand(rec, "w4-rtn")
        shipped = _cand(rec, rec["shipped"])
        per = rec["latency"]["per_candidate"]
        if big:
            rows.append(
                ("INT8 size ≤ 0.30× (≥ 50 K params)", name, f"{int8['size_ratio']:.3f}×", int8["size_ratio"] <= 0.30)
            )
            rows.append(("4-bit GPTQ size ≤ 0.18×", name, f"{gptq['size_ratio']:.3f}×", gptq["size_ratio"] <= 0.18))
        if rec["task"] == "classifier":
            m8, mg, mr = int8["metrics"], gptq["metrics"], rtn["metrics"]
            rows.append(
                (
                    "classifier INT8 Δacc ≤ 0.5 pt, agreement ≥ 99 %",
                    name,
                    f"{m8['accuracy_delta_points']:+.2f} pt, {m8['agreement']:.2%}",
                    m8["accuracy_delta_points"] >= -0.5 and m8["agreement"] >= 0.99,
                )
            )
            rows.append(
                (
                    "classifier 4-bit GPTQ Δacc ≤ 1 pt",
                    name,
                    f"{mg['accuracy_delta_points']:+.2f} pt",
                    mg["accuracy_delta_points"] >= -1.0,
                )
            )
            g_out = gptq["layers"][-1]["output_sqnr_db"]
            r_out = rtn["layers"][-1]["output_sqnr_db"]
            rows.append(
                (
                    "round-to-nearest 4-bit loses more than GPTQ",
                    name,
                    f"RTN {mr['accuracy_delta_points']:+.2f} pt, logits SQNR {r_out} dB; GPTQ "
                    f"{mg['accuracy_delta_points']:+.2f} pt, {g_out} dB",
                    mr["accuracy_delta_points"] < mg["accuracy_delta_points"]
                    or (mr["accuracy_delta_points"] == mg["accuracy_delta_points"] and r_out < g_out),
                )
            )
        else:
            auc = shipped.get("metrics", {}).get("auc_delta", 0.0)
            rows.append((f"anomaly ΔAUC ≤ 0.005 for what ships ({rec['shipped']})", name, f"{auc:+.4f}", auc >= -0.005))
        if heavy:
            r = per[INT8]["p50_ratio"]
            best = min(
                (per[c["name"]]["p50_ratio"], c["name"])
                for c in rec["candidates"]
                if c["name"].startswith(("int8", "mixed-int8"))
            )
            rows.append(
                (
                    "INT8 latency ≤ 0.55× FP32 (≥ 50 K MACs, batch 32)",
                    name,
                    f"{r:.2f}× (best INT8: {best[1]} {best[0]:.2f}×)",
                    best[0] <= 0.55,
                )
            )
        sp = per[rec["shipped"]]["p50_ratio"]
        rows.append(("no shipped model slower than FP32", name, f"{rec['shipped']} {sp:.2f}×", sp <= 1.0))
    lines = ["| target | model | measured | met |", "|---|---|---|---|"]
    lines += [f"| {t} | {m} | {v} | {'yes' if ok else '**no**'} |" for t, m, v, ok in rows]
    return "\n".join(lines)


def _sweep_table(sweep: dict[str, Any]) -> str:
    lines = []
    for model, table in sweep.items():
        names = list(next(iter(table.values())))
        lines += [f"Latency sweep, {model}: p50 per window, ratio to FP32 (FP32 in µs per window)", ""]
        lines += ["| batch-threads | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key, row in table.items():
            cells = [f"{row['fp32']['p50_us']:.3g} µs"] + [f"{row[n]['ratio']:.2f}×" for n in names[1:]]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
