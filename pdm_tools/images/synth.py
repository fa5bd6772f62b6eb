"""Synthetic steel-surface images, seeded: textures that imitate the six NEU classes, for demos and tests.

Not a stand-in for the dataset: the shipped model was trained on real NEU images and recognises only some
of these reliably (``docs/results_neu.md`` gives what it says about each generated class). They let the
camera simulator, the demo and the tests run without the dataset: same seed, same bytes.

Each generator draws on a mottled grey background (smoothed noise, like rolled steel under the NEU
lighting) with Pillow's ``ImageDraw`` and a blur, and returns uint8 ``(size, size)``; ``encode`` turns a
frame into the payload a camera would publish.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pdm_tools.datasets.neu import CLASS_NAMES

SIZE = 200


def generate(class_name: str, seed: int, size: int = SIZE) -> np.ndarray:
    """One uint8 ``(size, size)`` frame imitating ``class_name`` (one of ``CLASS_NAMES``); deterministic."""
    if class_name not in _GENERATORS:
        raise ValueError(f"unknown class {class_name!r}; one of {list(CLASS_NAMES)}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    rng = np.random.default_rng([seed, CLASS_NAMES.index(class_name)])
    return _GENERATORS[class_name](rng, size)


def encode(gray: np.ndarray, fmt: str = "png") -> bytes:
    """A frame as the bytes of a PNG, JPEG (quality 90) or BMP file."""
    out = io.BytesIO()
    image = Image.fromarray(gray)
    if fmt == "jpeg":
        image.save(out, format="JPEG", quality=90)
    elif fmt in ("png", "bmp"):
        image.save(out, format=fmt.upper())
    else:
        raise ValueError(f"format must be png, jpeg or bmp, got {fmt!r}")
    return out.getvalue()


def _background(rng: np.random.Generator, size: int, level: float = 120, spread: float = 12) -> Image.Image:
    """Mottled grey with faint streaks along the rolling direction (vertical, as in every NEU image)."""
    coarse = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1))
    low = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))
    streaks = np.repeat(rng.normal(0, 1, (1, size)), size, axis=0)
    fine = rng.normal(0, 1, (size, size))
    x = level + spread * low + 0.6 * spread * streaks + 0.5 * spread * fine
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def _finish(image: Image.Image, rng: np.random.Generator, blur: float = 0.8) -> np.ndarray:
    x = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    x += rng.normal(0, 3, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def _scratches(rng: np.random.Generator, size: int) -> np.ndarray:
    """A few long, thin, bright lines along the rolling direction on a dark strip."""
    image = _background(rng, size, level=80, spread=10)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        a = rng.uniform(0.1, 0.9) * size
        b = a + rng.uniform(-0.03, 0.03) * size
        lo, hi = rng.uniform(0, 0.3) * size, rng.uniform(0.7, 1) * size
        draw.line([(a, lo), (b, hi)], fill=int(rng.integers(180, 240)), width=int(rng.integers(2, 6)))
    return _finish(image, rng)


def _crazing(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dense net of short dark cracks in every direction (fine, low contrast)."""
    image = _background(rng, size, level=110, spread=8)
    draw = ImageDraw.Draw(image)
    for _ in range(size * 2):
        x, y = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(3, 10)
        dx, dy = length * np.cos(angle), length * np.sin(angle)
        draw.line([(x, y), (x + dx, y + dy)], fill=int(rng.integers(60, 90)), width=1)
    return _finish(image, rng, blur=0.6)


def _patches(rng: np.random.Generator, size: int) -> np.ndarray:
    """Large dark irregular blobs: thresholded smooth noise."""
    image = np.asarray(_background(rng, size, level=170, spread=20), dtype=np.float32)
    field = rng.normal(0, 1, (size // 20 + 1, size // 20 + 1)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC))
    mask = smooth > np.quantile(smooth, rng.uniform(0.6, 0.8))
    image = np.where(mask, image * 0.3, image)
    return _finish(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), rng, blur=2.0)


def _pitted_surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """Many small round dark pits scattered over the surface."""
    image = _background(rng, size, level=200, spread=10)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(size // 4, size // 2))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(1, 3.5)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.integers(110, 160)))
    return _finish(image, rng)


def _inclusion(rng: np.random.Generator, size: int) -> np.ndarray:
    """A few elongated dark streaks along the rolling direction."""
    image = _background(rng, size, level=95, spread=6)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.uniform(0.1, 0.9, 2) * size
        w, h = rng.uniform(2, 5), rng.uniform(10, 35)
        draw.ellipse([x - w, y - h, x + w, y + h], fill=int(rng.integers(50, 75)))
    return _finish(image, rng, blur=1.2)


def _rolled_in_scale(rng: np.random.Generator, size: int) -> np.ndarray:
    """Flaky scale pressed into the surface: many small irregular dark and bright flecks."""
    image = _background(rng, size, level=120, spread=18)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(size // 2, size))):
        x, y = rng.uniform(0, size, 2)
        pts = [(x + rng.uniform(-4, 4), y + rng.uniform(-3, 3)) for _ in range(4)]
        draw.polygon(pts, fill=int(rng.choice([55, 190])))
    return _finish(image, rng, blur=1.0)


_GENERATORS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "crazing": _crazing,
    "inclusion": _inclusion,
    "patches": _patches,
    "pitted_surface": _pitted_surface,
    "rolled-in_scale": _rolled_in_scale,
    "scratches": _scratches,
}
