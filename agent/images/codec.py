"""One image payload → an 8-bit grayscale array, or a specific rejection; the only place that parses images.

Serving (the camera decoder, ``agent.decode.image``) and training/evaluation (``pdm_tools``) both read images
through ``decode_image``, so that a model never sees pixels prepared differently from those it was trained on.

Untrusted bytes are checked in the order that costs least first: the size of the payload, then the format
from its first bytes (only JPEG, PNG and BMP reach a Pillow decoder at all: fewer parsers exposed to a
camera or to whoever can publish on its topic), then the dimensions from the header, before a single pixel
is decompressed (a 100-byte PNG can claim 100 000 × 100 000 pixels: the decompression bomb), then a full
``verify`` + ``load`` that catches truncated and corrupt data. Pillow's own bomb guard
(``Image.MAX_IMAGE_PIXELS``) stays as a second line, but the limits here are far tighter and per config.

Codes of ``ImageRejected`` (stable: they label counters and dead letters): ``empty``, ``too_large``,
``unsupported_format``, ``bad_dimensions``, ``truncated``, ``corrupt``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Final, Literal, get_args

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageFormat = Literal["jpeg", "png", "bmp"]
FORMATS: Final[frozenset[str]] = frozenset(get_args(ImageFormat))

ImageRejectCode = Literal["empty", "too_large", "unsupported_format", "bad_dimensions", "truncated", "corrupt"]
REJECT_CODES: Final[frozenset[str]] = frozenset(get_args(ImageRejectCode))

# Magic numbers of the accepted formats and of those that cameras also send, so that a GIF or a TIFF is
# named in the error instead of reported as "corrupt".
_ACCEPTED_MAGIC: Final[tuple[tuple[bytes, ImageFormat], ...]] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
)
_OTHER_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"RIFF", "webp (or another RIFF container)"),
    (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"),
    (b"P5", "pgm"),
    (b"P6", "ppm"),
    (b"{", "json (not an image)"),
)
_PIL_FORMAT: Final[dict[ImageFormat, str]] = {"jpeg": "JPEG", "png": "PNG", "bmp": "BMP"}


@dataclass(frozen=True)
class ImageLimits:
    """Bounds that protect the agent from absurd images; anything beyond them is rejected, not resized."""

    max_bytes: int = 4 * 1024 * 1024
    """Payload bytes at most (``too_large``); checked before any parsing."""
    min_width: int = 8
    min_height: int = 8
    max_width: int = 4096
    max_height: int = 4096
    """Pixels per side (``bad_dimensions``); checked from the header, before the pixels are decompressed."""
    formats: frozenset[str] = FORMATS
    """Accepted formats (``unsupported_format`` otherwise), a subset of jpeg, png, bmp."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "min_width", "min_height", "max_width", "max_height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageLimits.{name} must be a positive integer, got {value!r}")
        if self.min_width > self.max_width or self.min_height > self.max_height:
            raise ValueError("ImageLimits: a minimum dimension is above its maximum")
        unknown = set(self.formats) - FORMATS
        if unknown or not self.formats:
            raise ValueError(
                f"ImageLimits.formats must be a non-empty subset of {sorted(FORMATS)}, got {sorted(self.formats)}"
            )


class ImageRejected(Exception):
    """An image payload that cannot be scored; permanent (the same bytes would fail the same way).

    >>> str(ImageRejected("too_large", "5000000 bytes > 4194304"))
    'too_large: 5000000 bytes > 4194304'
    """

    def __init__(self, code: ImageRejectCode, message: str) -> None:
        if code not in REJECT_CODES:
            raise ValueError(f"unknown image rejection code {code!r}")
        super().__init__(code, message)
        self.code: ImageRejectCode = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``gray`` is uint8 of shape (height, width); ``sha256`` is of the payload bytes."""

    gray: np.ndarray
    format: ImageFormat
    width: int
    height: int
    sha256: str


def sniff_format(data: bytes) -> str | None:
    """The format the first bytes announce (accepted ones as ``ImageFormat``), ``None`` if unknown.

    >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n...")
    'png'
    >>> sniff_format(b"GIF89a...")
    'gif'
    """
    for magic, name in _ACCEPTED_MAGIC + _OTHER_MAGIC:
        if data.startswith(magic):
            return name
    return None


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Decode one payload to grayscale, or raise ``ImageRejected`` with a stable code and a specific message."""
    if not data:
        raise ImageRejected("empty", "the payload has no bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > max_bytes {limits.max_bytes}")
    kind = sniff_format(data)
    if kind is None:
        raise ImageRejected("unsupported_format", f"not a JPEG, PNG or BMP image (starts with {data[:8]!r})")
    if kind not in FORMATS or kind not in limits.formats:
        raise ImageRejected(
            "unsupported_format", f"{kind} is not accepted (formats: {', '.join(sorted(limits.formats))})"
        )
    fmt: ImageFormat = kind  # type: ignore[assignment]  # checked against FORMATS just above
    pil_format = _PIL_FORMAT[fmt]
    width, height = _checked_size(data, fmt, pil_format, limits)
    try:
        with Image.open(io.BytesIO(data), formats=[pil_format]) as image:
            image.verify()  # checksums (PNG CRCs) and structure, without decoding
        with Image.open(io.BytesIO(data), formats=[pil_format]) as image:
            image.load()
            gray = _to_gray(image)
    except ImageRejected:
        raise
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError, ZeroDivisionError) as exc:
        raise _classify(fmt, exc) from None
    return DecodedImage(
        gray=gray,
        format=fmt,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _checked_size(data: bytes, fmt: ImageFormat, pil_format: str, limits: ImageLimits) -> tuple[int, int]:
    """The header's dimensions, within limits; no pixel is decoded yet."""
    try:
        # Pillow warns (DecompressionBombWarning) above Image.MAX_IMAGE_PIXELS and raises above twice that;
        # the configured limits below are far tighter. Filters are not touched: they are process-global.
        with Image.open(io.BytesIO(data), formats=[pil_format]) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise ImageRejected("bad_dimensions", f"{fmt} header claims a decompression bomb: {exc}") from None
    except (UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError) as exc:
        code: ImageRejectCode = "truncated" if len(data) < 64 or _says_truncated(exc) else "corrupt"
        raise ImageRejected(code, f"{fmt} header cannot be read: {_reason(exc)}") from None
    if not (limits.min_width <= width <= limits.max_width and limits.min_height <= height <= limits.max_height):
        raise ImageRejected(
            "bad_dimensions",
            f"{width}×{height} pixels outside {limits.min_width}–{limits.max_width} × "
            f"{limits.min_height}–{limits.max_height}",
        )
    return width, height


def _to_gray(image: Image.Image) -> np.ndarray:
    """8-bit luminance of any mode; 16-bit grayscale is scaled (not clipped) to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(wide.max()), 1.0)
        return np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8)
    if image.mode != "L":
        image = image.convert("L")
    return np.array(image, dtype=np.uint8)


def _says_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, EOFError) or "truncated" in text or "premature end" in text or "ran out" in text


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 160 else text[:160] + "…"


def _classify(fmt: ImageFormat, exc: BaseException) -> ImageRejected:
    if isinstance(exc, Image.DecompressionBombError):
        return ImageRejected("bad_dimensions", f"{fmt}: {exc}")
    if _says_truncated(exc):
        return ImageRejected("truncated", f"{fmt} data ends early: {_reason(exc)}")
    return ImageRejected("corrupt", f"{fmt} data cannot be decoded: {_reason(exc)}")
