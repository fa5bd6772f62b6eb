"""CWRU bearing defect classification: four classes (normal, inner_race, outer_race, ball) from 12 kHz
drive-end vibration, with the agent's own bearing features (``agent.features.bearing``: time-domain
statistics, band power shares, envelope-spectrum peaks at the bearing frequencies × shaft speed) and its
MLP classifier, exported to ONNX and quantized to INT8 exactly as the shipped model is. The features are
by default the shipped model's (``--features envelope``: the scale-free envelope evidence of issue 21, band
power shares plus the ``envelope_evidence`` group: pre-whitened and raw squared-envelope lines at BPFI,
BPFO, BSF, FTF and their sidebands against their local background, best band per window), the same code the
runtime serves; ``--features v1`` evaluates the version-1 set (time statistics, band shares, envelope peaks
against the envelope's global median), which generalises worse across bearings (docs/results_cwru.md).

Protocols (the leakage-free ones first):

  cross-bearing leave one physical damaged bearing out (fault kind, defect diameter, outer-race position:
                15 specimens on CWRU): train on every other bearing at all loads, test on all windows of
                this one, so no window of a test bearing is in training; healthy parts rotate as for
                cross-load. Per bearing: the share of its windows given its true class, and how far its
                envelope-spectrum evidence at its own characteristic frequency stands above the healthy
                windows' (``envelope_visible``): a bearing whose defect leaves no mark there can only be
                recognised by what is specific to that rig. Pooled macro-F1 over all held-out windows.
  cross-size    leave one defect diameter out: train on the other diameters at all loads, test on this
                one (new damaged bearings); healthy parts rotate as for cross-load. FP32.
  cross-load    train on two motor loads, test on the third, for each of the three rotations. Healthy
                data exist at load 0 only (Normal_0, 5 s): it is split by time into three disjoint parts,
                part k standing in for load k, so healthy windows are in every training fold and never
                shared between train and test. Also reported for the three fault classes alone.
                Easy on CWRU: the same damaged bearings were recorded at every load.
  random split  non-overlapping windows of every recording, 70 % train / 30 % test at random
                (stratified by class): windows of one recording are on both sides, as in the published
                results (96.5-100 % accuracy), so it is optimistic.
  quantized     each four-class model also as static INT8 (QDQ, calibrated on its training rows),
                with accuracy, macro-F1 and label agreement against its FP32 parent.

Ablation (--ablation): cross-size again with each group of feature columns alone and left out
(``ABLATION_GROUPS``: time statistics, band shares, envelope peaks; for the envelope set, each evidence
family and variant), to show which features carry the figure.

Figures (--plots DIR): the pooled confusion matrices of cross-bearing, cross-size and cross-load, and the
INT8 against the FP32 class probabilities of every quantized model, as PNG.

Data: --data DIR (the folder with index.json), default $PDM_DATASETS/cwru or ../shared/datasets/cwru.
Windows are 4096 samples (0.34 s at 12 kHz), hop 2048 for training and cross-load test windows.

Example: pdm-agent evaluate cwru --json > cwru.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from agent.features.bearing import TIME_STATS, BearingFeatureSpec
from pdm_tools.common import plots
from pdm_tools.datasets.cwru import (
    CLASS_NAMES,
    FAULT_CLASSES,
    NORMAL_TRAIN_HOP,
    DatasetError,
    Recording,
    default_data_dir,
    featurize,
    load_cwru,
    normal_parts,
    stack,
)
from pdm_tools.evaluation import classification
from pdm_tools.models.defect_mlp import DefectMlp, MlpConfig, export_onnx, fit_mlp
from pdm_tools.quantization import static as q
from pdm_tools.quantization.static import compare_probabilities, quantize_classifier, run_classifier

logger = logging.getLogger(__name__)

# Called with each quantized model's test rows: (fold, true labels, FP32 and INT8 probabilities [rows, classes]).
OnQuantized = Callable[[str, np.ndarray, np.ndarray, np.ndarray], None]

DEFAULT_SEED = 42
RANDOM_TEST_FRACTION = 0.3
PUBLISHED_RANDOM_SPLIT = {
    "source": "B. Sahoo, Data-Driven Machinery Fault Diagnosis, doi 10.5281/zenodo.5890575",
    "protocol": "random split of windows (windows of one recording in train and test)",
    "accuracy": {
        "SVM on time-domain statistics (48 kHz)": 0.9653,
        "wavelet-packet features + SVM": 0.9933,
        "random forest": 0.9813,
        "gradient boosting": 0.9907,
        "2-D CNN": 0.9872,
    },
}


# Feature sets by name (``--features``): the version-1 set (time statistics, band shares, envelope peaks
# against the global median) and the scale-free envelope evidence of issue 21 the shipped model uses (band
# shares kept: without them the bearings with no envelope signature fall to "normal").
FEATURE_SETS: dict[str, BearingFeatureSpec] = {
    "v1": BearingFeatureSpec(),
    "envelope": BearingFeatureSpec(groups=("band_shares", "envelope_evidence")),
}
DEFAULT_FEATURES = "envelope"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with index.json and the .npz files (default $PDM_DATASETS/cwru or ../shared/datasets/cwru)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"training seed (default {DEFAULT_SEED})")
    parser.add_argument("--no-quantize", action="store_true", help="skip the INT8 models (faster)")
    parser.add_argument(
        "--features",
        choices=sorted(FEATURE_SETS),
        default=DEFAULT_FEATURES,
        help=f"feature set (default {DEFAULT_FEATURES}: the shipped model's, the envelope evidence of issue 21; "
        "v1: the version-1 features)",
    )
    parser.add_argument(
        "--ablation", action="store_true", help="also cross-size with each feature group alone / left out (slower)"
    )
    parser.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="also write PNG figures into DIR: the confusion matrices of the leave-out protocols and the INT8 "
        "against the FP32 probabilities",
    )


def main(args: argparse.Namespace) -> int:
    data_dir = args.data if args.data is not None else default_data_dir()
    if not (Path(data_dir) / "index.json").is_file() and (Path(data_dir) / "cwru" / "index.json").is_file():
        data_dir = Path(data_dir) / "cwru"
    outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (labels, FP32, INT8) of each quantized model
    try:
        if args.plots is not None:  # before the minutes of training, not after them
            plots.require()
            args.plots.mkdir(parents=True, exist_ok=True)
        # One BLAS thread: tiny matrices, and BLAS threads waiting for each other on a busy box cost 5x.
        with threadpool_limits(limits=1, user_api="blas"):
            result = evaluate(
                Path(data_dir),
                FEATURE_SETS[args.features],
                seed=args.seed,
                quantized=not args.no_quantize,
                ablation=args.ablation,
                on_quantized=lambda _fold, y, p32, p8: outputs.append((y, p32, p8)),
            )
        if args.plots is not None:
            figures = write_figures(args.plots, result, outputs)
            print(f"wrote {len(figures)} figures to {args.plots}", file=sys.stderr)
    except (DatasetError, OSError, plots.PlotsUnavailable) as exc:  # OSError: the plots folder
        print(f"cwru: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        print(render_text(result))
    return 0


def write_figures(
    folder: Path, result: dict[str, Any], outputs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> list[Path]:
    """The PNG figures of ``--plots``: each leave-out protocol's confusion matrix pooled over its folds (the
    leakage-free ones first, as in the report), and the INT8 against the FP32 probability of every class on
    every test row of every quantized model (cross-load rotations and the random split)."""
    names = result["classes"]
    protocols = [("cross_bearing", "cross-bearing (leave one damaged bearing out)", [result["cross_bearing"]])]
    if result.get("cross_fault_size"):
        folds = list(result["cross_fault_size"]["folds"].values())
        protocols.append(("cross_size", "cross-size (leave one defect diameter out)", folds))
    rotations = list(result["cross_load"]["rotations"].values())
    protocols.append(("cross_load", "cross-load (train on two loads, test on the third)", rotations))
    figures = []
    for stem, what, parts in protocols:
        matrix = np.sum([np.array(part["confusion"]) for part in parts], axis=0)
        f1 = classification.scores_from_confusion(matrix)["macro_f1"]
        title = f"CWRU {what}\nFP32, {int(matrix.sum())} test windows, macro-F1 {f1:.3f}"
        figures.append(plots.confusion_figure(folder / f"cwru_confusion_{stem}.png", title, matrix, names))
    if outputs:
        p32 = np.concatenate([o[1] for o in outputs])
        p8 = np.concatenate([o[2] for o in outputs])
        agree = float(np.mean(p32.argmax(axis=1) == p8.argmax(axis=1)))
        series = {name: (p32[:, k], p8[:, k]) for k, name in enumerate(names)}
        title = f"CWRU INT8 vs FP32, {len(outputs)} models, {len(p32)} rows\nsame class on {agree:.2%} of the rows"
        figures.append(
            plots.agreement_figure(
                folder / "cwru_int8_vs_fp32.png", title, series, "FP32 probability", "INT8 probability"
            )
        )
    return figures


def evaluate(
    data_dir: Path,
    spec: BearingFeatureSpec | None = None,
    seed: int = DEFAULT_SEED,
    config: MlpConfig | None = None,
    quantized: bool = True,
    ablation: bool = False,
    on_quantized: OnQuantized | None = None,
) -> dict[str, Any]:
    """Run all protocols on the recordings in ``data_dir``; the result is JSON-ready.

    ``ablation``: also run cross-size with each group of feature columns left out (``ABLATION_GROUPS``).
    ``on_quantized``: gets the FP32 and INT8 outputs of every quantized model (the figures of ``--plots``).
    """
    spec = spec or FEATURE_SETS[DEFAULT_FEATURES]
    config = config or MlpConfig()
    t0 = time.perf_counter()
    recordings = load_cwru(data_dir)
    loads, faults, normal_by_load = _arrange(recordings)
    t_load = time.perf_counter()

    # Features, computed once: fault windows at the spec's hop; healthy parts densely for training.
    fault_rows = {r.file: featurize(spec, r, r.samples, spec.hop_samples) for r in faults}
    normal_train = {load: featurize(spec, r, s, NORMAL_TRAIN_HOP) for load, (r, s) in normal_by_load.items()}
    normal_test = {load: featurize(spec, r, s, spec.hop_samples) for load, (r, s) in normal_by_load.items()}
    t_feat = time.perf_counter()

    folds = Featurized(spec, faults, fault_rows, normal_train, normal_test, seed, config)
    cross_bearing = _cross_bearing(folds)
    t_bearing = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="pdm-cwru-") as tmp:
        cross, cross3, quant, recipe = _cross_load(folds, loads, Path(tmp), quantized, on_quantized)
        t_cross = time.perf_counter()
        random_split, random_quant = _random_split(
            spec, recordings, seed, config, Path(tmp) / "random", quantized=quantized, on_quantized=on_quantized
        )
        t_random = time.perf_counter()
    cross_size = _cross_size(folds)
    t_size = time.perf_counter()

    result: dict[str, Any] = {
        "dataset": "cwru",
        "data_dir": str(data_dir),
        "classes": list(CLASS_NAMES),
        "feature_spec": spec.to_dict(),
        "feature_spec_hash": spec.spec_hash(),
        "model": {"type": "mlp", **config.to_dict(), "seed": seed},
        "recordings": {k: sum(r.kind == k for r in recordings) for k in CLASS_NAMES},
        "loads": loads,
        "cross_bearing": cross_bearing,
        "cross_fault_size": cross_size,
        "cross_load": _summary(cross, CLASS_NAMES),
        "cross_load_faults_only": _summary(cross3, FAULT_CLASSES),
        "random_split": {**random_split, "published": PUBLISHED_RANDOM_SPLIT},
    }
    if quantized:
        drops = [cross[k]["macro_f1"] - quant[k]["macro_f1"] for k in cross]
        drops.append(random_split["macro_f1"] - random_quant["macro_f1"])
        result["quantized"] = {
            "recipe": recipe,
            "cross_load": _summary(quant, CLASS_NAMES),
            "random_split": random_quant,
            "max_macro_f1_drop_points": _r(100 * max(drops)),
        }
    result["timings_s"] = {
        "load": _r(t_load - t0, 3),
        "features": _r(t_feat - t_load, 3),
        "cross_bearing": _r(t_bearing - t_feat, 3),
        "cross_load_fit_and_quantize": _r(t_cross - t_bearing, 3),
        "random_split": _r(t_random - t_cross, 3),
        "cross_fault_size": _r(t_size - t_random, 3),
    }
    if ablation:
        result["ablation"] = _ablation(folds)
        result["timings_s"]["ablation"] = _r(time.perf_counter() - t_size, 3)
    result["timings_s"]["total"] = _r(time.perf_counter() - t0, 3)
    return result


def _arrange(
    recordings: Sequence[Recording],
) -> tuple[list[int], list[Recording], dict[int, tuple[Recording, np.ndarray]]]:
    """Loads, fault recordings, and the healthy samples standing for each load (split if needed)."""
    faults = [r for r in recordings if r.kind != "normal"]
    normals = [r for r in recordings if r.kind == "normal"]
    loads = sorted({r.load_hp for r in faults})
    if len(loads) < 2:
        raise DatasetError(f"cross-load needs fault recordings at two or more loads, found loads {loads}")
    missing = [
        (k, load) for k in FAULT_CLASSES for load in loads if not any(r.kind == k and r.load_hp == load for r in faults)
    ]
    if missing:
        raise DatasetError(f"no recording for (kind, load) {missing}")
    if not normals:
        raise DatasetError("no healthy ('normal') recording")
    by_load = {r.load_hp: r for r in normals}
    if all(load in by_load for load in loads):
        return loads, faults, {load: (by_load[load], by_load[load].samples) for load in loads}
    longest = max(normals, key=lambda r: len(r.samples))
    parts = normal_parts(longest, len(loads))
    return loads, faults, {load: (longest, part) for load, part in zip(loads, parts, strict=True)}


@dataclass(frozen=True)
class Featurized:
    """What the leave-out protocols share: the fault recordings and the features of their windows (by
    file), the healthy parts' training and test rows (by the load they stand for), and the fit recipe."""

    spec: BearingFeatureSpec
    faults: Sequence[Recording]
    fault_rows: dict[str, np.ndarray]
    normal_train: dict[int, np.ndarray]
    normal_test: dict[int, np.ndarray]
    seed: int
    config: MlpConfig

    @property
    def n_features(self) -> int:
        """Columns of the rows (the spec's, or another feature set's evaluated on the same protocols)."""
        return int(next(iter(self.normal_test.values())).shape[1])


