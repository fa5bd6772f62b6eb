"""The command line of the adaptation measurements: run them, print tables or JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pdm_tools.datasets.paths import dataset_dir
from pdm_tools.evaluation import adaptation
from pdm_tools.evaluation.adaptation.common import DataMissing
from pdm_tools.evaluation.adaptation.cwru import evaluate_cwru
from pdm_tools.evaluation.adaptation.skab import SKAB_FACTORS, evaluate_skab
from pdm_tools.quantization.static import cpu_description


def evaluate(datasets: Path | None, only: str | None = None, quick: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_description(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    if only in (None, "cwru"):
        cwru_dir = datasets / "cwru" if datasets else dataset_dir("cwru")
        result["cwru"] = evaluate_cwru(cwru_dir, int8=not quick, folds=[0.007] if quick else None)
    if only in (None, "skab"):
        skab_dir = datasets / "skab" if datasets else dataset_dir("skab")
        result["skab"] = evaluate_skab(skab_dir)
    return result


def render_text(result: dict[str, Any]) -> str:
    lines = [f"Adaptation measurements, {result['date']}, {result['cpu']}, onnxruntime {result['onnxruntime']}"]
    cw = result.get("cwru")
    if cw:
        lines += ["", "CWRU, " + cw["protocol"], f"LoRA: {cw['lora']}", ""]
        lines.append(
            f"{'diameter':<10}{'ref':>7}{'shift':>7}{'adapt':>7}{'onnx':>7}{'scratch':>8}{'recov':>7}"
            f"{'int8 sh':>8}{'int8 ad':>8}{'on ref':>7}{'n':>5}{'s':>7}{'peak kB':>9}{'bytes':>7}"
        )
        for fold in cw["folds"].values():
            q8 = fold.get("int8", {})
            lines.append(
                f"{fold['test_diameter_in']:<10g}{fold['reference']['accuracy']:>7.3f}{fold['shifted']['accuracy']:>7.3f}"
                f"{fold['adapted']['accuracy']:>7.3f}{fold['adapted_served_onnx']['accuracy']:>7.3f}"
                f"{fold['scratch']['accuracy']:>8.3f}{fold['recovered'] or 0:>7.2f}"
                f"{q8.get('shifted', {}).get('accuracy', float('nan')):>8.3f}"
                f"{q8.get('adapted_served_onnx', {}).get('accuracy', float('nan')):>8.3f}"
                f"{fold['adapted_on_reference']['accuracy']:>7.3f}{fold['windows']['adaptation']:>5}"
                f"{fold['training']['seconds']:>7.2f}{fold['training']['peak_memory_bytes'] / 1024:>9.0f}"
                f"{fold['adapter_bytes']:>7}"
            )
        lines.append(
            f"mean accuracy: {cw['mean']}; base FP32 file {next(iter(cw['folds'].values()))['base_fp32_bytes']} B"
        )
        for fold in cw["folds"].values():
            sweep = ", ".join(
                f"{n}: adapted {v['adapted']:.3f} / scratch {v['scratch']:.3f}" for n, v in fold["by_windows"].items()
            )
            if sweep:
                lines.append(f"  d={fold['test_diameter_in']:g} with fewer windows: {sweep}")
        lines.append(f"serving: {json.dumps(cw['serving'])}")
    sk = result.get("skab")
    if sk:
        lines += ["", "SKAB, " + sk["protocol"], f"LoRA: {sk['lora']}"]
        lines.append(f"{'variant':<22}" + "".join(f"{'x' + str(f):>24}" for f in SKAB_FACTORS))
        for name, by in sk["pooled"].items():
            cells = "".join(
                f"{by[str(f)]['f1']:>8.3f}{by[str(f)]['far']:>8.2f}{by[str(f)]['mar']:>8.2f}" for f in SKAB_FACTORS
            )
            lines.append(f"{name:<22}{cells}")
        lines.append(f"training: {sk['training']}; sizes: {sk['sizes']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this evaluation (also for ``pdm-agent evaluate adaptation`` once it is registered)."""
    parser.add_argument("--data", type=Path, default=None, help="datasets folder holding cwru/ and skab/")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", choices=["cwru", "skab"], default=None)
    parser.add_argument("--quick", action="store_true", help="one CWRU fold, no INT8 (a smoke run)")


def run(args: argparse.Namespace) -> int:
    """Measure and print; 2 (with the reason) when the datasets are not there."""
    try:
        result = evaluate(args.data, args.only, args.quick)
    except DataMissing as exc:
        print(f"adaptation: dataset not available, nothing measured: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, allow_nan=False) if args.json else render_text(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pdm_tools.evaluation.adaptation",
        description=adaptation.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run(parser.parse_args(argv))
