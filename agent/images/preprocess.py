"""Image preprocessing shared by training and serving: a grayscale frame in, the model's input tensor out.

Camera frames (and the NEU files: 200 x 200 originally, 416 x 416 in the shared mirror) are resized to a
square ``size`` with an area filter (Pillow's ``BOX``: every source pixel counts once, so a downscale does
not alias fine texture such as crazing), then standardised per image (zero mean, unit variance): a
camera's exposure or gain must not move the input, the defect classes differ in texture and shape.

Training (``pdm_tools.images``) and serving (``agent.inference.image``) call the same ``prepare``. The
``ImageSpec`` recorded in a model's manifest (and its hash) names these parameters and the code version,
so a model never meets inputs prepared differently than the ones it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# Bump when ``prepare`` changes what it computes: models trained before then are refused at load.
IMAGE_PREPROCESS_VERSION = 1
RESAMPLE = "box"
NORMALIZE = "standardize"
MIN_SIZE, MAX_SIZE = 8, 1024
# A flat frame has no texture; its standard deviation is floored so that it maps to zeros, not NaN.
_STD_FLOOR = 1e-3
_KEYS = ("version", "size", "resample", "normalize")


def prepare(gray: np.ndarray, size: int) -> np.ndarray:
    """One uint8 ``(H, W)`` frame -> float32 ``(1, size, size)``: area-resized, zero mean, unit variance.

    Deterministic (no randomness, no dependence on the batch). ``ValueError`` for anything but a non-empty
    2-D uint8 array or a size outside ``[MIN_SIZE, MAX_SIZE]``.

    >>> x = prepare(np.arange(400, dtype=np.uint8).reshape(20, 20), 10)
    >>> x.shape, x.dtype, round(float(x.mean()), 6), round(float(x.std()), 4)
    ((1, 10, 10), dtype('float32'), 0.0, 1.0)
    """
    if not isinstance(gray, np.ndarray) or gray.dtype != np.uint8 or gray.ndim != 2 or 0 in gray.shape:
        raise ValueError(
            f"image must be a non-empty uint8 array of shape (H, W), got "
            f"{getattr(gray, 'dtype', type(gray).__name__)} {getattr(gray, 'shape', '')}"
        )
    _check_size(size)
    if gray.shape != (size, size):
        resized = Image.fromarray(np.ascontiguousarray(gray)).resize((size, size), Image.Resampling.BOX)
        x = np.asarray(resized, dtype=np.float32)
    else:
        x = gray.astype(np.float32)
    x /= 255.0
    x -= x.mean()
    x /= max(float(x.std()), _STD_FLOOR)
    return x.reshape(1, size, size)


def batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """Prepared images (each float32 ``(1, S, S)``, one S) -> one contiguous float32 ``(N, 1, S, S)``.

    ``ValueError`` on an empty sequence or images of different shapes (the model's input is square and
    fixed; mixing sizes is a caller's bug, not something to fix silently).
    """
    if len(images) == 0:
        raise ValueError("batch needs at least one image")
    first = images[0]
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.float32 or image.ndim != 3 or image.shape[0] != 1:
            raise ValueError(
                f"image {i}: expected float32 (1, S, S) from prepare(), got {getattr(image, 'shape', image)!r}"
            )
        if image.shape != first.shape:
            raise ValueError(f"image {i} has shape {image.shape}, image 0 has {first.shape}")
    return np.ascontiguousarray(np.stack(images))


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """How an image model's input is prepared: recorded in its manifest as ``feature_spec``.

    ``spec_hash()`` goes into the manifest beside it; ``agent.inference.manifest`` refuses a model whose
    spec does not hash to it, or whose ``version`` this agent's ``prepare`` does not compute.
    """

    size: int
    version: int = IMAGE_PREPROCESS_VERSION
    resample: str = RESAMPLE
    normalize: str = NORMALIZE

    def __post_init__(self) -> None:
        _check_size(self.size)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"version must be an int >= 1, got {self.version!r}")
        if self.resample != RESAMPLE or self.normalize != NORMALIZE:
            raise ValueError(
                f"resample/normalize must be {RESAMPLE!r}/{NORMALIZE!r} (the only ones prepare computes), "
                f"got {self.resample!r}/{self.normalize!r}"
            )

    def feature_names(self) -> tuple[str, ...]:
        """The manifest's ``feature_names``: one name, the graph input (a whole image, not columns)."""
        return ("image",)

    def prepare(self, gray: np.ndarray) -> np.ndarray:
        """``prepare(gray, self.size)``."""
        return prepare(gray, self.size)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "size": self.size, "resample": self.resample, "normalize": self.normalize}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageSpec:
        """Strict inverse of ``to_dict``: unknown or missing keys and invalid values raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"image spec must be a mapping, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _KEYS)
        missing = [k for k in _KEYS if k not in d]
        if unknown or missing:
            raise ValueError(f"image spec: unknown keys {unknown}, missing keys {missing}")
        return cls(size=d["size"], version=d["version"], resample=d["resample"], normalize=d["normalize"])

    def spec_hash(self) -> str:
        """sha256 hex digest of the spec's canonical JSON (sorted keys, no spaces; the version is part of it)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def is_supported(self) -> bool:
        return self.version == IMAGE_PREPROCESS_VERSION