def _cross_load(
    d: Featurized, loads: Sequence[int], tmp: Path, quantized: bool, on_quantized: OnQuantized | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Train on all loads but one, test on it, each rotation: four classes (FP32 and, if ``quantized``, INT8
    exported under ``tmp``) and the three fault classes alone. Returns (four-class, fault-only, INT8, recipe).
    """
    cross: dict[str, Any] = {}
    cross3: dict[str, Any] = {}
    quant: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    for test_load in loads:
        key = f"test_load_{test_load}"
        train_loads = [load for load in loads if load != test_load]
        fault_train = [(d.fault_rows[r.file], r.label) for r in d.faults if r.load_hp != test_load]
        fault_test = [(d.fault_rows[r.file], r.label) for r in d.faults if r.load_hp == test_load]
        x_tr, y_tr = stack(fault_train + [(d.normal_train[load], 0) for load in train_loads], d.n_features)
        x_te, y_te = stack([*fault_test, (d.normal_test[test_load], 0)], d.n_features)
        model = fit_mlp(x_tr, y_tr, CLASS_NAMES, d.seed, d.config)
        rotation = {"train_loads": train_loads, "test_load": test_load}
        cross[key] = {
            **rotation,
            **classification.scores(y_te, model.predict(x_te), len(CLASS_NAMES)),
            "train_windows": len(y_tr),
        }
        if quantized:
            scores, recipe = _quantized(model, x_tr, x_te, y_te, tmp / key, on_quantized)
            quant[key] = {**rotation, **scores}
        # The three fault classes on their own (labels 1..3 -> 0..2).
        x3_tr, y3_tr = stack(fault_train, d.n_features)
        x3_te, y3_te = stack(fault_test, d.n_features)
        model3 = fit_mlp(x3_tr, y3_tr - 1, FAULT_CLASSES, d.seed, d.config)
        cross3[key] = {
            **rotation,
            **classification.scores(y3_te - 1, model3.predict(x3_te), len(FAULT_CLASSES)),
            "train_windows": len(y3_tr),
        }
    return cross, cross3, quant, recipe


def _cross_size(
    d: Featurized,
    columns: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """Leave one defect diameter out (four classes, FP32); ``None`` without two or more diameters.

    ``columns``: indices of the feature columns to use (all when ``None``), for the ablation.
    """
    sizes = sorted({r.diameter_in for r in d.faults if r.diameter_in is not None})
    if len(sizes) < 2 or any(r.diameter_in is None for r in d.faults):
        return None
    cols = np.arange(d.n_features) if columns is None else np.asarray(columns)
    parts = sorted(d.normal_train)
    folds: dict[str, Any] = {}
    for i, size in enumerate(sizes):
        part = parts[i % len(parts)]
        train = [(d.fault_rows[r.file][:, cols], r.label) for r in d.faults if r.diameter_in != size]
        train += [(d.normal_train[p][:, cols], 0) for p in parts if p != part]
        test = [(d.fault_rows[r.file][:, cols], r.label) for r in d.faults if r.diameter_in == size]
        x_tr, y_tr = stack(train, len(cols))
        x_te, y_te = stack([*test, (d.normal_test[part][:, cols], 0)], len(cols))
        model = fit_mlp(x_tr, y_tr, CLASS_NAMES, d.seed, d.config)
        folds[f"test_diameter_{size:g}in"] = {
            "test_diameter_in": size,
            **classification.scores(y_te, model.predict(x_te), len(CLASS_NAMES)),
            "train_windows": len(y_tr),
        }
    acc = [f["accuracy"] for f in folds.values()]
    f1 = [f["macro_f1"] for f in folds.values()]
    return {
        "classes": list(CLASS_NAMES),
        "folds": folds,
        "mean_accuracy": _r(float(np.mean(acc))),
        "mean_macro_f1": _r(float(np.mean(f1))),
        "min_macro_f1": _r(float(np.min(f1))),
    }


# The characteristic frequency whose envelope-spectrum peaks mark each fault class (``spec.multipliers``).
DEFECT_FREQUENCY = {"inner_race": "bpfi", "outer_race": "bpfo", "ball": "bsf"}


def bearing_id(rec: Recording) -> str:
    """The physical damaged bearing of a recording: CWRU's fault name (kind, diameter, outer-race position).

    Recordings of one bearing at several loads share it. Without a fault name in the index, kind and
    diameter stand for it.
    """
    if rec.fault != rec.kind:
        return rec.fault
    return rec.kind if rec.diameter_in is None else f"{rec.kind}_{rec.diameter_in:g}in"


def envelope_evidence(spec: BearingFeatureSpec, rows: np.ndarray, kind: str) -> np.ndarray | None:
    """Per window, the envelope-spectrum evidence of ``kind``'s defect frequency: ``evw_{f}`` (dB above the
    local background, pre-whitened, best band; for a ball the larger with ``evw_bsf_even``) when the spec has
    the evidence group, else the mean over
    harmonics of ``env{b}_{f}_{h}x`` (log10 peak / envelope median), best envelope band. ``None`` if the
    spec has neither for that frequency.
    """
    names = spec.feature_names()
    freq = DEFECT_FREQUENCY.get(kind)
    if freq is None or freq not in dict(spec.multipliers):
        return None
    if f"evw_{freq}" in names:
        # A ball's evidence is the stronger of BSF and its even harmonics (as in ``relw_bsf``).
        own = [names.index(n) for n in (f"evw_{freq}", f"evw_{freq}_even") if n in names]
        return np.asarray(rows[:, own].max(axis=1))
    if "envelope_peaks" not in spec.groups:
        return None
    per_band = [
        rows[:, [names.index(f"env{b}_{freq}_{h}x") for h in range(1, spec.harmonics + 1)]].mean(axis=1)
        for b in range(len(spec.envelope_bands_hz))
    ]
    return np.max(per_band, axis=0)


def _cross_bearing(
    d: Featurized,
) -> dict[str, Any]:
    """Leave one physical damaged bearing out (all its loads), four classes, FP32.

    Every held-out window is predicted once, by the model that never saw its bearing; the healthy part
    of fold ``i`` is scored in the first ``len(parts)`` folds only, so each healthy window counts once too.
    A bearing is ``envelope_visible`` when the median of its windows' ``envelope_evidence`` for its own
    class exceeds the largest value of that evidence on any healthy test window.
    """
    bearings: dict[str, list[Recording]] = {}
    for r in d.faults:
        bearings.setdefault(bearing_id(r), []).append(r)
    parts = sorted(d.normal_train)
    healthy = np.concatenate([d.normal_test[p] for p in parts])
    y_all: list[np.ndarray] = []
    pred_all: list[np.ndarray] = []
    per_bearing: dict[str, Any] = {}
    for i, (name, recs) in enumerate(sorted(bearings.items())):
        part = parts[i % len(parts)]
        train = [(d.fault_rows[r.file], r.label) for r in d.faults if bearing_id(r) != name]
        train += [(d.normal_train[p], 0) for p in parts if p != part]
        x_tr, y_tr = stack(train, d.n_features)
        if len(np.unique(y_tr)) < len(CLASS_NAMES):
            raise DatasetError(f"cross-bearing: without bearing {name} a class has no training recording")
        model = fit_mlp(x_tr, y_tr, CLASS_NAMES, d.seed, d.config)
        x_te, y_te = stack([(d.fault_rows[r.file], r.label) for r in recs], d.n_features)
        pred = model.predict(x_te)
        y_all.append(y_te)
        pred_all.append(pred)
        if i < len(parts):
            y_all.append(np.zeros(len(d.normal_test[part]), dtype=np.int64))
            pred_all.append(model.predict(d.normal_test[part]))
        kind = recs[0].kind
        entry: dict[str, Any] = {
            "kind": kind,
            "diameter_in": recs[0].diameter_in,
            "loads": sorted(r.load_hp for r in recs),
            "test_windows": len(y_te),
            "recall": _r(float(np.mean(pred == y_te))),
            "predicted": {c: int((pred == k).sum()) for k, c in enumerate(CLASS_NAMES)},
        }
        same_columns = d.n_features == d.spec.n_features
        evidence = envelope_evidence(d.spec, x_te, kind) if same_columns else None
        reference = envelope_evidence(d.spec, healthy, kind) if same_columns else None
        if evidence is not None and reference is not None and len(reference):
            entry["envelope_evidence_median"] = _r(float(np.median(evidence)), 4)
            entry["healthy_evidence_max"] = _r(float(reference.max()), 4)
            entry["envelope_visible"] = bool(np.median(evidence) > reference.max())
        per_bearing[name] = entry
    pooled = classification.scores(np.concatenate(y_all), np.concatenate(pred_all), len(CLASS_NAMES))
    visible = [b for b in per_bearing.values() if b.get("envelope_visible")]
    recalls = [b["recall"] for b in per_bearing.values()]
    return {
        "classes": list(CLASS_NAMES),
        "bearings": per_bearing,
        **pooled,
        "mean_bearing_recall": _r(float(np.mean(recalls))),
        "min_bearing_recall": _r(float(np.min(recalls))),
        "envelope_visible_bearings": len(visible),
        "mean_recall_envelope_visible": _r(float(np.mean([b["recall"] for b in visible]))) if visible else None,
    }


# Column groups of the ablation: feature names (``BearingFeatureSpec.feature_names``), or prefixes ending in "*".
ABLATION_GROUPS: dict[str, tuple[str, ...]] = {
    "time": TIME_STATS,
    "band_shares": ("band_rel_*",),
    "envelope_peaks": ("env*",),
    # The envelope evidence (``--features envelope``), by family and by variant.
    "evidence_whitened": ("evw_*", "relw_*", "kurtw_*"),
    "evidence_raw": ("evr_*", "relr_*", "kurtr_*"),
    "evidence_defect_lines": tuple(f"ev{v}_{c}" for v in "wr" for c in ("bpfi", "bpfo", "bsf", "bsf_even")),
    "evidence_shaft_ftf": tuple(f"ev{v}_{c}" for v in "wr" for c in ("shaft", "ftf")),
    "evidence_sidebands": tuple(f"ev{v}_{c}_sidebands" for v in "wr" for c in ("bpfi", "bsf")),
    "evidence_relative": ("relw_*", "relr_*"),
    "evidence_kurtosis": ("kurtw_best", "kurtr_best"),
}


def _in_group(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` or starts with one ending in "*".

    >>> [_in_group(n, ("evw_bpfi", "env*")) for n in ("evw_bpfi", "evw_bpfi_sidebands", "env0_kurtosis")]
    [True, False, True]
    """
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def _ablation(
    d: Featurized,
) -> dict[str, Any]:
    """Cross-size mean and worst macro-F1 with each feature group alone and with each group left out."""
    names = d.spec.feature_names()
    groups = {g: np.array([i for i, n in enumerate(names) if _in_group(n, p)]) for g, p in ABLATION_GROUPS.items()}
    out: dict[str, Any] = {}
    for group, cols in groups.items():
        if len(cols) == 0:  # a group of the other feature set
            continue
        rest = np.setdiff1d(np.arange(len(names)), cols)
        for label, use in ((f"only_{group}", cols), (f"without_{group}", rest)):
            if len(use) == 0:
                continue
            size = _cross_size(d, use)
            if size is not None:
                out[label] = {
                    "features": len(use),
                    "mean_macro_f1": size["mean_macro_f1"],
                    "min_macro_f1": size["min_macro_f1"],
                    "per_fold": [f["macro_f1"] for f in size["folds"].values()],
                }
    return out


