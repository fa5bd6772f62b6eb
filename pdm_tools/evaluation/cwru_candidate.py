"""A candidate feature set for the defect classifier, measured on the leakage-free CWRU protocols only.

Not served and not in any manifest: the prototype of the ``envelope_evidence`` group of
``agent.features.bearing`` (which the shipped model now uses), kept so that its figures in
docs/results_cwru.md can be reproduced. "v1" below is the version-1 feature set (``BearingFeatureSpec()``).
It answers one question of issue 21: which features carry what transfers between damaged bearings?

Candidate, per window (26 columns): the v1 spec's band power shares (10) and kurtosis, plus envelope
evidence of the bearing's characteristic frequencies computed so that neither the damage size nor the load
sets its scale:

- the window is pre-whitened (every spectral line set to unit magnitude, phase kept: cepstral
  pre-whitening, Randall and Antoni), so the rig's resonances and the impact strength drop out;
- for each band of ``BANDS``: band-pass (FFT mask), squared Hilbert envelope, its amplitude spectrum;
- ``r(b, f) = log10(peak within ±max(1.5 bins, 2 %) of f / median of the spectrum within ±max(10 bins,
  0.5 × shaft) of f, the peak zone excluded)``: the peak against its *local* background;
- ``ev_{c}``: max over bands of the mean of ``r`` over harmonics 1..3 of ``c`` (shaft, BPFI, BPFO, BSF,
  FTF); ``ev1_{c}``: the same for the first harmonic only; ``ev_bpfi_sidebands``: at h × BPFI ± shaft;
  ``ev_bsf_sidebands``: at h × BSF ± FTF (the cage carries a ball defect through the load zone);
- ``rel_{c}`` for BPFI, BPFO, BSF: ``ev_c`` minus the largest ``ev`` of the other two (which defect the
  envelope favours, whatever the overall level).

Run: ``python -m pdm_tools.evaluation.cwru_candidate [--data DIR] [--seeds 0 1 2 42] [--json]``: cross-size
(mean and worst fold) for each seed, cross-bearing and cross-load FP32 / INT8 (last seed), for the v1
features and the candidate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from agent.features.bearing import BearingFeatureSpec, band_envelope
from pdm_tools.datasets.cwru import (
    NORMAL_TRAIN_HOP,
    DatasetError,
    Recording,
    cut,
    default_data_dir,
    featurize,
    load_cwru,
)
from pdm_tools.evaluation import cwru
from pdm_tools.models.defect_mlp import MlpConfig

BANDS = ((500.0, 2500.0), (2500.0, 5000.0), (1000.0, 3000.0), (3000.0, 5000.0))
HARMONICS = 3
TOLERANCE_BINS = 1.5
TOLERANCE_REL = 0.02
BACKGROUND_BINS = 10
_EPS = 1e-12


def candidate_names(spec: BearingFeatureSpec) -> tuple[str, ...]:
    """Column names of ``candidate_rows``."""
    fams = [c for c, _ in spec.frequencies]
    base = [n for n in spec.feature_names() if n.startswith("band_rel_")] + ["kurtosis"]
    ev = [f"ev_{c}" for c in fams] + [f"ev1_{c}" for c in fams] + ["ev_bpfi_sidebands", "ev_bsf_sidebands"]
    return (*base, *ev, *(f"rel_{c}" for c in ("bpfi", "bpfo", "bsf")))


def envelope_evidence_rows(x: np.ndarray, rate_hz: float, rpm: float, spec: BearingFeatureSpec) -> np.ndarray:
    """The ``ev``, ``ev1``, sideband and ``rel`` columns of windows ``x`` ``(m, n)`` of one recording."""
    m, n = x.shape
    spectrum = np.fft.rfft(x - x.mean(axis=1, keepdims=True), axis=1)
    whitened = np.fft.irfft(spectrum / (np.abs(spectrum) + _EPS), n=n, axis=1)
    shaft = rpm / 60.0
    mult = {"shaft": 1.0, **dict(spec.multipliers)}
    df = rate_hz / n
    fams = list(mult)
    per_band_mean = np.empty((len(BANDS), m, len(fams)))
    per_band_first = np.empty((len(BANDS), m, len(fams)))
    sidebands = np.empty((len(BANDS), m, 2))
    hann = np.hanning(n)
    for b, (lo, hi) in enumerate(BANDS):
        _, envelope = band_envelope(whitened, rate_hz, lo, hi)
        squared = envelope**2
        squared -= squared.mean(axis=1, keepdims=True)
        ses = np.abs(np.fft.rfft(squared * hann, axis=1))

        def ratio(f: float, ses: np.ndarray = ses) -> np.ndarray:
            tol = max(TOLERANCE_BINS * df, TOLERANCE_REL * f)
            width = max(BACKGROUND_BINS * df, 0.5 * shaft)
            lo_bin, hi_bin = max(1, math.floor((f - width) / df)), math.floor((f + width) / df) + 1
            bins = np.arange(lo_bin, hi_bin)
            peak_zone = np.abs(bins * df - f) <= tol
            peak = ses[:, bins[peak_zone]].max(axis=1)
            background = np.median(ses[:, bins[~peak_zone]], axis=1)
            return np.asarray(np.log10(peak / (background + _EPS) + _EPS))

        for j, c in enumerate(fams):
            r = np.stack([ratio(h * mult[c] * shaft) for h in range(1, HARMONICS + 1)])
            per_band_mean[b, :, j] = r.mean(axis=0)
            per_band_first[b, :, j] = r[0]
        for j, (c, side) in enumerate((("bpfi", mult["shaft"]), ("bsf", mult["ftf"]))):
            sides = [ratio((h * mult[c] + s * side) * shaft) for h in range(1, HARMONICS + 1) for s in (-1, 1)]
            sidebands[b, :, j] = np.mean(sides, axis=0)
    ev = per_band_mean.max(axis=0)
    rel = []
    for c in ("bpfi", "bpfo", "bsf"):
        others = [ev[:, fams.index(o)] for o in ("bpfi", "bpfo", "bsf") if o != c]
        rel.append(ev[:, fams.index(c)] - np.max(others, axis=0))
    return np.concatenate([ev, per_band_first.max(axis=0), sidebands.max(axis=0), np.stack(rel, axis=1)], axis=1)


def candidate_rows(spec: BearingFeatureSpec, rec: Recording, samples: np.ndarray, hop: int) -> np.ndarray:
    """Candidate features of the windows of ``samples`` (a piece of ``rec``): float32 ``(k, 26)``."""
    v1 = featurize(spec, rec, samples, hop)
    names = spec.feature_names()
    keep = [i for i, name in enumerate(names) if name.startswith("band_rel_")] + [names.index("kurtosis")]
    windows = cut(samples, spec.window_samples, hop)
    evidence = envelope_evidence_rows(windows, rec.rate_hz, rec.rpm, spec)
    return np.concatenate([v1[:, keep], evidence.astype(np.float32)], axis=1)


def compare(data_dir: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Cross-size per seed; cross-bearing and cross-load FP32 / INT8 (last seed); v1 vs candidate."""
    spec = BearingFeatureSpec()
    config = MlpConfig()
    loads, faults, normal_by_load = cwru._arrange(load_cwru(data_dir))
    out: dict[str, Any] = {"candidate_features": list(candidate_names(spec))}
    for label, rows in (("v1", featurize), ("candidate", candidate_rows)):
        folds = cwru.Featurized(
            spec,
            faults,
            {r.file: rows(spec, r, r.samples, spec.hop_samples) for r in faults},
            {k: rows(spec, r, s, NORMAL_TRAIN_HOP) for k, (r, s) in normal_by_load.items()},
            {k: rows(spec, r, s, spec.hop_samples) for k, (r, s) in normal_by_load.items()},
            seeds[-1],
            config,
        )
        sizes = {}
        for seed in seeds:
            size = cwru._cross_size(cwru.Featurized(**{**vars(folds), "seed": seed}))
            if size is None:
                raise DatasetError("cross-size needs two or more defect diameters")
            sizes[str(seed)] = {
                "mean_macro_f1": size["mean_macro_f1"],
                "min_macro_f1": size["min_macro_f1"],
                "per_fold": {k: f["macro_f1"] for k, f in size["folds"].items()},
            }
        bearing = cwru._cross_bearing(folds)
        with tempfile.TemporaryDirectory(prefix="pdm-cwru-candidate-") as tmp:
            cross, _, quant, _ = cwru._cross_load(folds, loads, Path(tmp), quantized=True)
        drops = [cross[k]["macro_f1"] - quant[k]["macro_f1"] for k in cross]
        out[label] = {
            "features": folds.n_features,
            "cross_size_by_seed": sizes,
            "cross_size_mean_over_seeds": round(float(np.mean([s["mean_macro_f1"] for s in sizes.values()])), 6),
            "cross_bearing": {
                k: bearing[k] for k in ("accuracy", "macro_f1", "mean_bearing_recall", "min_bearing_recall")
            }
            | {"recall": {name: b["recall"] for name, b in bearing["bearings"].items()}},
            "cross_load": {k: cross[k]["macro_f1"] for k in cross},
            "cross_load_int8": {k: quant[k]["macro_f1"] for k in quant},
            "max_int8_drop_points": round(100 * max(drops), 4),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="folder with index.json (default as evaluate cwru)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 42], help="training seeds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    data_dir = args.data if args.data is not None else default_data_dir()
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            result = compare(Path(data_dir), args.seeds)
    except DatasetError as exc:
        print(f"cwru: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for label in ("v1", "candidate"):
        r = result[label]
        per_seed = ", ".join(
            f"seed {s}: {v['mean_macro_f1']:.3f} (worst {v['min_macro_f1']:.3f})"
            for s, v in r["cross_size_by_seed"].items()
        )
        cb = r["cross_bearing"]
        print(f"{label} ({r['features']} features): cross-size macro-F1 {per_seed}")
        print(
            f"  cross-bearing (seed {args.seeds[-1]}): macro-F1 {cb['macro_f1']:.3f}, recall per bearing {cb['recall']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
