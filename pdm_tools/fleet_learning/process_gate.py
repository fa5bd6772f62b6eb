"""The quantization gate's accuracy metrics for the fleet autoencoder, measured on every client's own machines
as federated evaluation (no machine's data leaves it; only counts do).

After the last round the coordinator sends the fleet model once more with ``quantize`` set. Each client
exports it to ONNX FP32 (``pdm_tools.models.export``), quantizes it to INT8 (static QDQ,
``pdm_tools.quantization.static``, calibrated on its own commissioning windows plus copies stretched 8x
about their mean: the label-free headroom ``pdm_tools.evaluation.skab`` found necessary), thresholds each
variant per machine by the same rule (``threshold_factor`` x the largest commissioning score) and replies,
per variant, the confusion counts and a histogram of score / threshold on fixed bins for normal and
anomalous test steps, plus how many steps INT8 decides as FP32 does. The coordinator adds them up and
derives what the gate (``pdm_tools.quantization.gate``) checks for an anomaly model: the AUC (from the
pooled histograms) and the detection rate at the operating point (each machine's own threshold) of INT8
against FP32.

Latency is not part of it: it belongs to the device that ships the model and is measured there by the
shipping gate, not averaged over a fleet; the verdict here is the gate's accuracy rules only.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdm_tools.evaluation.skab import Confusion
from pdm_tools.fleet_learning.process import Series, rms_score
from pdm_tools.models.autoencoder import Autoencoder
from pdm_tools.models.export import export_onnx
from pdm_tools.quantization import gate
from pdm_tools.quantization import static as q

VARIANTS = ("fp32", "int8")
CALIBRATION_STRETCH = 8.0
# Bins of score / threshold (log-spaced; below and above caught): what the pooled AUC is computed from.
RATIO_EDGES = np.concatenate([[0.0], np.geomspace(1e-2, 1e2, 121), [np.inf]])


def gate_counts(model: Autoencoder, series: Sequence[Series], factor: float) -> dict[str, int | list[int]]:
    """What one client replies (module docstring): ``{variant}-tp/fp/fn/tn``, ``{variant}-hist-pos/neg``,
    ``int8-agree``, ``steps``."""
    train = np.concatenate([s.train for s in series]).astype(np.float32)
    centre = train.mean(axis=0)
    calibration = np.concatenate([train, centre + CALIBRATION_STRETCH * (train - centre)])
    out: dict[str, int | list[int]] = {}
    flags: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="pdm-fleet-gate-") as tmp:
        paths = {"fp32": export_onnx(model, Path(tmp) / "fp32.onnx"), "int8": Path(tmp) / "int8.onnx"}
        q.quantize(paths["fp32"], paths["int8"], calibration, q.QuantizeConfig())
        for name, path in paths.items():
            sess = q.session(path)
            total = Confusion()
            pos = np.zeros(len(RATIO_EDGES) - 1, np.int64)
            neg = np.zeros_like(pos)
            flags[name] = []
            for s in series:
                # The graph's score is the mean squared error; its square root is the fleet model's RMS score.
                threshold = factor * float(np.sqrt(q.run_scores(sess, s.train).max()))
                ratio = np.sqrt(q.run_scores(sess, s.test).astype(np.float64)) / threshold
                f = ratio > 1.0
                flags[name].append(f)
                total = total + Confusion.of(f, s.labels)
                pos += np.histogram(ratio[s.labels], RATIO_EDGES)[0]
                neg += np.histogram(ratio[~s.labels], RATIO_EDGES)[0]
            out.update({f"{name}-{k}": getattr(total, k) for k in ("tp", "fp", "fn", "tn")})
            out[f"{name}-hist-pos"], out[f"{name}-hist-neg"] = pos.tolist(), neg.tolist()
    out["int8-agree"] = int(sum((a == b).sum() for a, b in zip(flags["fp32"], flags["int8"], strict=True)))
    out["steps"] = int(sum(len(s.test) for s in series))
    return out


def ratio_histogram(model: Autoencoder, series: Sequence[Series]) -> list[int]:
    """The held-out steps of a client's machines on ``RATIO_EDGES``: each step's RMS score over its machine's
    largest commissioning RMS score (what the fleet's threshold factor multiplies; ``heldout_factor``)."""
    counts = np.zeros(len(RATIO_EDGES) - 1, np.int64)
    for i, s in enumerate(series):
        top = float(rms_score(model, s.train).max()) if len(s.train) else math.nan
        if not math.isfinite(top) or top <= 0:
            raise ValueError(
                f"machine {i}: its largest commissioning score is {top} (no commissioning windows, or the model "
                "reconstructs them exactly, or a non-finite score): no held-out ratio can be formed against it"
            )
        counts += np.histogram(rms_score(model, s.test) / top, RATIO_EDGES)[0]
    return counts.tolist()


QUANTILE = 0.999  # of a client's held-out ratios: where its normal operation ends (``heldout_factor``)


def quantile_edge(hist: Sequence[int], quantile: float = QUANTILE) -> float:
    """The upper edge of the ``RATIO_EDGES`` bin holding the ``quantile`` of ``hist`` (inf past the last edge,
    NaN for an empty histogram).

    >>> quantile_edge([0] * 60 + [10] + [0] * 61), quantile_edge([0] * 122)
    (1.0, nan)
    """
    counts = np.asarray(hist, np.int64)
    if counts.sum() == 0:
        return float("nan")
    return float(RATIO_EDGES[int(np.searchsorted(np.cumsum(counts), quantile * counts.sum())) + 1])


def heldout_factor(hist: Sequence[int], edges: Sequence[float], floor: float, margin: float = 1.5) -> dict[str, Any]:
    """The fleet's threshold factor from the clients' held-out steps (``ratio_histogram``): ``margin`` x the
    median over the clients of their ``QUANTILE`` (``edges``, each client's ``quantile_edge``), never below
    ``floor``. The median, so that a minority of clients whose held-out steps are faulty does not raise
    everyone's threshold. ``hist``, the clients' histograms summed, says how many held-out steps lie in bins
    reaching above the factor (at most that many would have alarmed). ``ValueError`` when no client reported
    a held-out step, or the median lies beyond the last finite edge.

    >>> [round(heldout_factor([10] * 122, edges, 2.4)["factor"], 3) for edges in ([1.0, 1.0, 80.0], [3.0] * 3)]
    [2.4, 4.5]
    """
    counts = np.asarray(hist, np.int64)
    known = [e for e in edges if not np.isnan(e)]
    if int(counts.sum()) == 0 or not known:
        raise ValueError("no client reported a held-out step: nothing to derive the threshold from")
    median = float(np.median(known))
    if not np.isfinite(median):
        raise ValueError(
            f"most clients' held-out steps reach beyond {RATIO_EDGES[-2]:g}x their commissioning maximum at the "
            f"{QUANTILE:g} quantile: no sensible threshold"
        )
    factor = max(floor, margin * median)
    return {
        "factor": factor,
        "rule": f"max({floor:g}, {margin:g} x the median over the clients of their {QUANTILE:g} quantile of "
        "held-out score / their machine's largest commissioning score (upper bin edge))",
        "client_quantile_edges": [round(e, 4) if np.isfinite(e) else None for e in sorted(known)],
        "heldout_steps": int(counts.sum()),
        "heldout_steps_above_at_most": int(counts[RATIO_EDGES[1:] > factor].sum()),
    }


def binned_auc(pos: Sequence[int], neg: Sequence[int]) -> float:
    """P(an anomalous step scores above a normal one), ties within a bin counted half.

    >>> binned_auc([0, 0, 5], [5, 0, 0]), binned_auc([1, 1], [1, 1])
    (1.0, 0.5)
    """
    p, n = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if p.sum() == 0 or n.sum() == 0:
        return float("nan")
    below = np.concatenate([[0.0], np.cumsum(n)[:-1]])
    return float((p * (below + 0.5 * n)).sum() / (p.sum() * n.sum()))


def gate_report(totals: Mapping[str, Any], criteria: gate.Criteria | None = None) -> dict[str, Any]:
    """The fleet's summed gate counts as each variant's F1/FAR/MAR, AUC and detection rate, INT8's deltas
    against FP32 and the gate's accuracy verdict."""
    criteria = criteria or gate.Criteria()
    out: dict[str, Any] = {}
    for name in VARIANTS:
        c = Confusion(*(int(totals[f"{name}-{k}"]) for k in ("tp", "fp", "fn", "tn")))
        auc = binned_auc(totals[f"{name}-hist-pos"], totals[f"{name}-hist-neg"])
        detection = 100.0 * c.tp / (c.tp + c.fn) if c.tp + c.fn else float("nan")
        out[name] = {**c.to_dict(), "auc": round(auc, 4), "detection_rate": round(detection, 2)}
    metrics = {
        "auc_delta": out["int8"]["auc"] - out["fp32"]["auc"],
        "detection_delta_points": out["int8"]["detection_rate"] - out["fp32"]["detection_rate"],
    }
    # Equal latencies: the verdict is the accuracy rules' alone (latency is the shipping device's to measure).
    parent = gate.Measured("fp32", 32, 0, 1.0, 1.0)
    verdict = gate.check(gate.Measured("int8", 8, 0, 1.0, 1.0, metrics), parent, "anomaly", criteria)
    steps = int(totals["steps"])
    out["int8_vs_fp32"] = {
        "auc_delta": round(metrics["auc_delta"], 4),
        "detection_delta_points": round(metrics["detection_delta_points"], 2),
        "decision_agreement": round(int(totals["int8-agree"]) / steps, 4) if steps else None,
        "accuracy_rules_passed": verdict.passed,
        "reasons": list(verdict.reasons) if not verdict.passed else ["passes the gate's accuracy rules"],
    }
    out["calibration"] = (
        f"each client's commissioning windows plus copies stretched {CALIBRATION_STRETCH:g}x about their mean"
    )
    return out