def _random_split(
    spec: BearingFeatureSpec,
    recordings: Sequence[Recording],
    seed: int,
    config: MlpConfig,
    tmp: Path,
    quantized: bool,
    on_quantized: OnQuantized | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Non-overlapping windows of all recordings, stratified random split (optimistic protocol)."""
    x, y = stack([(featurize(spec, r, r.samples, spec.window_samples), r.label) for r in recordings], spec.n_features)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(len(CLASS_NAMES)):
        rows = np.flatnonzero(y == c)
        pick = rng.permutation(rows)[: max(1, round(RANDOM_TEST_FRACTION * len(rows)))]
        test[pick] = True
    model = fit_mlp(x[~test], y[~test], CLASS_NAMES, seed, config)
    result = {
        "window_hop_samples": spec.window_samples,
        "test_fraction": RANDOM_TEST_FRACTION,
        **classification.scores(y[test], model.predict(x[test]), len(CLASS_NAMES)),
        "train_windows": int((~test).sum()),
    }
    quant: dict[str, Any] = {}
    if quantized:
        quant, _ = _quantized(model, x[~test], x[test], y[test], tmp, on_quantized)
    return result, quant


def _quantized(
    model: DefectMlp,
    x_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    tmp: Path,
    on_quantized: OnQuantized | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export FP32, quantize to INT8 (calibrated on the training rows), score both on the test rows."""
    tmp.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = tmp / "model.fp32.onnx", tmp / "model.int8.onnx"
    export_onnx(model, fp32_path)
    recipe = quantize_classifier(fp32_path, int8_path, x_train, q.QuantizeConfig())
    p32 = run_classifier(q.session(fp32_path), x_test)
    p8 = run_classifier(q.session(int8_path), x_test)
    if not np.array_equal(p32.argmax(axis=1), model.predict(x_test)):
        raise RuntimeError("the FP32 ONNX graph does not reproduce the numpy model's classes")
    if on_quantized is not None:
        on_quantized(tmp.name, y_test, p32, p8)
    scores = classification.scores(y_test, p8.argmax(axis=1), len(model.class_names))
    comparison = {k: _r(v) if isinstance(v, float) else v for k, v in compare_probabilities(p32, p8).items()}
    return {**scores, **comparison}, recipe


def _summary(rotations: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    acc = [r["accuracy"] for r in rotations.values()]
    f1 = [r["macro_f1"] for r in rotations.values()]
    return {
        "classes": list(classes),
        "rotations": rotations,
        "mean_accuracy": _r(float(np.mean(acc))),
        "mean_macro_f1": _r(float(np.mean(f1))),
        "min_macro_f1": _r(float(np.min(f1))),
    }


def _r(value: float, digits: int = 6) -> float:
    return round(float(value), digits)


def render_text(result: dict[str, Any]) -> str:
    """The result as plain-text tables (what ``pdm-agent evaluate cwru`` prints without --json)."""
    lines = [f"CWRU defect classification ({result['data_dir']}), classes {', '.join(result['classes'])}", ""]
    quant = result.get("quantized")
    cb = result["cross_bearing"]
    lines.append("Cross-bearing (leave one damaged bearing out, all its loads; no window of it in training), FP32:")
    lines.append(f"  {'bearing':<12}{'kind':<12}{'windows':>8}{'recall':>8}  {'predicted':<40}envelope evidence")
    for name, b in cb["bearings"].items():
        predicted = " ".join(f"{c}:{n}" for c, n in b["predicted"].items() if n)
        seen = ""
        if "envelope_visible" in b:
            seen = (
                f"{b['envelope_evidence_median']:.2f} vs healthy max {b['healthy_evidence_max']:.2f}"
                f" ({'visible' if b['envelope_visible'] else 'not visible'})"
            )
        lines.append(f"  {name:<12}{b['kind']:<12}{b['test_windows']:>8}{b['recall']:>8.3f}  {predicted:<40}{seen}")
    lines.append(
        f"  pooled: accuracy {cb['accuracy']:.4f}, macro-F1 {cb['macro_f1']:.4f}; mean bearing recall "
        f"{cb['mean_bearing_recall']:.4f} (worst {cb['min_bearing_recall']:.4f}); "
        f"{cb['envelope_visible_bearings']} of {len(cb['bearings'])} bearings visible in the envelope spectrum"
    )
    lines.append("")
    size = result.get("cross_fault_size")
    if size:
        lines.append("Cross-size (leave one defect diameter out, all loads; new damaged bearings), FP32:")
        for f in size["folds"].values():
            lines.append(
                f"  test diameter {f['test_diameter_in']:g} in: accuracy {f['accuracy']:.4f}, "
                f"macro-F1 {f['macro_f1']:.4f}, confusion {f['confusion']}"
            )
        lines.append(
            f"  mean: accuracy {size['mean_accuracy']:.4f}, macro-F1 {size['mean_macro_f1']:.4f} "
            f"(worst fold {size['min_macro_f1']:.4f})"
        )
        lines.append("")

    def table(title: str, summary: dict[str, Any], qsum: dict[str, Any] | None) -> None:
        lines.append(title)
        head = f"  {'rotation':<22}{'accuracy':>10}{'macro-F1':>10}"
        lines.append(head + (f"{'INT8 acc':>10}{'INT8 F1':>10}" if qsum else ""))
        for key, r in summary["rotations"].items():
            name = f"{'+'.join(map(str, r['train_loads']))} -> {r['test_load']}"
            row = f"  {name:<22}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}"
            if qsum:
                qr = qsum["rotations"][key]
                row += f"{qr['accuracy']:>10.4f}{qr['macro_f1']:>10.4f}"
            lines.append(row)
        row = f"  {'mean':<22}{summary['mean_accuracy']:>10.4f}{summary['mean_macro_f1']:>10.4f}"
        if qsum:
            row += f"{qsum['mean_accuracy']:>10.4f}{qsum['mean_macro_f1']:>10.4f}"
        lines.append(row)
        for key, r in summary["rotations"].items():
            lines.append(f"  confusion {key} (rows true, columns predicted, {', '.join(summary['classes'])}):")
            lines.extend(f"    {row}" for row in r["confusion"])
        lines.append("")

    table(
        "Cross-load, four classes (train on two loads, test on the third):",
        result["cross_load"],
        quant["cross_load"] if quant else None,
    )
    table("Cross-load, fault classes only (inner_race, outer_race, ball):", result["cross_load_faults_only"], None)
    rs = result["random_split"]
    lines.append("Random split (optimistic: windows of one recording on both sides), non-overlapping windows:")
    lines.append(
        f"  this agent: accuracy {rs['accuracy']:.4f}, macro-F1 {rs['macro_f1']:.4f} "
        f"({rs['test_windows']} test windows)"
        + (f"; INT8 accuracy {quant['random_split']['accuracy']:.4f}" if quant else "")
    )
    for name, acc in rs["published"]["accuracy"].items():
        lines.append(f"  published: {name}: accuracy {acc:.4f}")
    ablation = result.get("ablation")
    if ablation:
        lines += ["", "Ablation (cross-size macro-F1 with feature groups alone / left out):"]
        for label, a in ablation.items():
            folds = " / ".join(f"{v:.3f}" for v in a["per_fold"])
            lines.append(
                f"  {label:<24}{a['features']:>3} features: mean {a['mean_macro_f1']:.4f}, "
                f"worst {a['min_macro_f1']:.4f} ({folds})"
            )
    if quant:
        lines += [
            "",
            f"INT8 vs FP32: largest macro-F1 drop {quant['max_macro_f1_drop_points']:.2f} points "
            f"(recipe: {quant['recipe'].get('format')}, {quant['recipe'].get('calibration_method')}, "
            f"reduce_range={quant['recipe'].get('reduce_range')})",
        ]
    t = result["timings_s"]
    lines.append(f"Time: {t['total']:.1f} s (features {t['features']:.1f} s)")
    return "\n".join(lines)
