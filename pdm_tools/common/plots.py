"""PNG figures of an evaluation (``pdm-agent evaluate ... --plots DIR``) and of the model cards
(``pdm_tools.common.modelcard``), drawn with matplotlib.

matplotlib is a dependency of the tools (``pip install 'pdm-agent[tools]'``), never of the edge runtime, and
is imported only when figures are asked for. Figures are written without a display (the Agg backend).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable("--plots needs matplotlib: pip install 'pdm-agent[tools]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def require() -> None:
    """Raise ``PlotsUnavailable`` now, before a long evaluation, rather than when its figures are drawn."""
    _pyplot()


def file_stem(name: str) -> str:
    """A file name part from a dataset file's name.

    >>> file_stem("valve1/0.csv")
    'valve1_0'
    """
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name.removesuffix(".csv")).strip("_")


def score_figure(
    path: Path,
    title: str,
    scores: np.ndarray,
    threshold: float,
    labels: np.ndarray,
    train_rows: int,
) -> Path:
    """The score of every row over time, the threshold, the labelled anomalies shaded and the commissioning
    (training) rows marked: where the detector fires against where the anomaly is."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=100)
    rows = np.arange(len(scores))
    ax.plot(rows, scores, lw=0.8, color="tab:blue", label="score")
    ax.axhline(threshold, color="tab:red", lw=1.0, ls="--", label=f"threshold {threshold:.3g}")
    ax.axvspan(0, train_rows, color="0.85", label="commissioning (training)")
    _shade(ax, labels.astype(bool), "tab:orange", "labelled anomaly")
    ax.set_xlabel("row (1 s each)")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small", ncols=4)
    return _save(plt, fig, path)


def confusion_figure(path: Path, title: str, matrix: np.ndarray, names: Sequence[str]) -> Path:
    """A confusion matrix: true classes down, predicted across, counts in the cells."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.1 * len(names) + 1.5), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max() if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(int(count)), ha="center", va="center", color="white" if count > top / 2 else "black")
    ax.set_title(title)
    return _save(plt, fig, path)


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates at every threshold, and the area under that curve (ties as one step).

    >>> fpr, tpr, auc = roc_points(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    >>> auc
    0.75
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids (numpy 1.26 too)


def roc_figure(path: Path, title: str, ratios: np.ndarray, labels: np.ndarray) -> Path:
    """The ROC curve of score / threshold over pooled rows, with the operating point (ratio 1) marked."""
    plt = _pyplot()
    finite = np.isfinite(ratios)
    ratios, labels = ratios[finite], labels[finite].astype(bool)
    fpr, tpr, auc = roc_points(ratios, labels)
    at = (
        float((ratios[~labels] > 1).mean()) if (~labels).any() else 0.0,
        float((ratios[labels] > 1).mean()) if labels.any() else 0.0,
    )
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=100)
    ax.plot(fpr, tpr, color="tab:blue", label=f"ROC (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    ax.plot(*at, "o", color="tab:red", label=f"threshold: FPR {at[0]:.1%}, TPR {at[1]:.1%}")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return _save(plt, fig, path)


def histogram_figure(path: Path, title: str, groups: Mapping[str, np.ndarray], threshold: float, xlabel: str) -> Path:
    """Histograms of a score per group (healthy, faulty) on a log axis, with the threshold: how far apart the
    groups are and which side of the threshold each falls."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    values = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in groups.values()] or [np.ones(1)])
    lo, hi = float(values.min(initial=threshold)), float(values.max(initial=threshold))
    bins = np.geomspace(min(lo, threshold) * 0.9, max(hi, threshold) * 1.1, 60)
    for name, v in groups.items():
        v = v[np.isfinite(v) & (v > 0)]
        above = float((v > threshold).mean()) if len(v) else 0.0
        ax.hist(v, bins=bins, alpha=0.55, label=f"{name}: {len(v)} rows, {above:.1%} above")
    ax.axvline(threshold, color="tab:red", lw=1.0, ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    return _save(plt, fig, path)


def agreement_figure(
    path: Path,
    title: str,
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    xlabel: str,
    ylabel: str,
) -> Path:
    """Quantized against full-precision outputs, one point per output and one colour per series (a class's
    probability, an INT8 variant): on the diagonal where quantization changed nothing, so the spread off it
    is the error the tables summarise in one number. Log axes when the outputs are positive and span more
    than two decades (anomaly scores)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=100)
    finite = [(name, x[ok], y[ok]) for name, (x, y) in series.items() for ok in [np.isfinite(x) & np.isfinite(y)]]
    values = np.concatenate([np.r_[x, y] for _, x, y in finite]) if finite else np.zeros(1)
    lo, hi = float(values.min()), float(values.max())
    for name, x, y in finite:
        err = float(np.abs(y - x).max()) if len(x) else 0.0
        ax.scatter(x, y, s=4, alpha=0.5, linewidths=0, rasterized=True, label=f"{name} (max |diff| {err:.3g})")
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls=":")
    if lo > 0 and hi / lo > 100:  # scores over decades: healthy rows would sit in one corner on a linear axis
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small", markerscale=3)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Write the figure and free it (pyplot keeps every open figure alive otherwise)."""
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no matplotlib version in the bytes of committed figures
    plt.close(fig)
    return path


def _shade(ax: Any, mask: np.ndarray, color: str, label: str) -> None:
    """Shade every run of True in ``mask`` (one legend entry)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    for n, (start, end) in enumerate(zip(edges[::2], edges[1::2], strict=True)):
        ax.axvspan(start, end, color=color, alpha=0.25, label=label if n == 0 else None)
