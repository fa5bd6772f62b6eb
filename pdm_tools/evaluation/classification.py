"""Scores of a classifier's predictions: accuracy, macro-F1 per class and overall, and the confusion matrix.

Shared by the CWRU protocols (``pdm_tools.evaluation.cwru``) and the adaptation measurements
(``pdm_tools.evaluation.adaptation``), so every table of the defect classifier counts the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def scores(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the classes present in ``y`` or predicted) and the confusion matrix.

    >>> s = scores(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2)
    >>> s["accuracy"], s["macro_f1"], s["confusion"]
    (0.75, 0.733333, [[1, 1], [0, 2]])
    """
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    return scores_from_confusion(confusion)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, Any]:
    """The same scores from a confusion matrix (rows true, columns predicted), e.g. one pooled over folds.

    >>> scores_from_confusion(np.array([[1, 1], [0, 2]]))["macro_f1"]
    0.733333
    """
    k = len(confusion)
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    used = denom > 0
    return {
        "accuracy": _r(float(tp.sum() / max(1, int(confusion.sum())))),
        "macro_f1": _r(float(f1[used].mean())) if used.any() else 0.0,
        "f1_per_class": [_r(float(v)) for v in f1],
        "confusion": confusion.tolist(),
        "test_windows": int(confusion.sum()),
    }


def _r(value: float, digits: int = 6) -> float:
    return round(float(value), digits)
