"""A client's local rows, and the fleets the evaluation builds from a dataset.

A client holds feature rows (the bearing features the agent computes from its own vibration windows) with
their class labels, split by time into training rows and held-out rows. On disk that is one folder with
``rows.npz`` (``x``, ``y``, ``x_held``, ``y_held``, ``class_names``): what ``pdm-agent fleet client --data``
reads, and what the simulation writes for each virtual client. Only the row counts and the file's sha256
ever leave the machine (provenance), never the rows. Light imports: the ClientApp process of every
round starts from here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROWS_FILE = "rows.npz"
# A client refuses to send feature sums over fewer rows: a sum over one row is that row.
MIN_ROWS = 10


class ClientDataError(Exception):
    """The client's data folder is missing, unreadable or not rows of the model's features."""


@dataclass(frozen=True)
class ClientData:
    """One client's rows: training ``x`` float32 ``(n, F)`` / ``y`` int64 ``(n,)``, held-out ``x_held`` /
    ``y_held`` (later in time than the training rows), the class names the labels index, and ``name``."""

    name: str
    x: np.ndarray
    y: np.ndarray
    x_held: np.ndarray
    y_held: np.ndarray
    class_names: tuple[str, ...]

    def save(self, folder: Path) -> Path:
        """Write ``folder/rows.npz``; returns the folder."""
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / ROWS_FILE,
            x=self.x,
            y=self.y,
            x_held=self.x_held,
            y_held=self.y_held,
            class_names=np.array(self.class_names),
            name=np.array(self.name),
        )
        return folder


def load_client_data(folder: Path) -> ClientData:
    """The rows in ``folder/rows.npz``; ``ClientDataError`` names what is wrong."""
    path = Path(folder) / ROWS_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y", "x_held", "y_held", "class_names") if k not in npz.files]
            if missing:
                raise ClientDataError(f"{path}: missing arrays {missing}")
            data = ClientData(
                name=str(npz["name"]) if "name" in npz else Path(folder).name,
                x=np.asarray(npz["x"], np.float32),
                y=np.asarray(npz["y"], np.int64),
                x_held=np.asarray(npz["x_held"], np.float32),
                y_held=np.asarray(npz["y_held"], np.int64),
                class_names=tuple(str(c) for c in npz["class_names"]),
            )
    except (OSError, ValueError) as exc:
        raise ClientDataError(f"{path}: cannot read: {exc}") from exc
    for xs, ys, what in ((data.x, data.y, "x/y"), (data.x_held, data.y_held, "x_held/y_held")):
        if xs.ndim != 2 or ys.shape != (len(xs),) or not np.isfinite(xs).all():
            raise ClientDataError(
                f"{path}: {what} must be finite rows (n, F) with n labels, got {xs.shape}, {ys.shape}"
            )
        if len(ys) and (ys.min() < 0 or ys.max() >= len(data.class_names)):
            raise ClientDataError(f"{path}: {what} labels outside 0..{len(data.class_names) - 1}")
    if data.x.shape[1] != data.x_held.shape[1]:
        raise ClientDataError(f"{path}: x has {data.x.shape[1]} features, x_held {data.x_held.shape[1]}")
    return data


def data_sha256(folder: Path) -> str:
    """sha256 of the client's rows file: provenance that names the data without revealing it."""
    return hashlib.sha256((Path(folder) / ROWS_FILE).read_bytes()).hexdigest()
