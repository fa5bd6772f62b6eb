"""NEU steel surface defect images as the image model sees them: decoded by the agent's codec, split by seed.

The folder (``--data``, else ``$PDM_DATASETS/neu`` or ``../shared/datasets/neu``) holds ``images/`` with
``<class>_<n>.jpg`` files (the class is the label; 416 x 416 JPEG in the shared mirror, 200 x 200
originally) and ``annotations/`` (VOC boxes, unused for classification). Files are decoded with
``agent.images.codec.decode_image``, the code the agent decodes camera payloads with, so training,
evaluation and serving read pixels the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.images.codec import ImageLimits, ImageRejected, decode_image
from pdm_tools.datasets.paths import dataset_dir

CLASS_NAMES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
_NAME = re.compile(r"(?P<cls>[a-z_-]+?)_(?P<n>\d+)\.(?:jpe?g|png|bmp)", re.IGNORECASE)


class DatasetError(Exception):
    """The data directory is missing, empty, or holds a file that is not a labelled NEU image."""


@dataclass(frozen=True)
class NeuImages:
    """Decoded images: ``grays[i]`` uint8 ``(H, W)`` of class ``labels[i]`` (index into ``CLASS_NAMES``)."""

    grays: list[np.ndarray]
    labels: np.ndarray
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.grays)

    def subset(self, index: np.ndarray) -> NeuImages:
        return NeuImages([self.grays[i] for i in index], self.labels[index], tuple(self.files[i] for i in index))


def default_data_dir() -> Path:
    return dataset_dir("neu")


def image_files(data: Path) -> list[tuple[Path, int]]:
    """``(path, class index)`` of every image in ``data/images`` (or ``data`` itself), sorted by name."""
    folder = data / "images" if (data / "images").is_dir() else data
    if not folder.is_dir():
        raise DatasetError(f"{data}: no such directory (the NEU images: see datasets/README.md)")
    out = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp"):
            continue
        match = _NAME.fullmatch(path.name)
        if match is None or match["cls"] not in CLASS_NAMES:
            raise DatasetError(f"{path}: not <class>_<n>.<ext> with a class among {list(CLASS_NAMES)}")
        out.append((path, CLASS_NAMES.index(match["cls"])))
    if not out:
        raise DatasetError(f"{folder}: no images")
    return out


def load_images(data: Path, limits: ImageLimits | None = None) -> NeuImages:
    """Decode every image of ``data``; ``DatasetError`` naming the file and the codec's reason on a bad one."""
    grays, labels, files = [], [], []
    for path, label in image_files(Path(data)):
        try:
            decoded = decode_image(path.read_bytes(), limits or ImageLimits())
        except ImageRejected as exc:
            raise DatasetError(f"{path}: {exc}") from exc
        grays.append(decoded.gray)
        labels.append(label)
        files.append(path.name)
    return NeuImages(grays, np.asarray(labels, dtype=np.int64), tuple(files))


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of ``len(fractions)`` disjoint parts holding each class in the same proportions (seeded).

    >>> parts = stratified_split(np.repeat(np.arange(3), 10), (0.6, 0.2, 0.2), seed=0)
    >>> [len(p) for p in parts], sorted(np.concatenate(parts).tolist()) == list(range(30))
    ([18, 6, 6], True)
    """
    if abs(sum(fractions) - 1) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.round(np.cumsum(fractions) * len(idx)).astype(int)
        for k, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)):
            parts[k].extend(idx[lo:hi].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
