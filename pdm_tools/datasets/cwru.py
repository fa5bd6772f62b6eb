"""CWRU bearing recordings as the defect classifier sees them: loaded, cut into windows, featurized.

The data directory holds ``index.json`` (one entry per recording: ``file``, ``kind``, ``load_hp``,
``rpm``, ``fs_hz``, ...) and one ``.npz`` per recording with ``de`` (drive-end acceleration, g), ``fs``
and ``rpm`` (see ``datasets/README.md``). Only numpy is used to read them. The folder is ``--data``, else
``$PDM_DATASETS/cwru`` or ``../shared/datasets/cwru`` (``default_data_dir``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.features.bearing import BearingFeatureSpec, bearing_features
from pdm_tools.datasets.paths import dataset_dir

CLASS_NAMES = ("normal", "inner_race", "outer_race", "ball")
FAULT_CLASSES = CLASS_NAMES[1:]
# Consecutive, disjoint parts of the healthy recording (CWRU has it at load 0 only); part k stands in
# for load k in the cross-load rotations, so healthy train and test windows never share a sample.
NORMAL_PARTS = 3
# Hop of the healthy training windows: 5 s of healthy data give few windows, so they overlap more.
NORMAL_TRAIN_HOP = 512


class DatasetError(Exception):
    """The data directory is missing or does not hold what ``index.json`` says."""


@dataclass(frozen=True)
class Recording:
    """One recording: ``samples`` float64 ``(n,)`` at ``rate_hz``, shaft speed ``rpm``.

    ``diameter_in``: the defect's diameter in inches (``None`` for healthy data or when not given).
    """

    file: str
    fault: str
    kind: str
    load_hp: int
    rpm: float
    rate_hz: float
    samples: np.ndarray
    diameter_in: float | None = None

    @property
    def label(self) -> int:
        return CLASS_NAMES.index(self.kind)


def default_data_dir() -> Path:
    """The CWRU folder when ``--data`` is not given (see ``pdm_tools.datasets.paths``)."""
    return dataset_dir("cwru")


def load_cwru(data_dir: Path) -> list[Recording]:
    """All recordings listed in ``data_dir/index.json``; raises ``DatasetError`` with the reason."""
    data_dir = Path(data_dir)
    index_path = data_dir / "index.json"
    if not index_path.is_file():
        raise DatasetError(
            f"{index_path} not found: point --data (or PDM_DATASETS) at the datasets folder holding cwru/"
        )
    try:
        entries = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{index_path}: cannot read: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{index_path}: expected a non-empty list of recordings")
    out = []
    for i, e in enumerate(entries):
        where = f"{index_path}[{i}]"
        try:
            kind = str(e["kind"])
            if kind not in CLASS_NAMES:
                raise DatasetError(f"{where}: kind {kind!r} is not one of {list(CLASS_NAMES)}")
            path = data_dir / str(e["file"])
            with np.load(path) as npz:
                samples = np.asarray(npz["de"], dtype=np.float64)
                rate = float(npz["fs"])
                rpm = float(npz["rpm"])
        except KeyError as exc:
            raise DatasetError(f"{where}: missing key {exc}") from exc
        except OSError as exc:
            raise DatasetError(f"{where}: cannot read {e.get('file')!r}: {exc}") from exc
        if samples.ndim != 1 or not np.isfinite(samples).all():
            raise DatasetError(f"{where}: 'de' must be a finite 1-D array")
        out.append(
            Recording(
                file=str(e["file"]),
                fault=str(e.get("fault", kind)),
                kind=kind,
                load_hp=int(e["load_hp"]),
                rpm=rpm,
                rate_hz=rate,
                samples=samples,
                diameter_in=None if e.get("diameter_in") is None else float(e["diameter_in"]),
            )
        )
    return out


def cut(samples: np.ndarray, window: int, hop: int) -> np.ndarray:
    """Windows ``(k, window)`` starting every ``hop`` samples (a partial last window is dropped).

    >>> cut(np.arange(10.0), 4, 3).tolist()
    [[0.0, 1.0, 2.0, 3.0], [3.0, 4.0, 5.0, 6.0], [6.0, 7.0, 8.0, 9.0]]
    """
    k = (len(samples) - window) // hop + 1
    if k <= 0:
        return np.empty((0, window), dtype=np.float64)
    return np.lib.stride_tricks.sliding_window_view(samples, window)[::hop][:k].astype(np.float64)


def normal_parts(rec: Recording, parts: int = NORMAL_PARTS) -> list[np.ndarray]:
    """The healthy recording split by time into ``parts`` consecutive, disjoint pieces."""
    return [rec.samples[idx] for idx in np.array_split(np.arange(len(rec.samples)), parts)]


def featurize(spec: BearingFeatureSpec, rec: Recording, samples: np.ndarray, hop: int) -> np.ndarray:
    """Bearing features of the windows of ``samples`` (a piece of ``rec``): float32 ``(k, F)``."""
    windows = cut(samples, spec.window_samples, hop)
    if len(windows) == 0:
        return np.empty((0, spec.n_features), dtype=np.float32)
    return bearing_features(spec, windows, np.full(len(windows), rec.rate_hz), np.full(len(windows), rec.rpm)).astype(
        np.float32
    )


def stack(blocks: Sequence[tuple[np.ndarray, int]], n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, label)`` blocks → ``x`` float32 ``(n, F)``, ``y`` int64 ``(n,)``."""
    if not blocks:
        return np.empty((0, n_features), np.float32), np.empty(0, np.int64)
    x = np.concatenate([b for b, _ in blocks]).astype(np.float32)
    y = np.concatenate([np.full(len(b), label, dtype=np.int64) for b, label in blocks])
    return x, y
