"""Calibration and evaluation sets on disk: ``.npz`` with ``x`` (and ``y``), written byte-reproducibly.

- ``x``: float32 ``(n, F)`` feature rows in the model's feature order (``manifest.feature_names``).
- ``y`` (evaluation sets only): int64 ``(n,)``; class ids (index into ``class_names``) for a classifier,
  0 = normal / 1 = anomalous for an anomaly model.

``pdm-agent train`` writes ``calibration.npz`` (training rows) and ``eval.npz`` (held-out rows) next to
each model; ``pdm-agent model quantize`` reads them.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION_FILE = "calibration.npz"
EVAL_FILE = "eval.npz"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class DataError(ValueError):
    """A calibration or evaluation file that is missing or not in the documented format."""


@dataclass(frozen=True, slots=True)
class Rows:
    """Feature rows ``x`` float32 ``(n, F)`` and, for evaluation, labels ``y`` int64 ``(n,)``."""

    x: np.ndarray
    y: np.ndarray | None = None


def save_rows(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    """Write ``x`` (and ``y``) as ``.npz`` with fixed zip timestamps, so equal arrays give equal bytes."""
    arrays = {"x": np.ascontiguousarray(x, dtype=np.float32)}
    if y is not None:
        arrays["y"] = np.ascontiguousarray(y, dtype=np.int64)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    Path(path).write_bytes(buf.getvalue())
    return Path(path)


def load_rows(path: Path, n_features: int | None = None, labels: bool = False) -> Rows:
    """Read and check a rows file; raises ``DataError`` naming the file and the problem."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz:
                raise DataError(f"{path}: no array 'x' (float32 feature rows (n, F))")
            x = np.asarray(npz["x"])
            y = np.asarray(npz["y"]) if "y" in npz else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read as .npz: {exc}") from exc
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"{path}: 'x' must be a non-empty (n, F) array, got shape {x.shape}")
    if n_features is not None and x.shape[1] != n_features:
        raise DataError(f"{path}: 'x' has {x.shape[1]} columns, the model takes {n_features} features")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' has non-finite values")
    if labels:
        if y is None:
            raise DataError(f"{path}: no array 'y' (labels: class ids, or 0 normal / 1 anomalous)")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: 'y' must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}")
    return Rows(x.astype(np.float32), None if y is None else y.astype(np.int64))


def subsample(n: int, k: int) -> np.ndarray:
    """``k`` evenly spaced indices of ``range(n)`` (all of them when ``k >= n``); deterministic.

    >>> subsample(10, 4).tolist()
    [0, 3, 6, 9]
    """
    if k >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, k).round().astype(np.int64)
