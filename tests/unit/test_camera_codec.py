"""``agent.images.codec``: every bad payload is rejected with its specific code, good ones decode to uint8 gray."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from agent.images.codec import ImageLimits, ImageRejected, decode_image, sniff_format


def _encode(array: np.ndarray, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **options)
    return out.getvalue()


def _rgb(height: int = 40, width: int = 56) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` × ``height`` but whose data is a few bytes: a decompression bomb's
    header, without the megabytes a real one would take to build."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


DEFAULT_LIMITS = ImageLimits()


def _code(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, limits)
    assert caught.value.message, "a rejection says what is wrong"
    return caught.value.code


@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "jpeg"), ("PNG", "png"), ("BMP", "bmp")])
def test_accepted_formats_decode_to_uint8_gray_of_the_image_size(fmt: str, name: str) -> None:
    rgb = _rgb()
    data = _encode(rgb, fmt)
    image = decode_image(data)
    assert image.format == name
    assert (image.width, image.height) == (56, 40)
    assert image.gray.shape == (40, 56)
    assert image.gray.dtype == np.uint8
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    if fmt != "JPEG":  # lossless: the same luminance Pillow computes
        expected = np.asarray(Image.fromarray(rgb).convert("L"))
        assert np.array_equal(image.gray, expected)


def test_grayscale_png_keeps_its_pixels_exactly() -> None:
    gray = np.arange(40 * 56, dtype=np.uint32).reshape(40, 56).astype(np.uint8)
    assert np.array_equal(decode_image(_encode(gray, "PNG")).gray, gray)


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped() -> None:
    wide = np.full((16, 16), 65535, dtype=np.uint16)
    wide[0, 0] = 0
    gray = decode_image(_encode(wide, "PNG")).gray
    assert gray.dtype == np.uint8
    assert gray[0, 0] == 0 and gray[1, 1] == 255


def test_empty_payload_is_rejected_as_empty() -> None:
    assert _code(b"") == "empty"


def test_payload_over_max_bytes_is_rejected_before_parsing() -> None:
    data = _encode(_rgb(), "PNG")
    assert _code(data, ImageLimits(max_bytes=len(data) - 1)) == "too_large"
    decode_image(data, ImageLimits(max_bytes=len(data)))


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP"])
def test_other_image_formats_are_named_as_unsupported(fmt: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(_encode(_rgb(), fmt))
    assert caught.value.code == "unsupported_format"
    assert fmt.lower() in caught.value.message


def test_bytes_that_are_no_image_are_unsupported_format() -> None:
    assert _code(b"hello, this is not a picture") == "unsupported_format"
    assert _code(b'{"v":1}') == "unsupported_format"


def test_a_format_left_out_of_the_limits_is_refused() -> None:
    data = _encode(_rgb(), "BMP")
    assert _code(data, ImageLimits(formats=frozenset({"jpeg", "png"}))) == "unsupported_format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.95])
def test_truncated_images_are_rejected_as_truncated(fmt: str, keep: float) -> None:
    data = _encode(_rgb(), fmt)
    assert _code(data[: int(len(data) * keep)]) == "truncated"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
def test_only_the_magic_number_is_truncated(fmt: str) -> None:
    data = _encode(_rgb(), fmt)
    assert _code(data[:12]) in {"truncated", "corrupt"}


def test_png_with_damaged_data_fails_its_checksum_as_corrupt() -> None:
    data = bytearray(_encode(_rgb(), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    assert _code(bytes(data)) == "corrupt"


def test_jpeg_with_a_garbled_header_is_corrupt() -> None:
    data = bytearray(_encode(_rgb(), "JPEG"))
    data[3:40] = b"\x00" * 37  # the APP0/DQT segments after the SOI marker
    assert _code(bytes(data)) in {"corrupt", "truncated"}


def test_dimensions_over_the_limits_are_rejected_from_the_header() -> None:
    assert _code(_png_header_only(5000, 100)) == "bad_dimensions"
    assert _code(_png_header_only(100, 5000)) == "bad_dimensions"
    assert _code(_encode(_rgb(4, 40), "PNG")) == "bad_dimensions"  # below min_height 8


def test_decompression_bomb_header_is_rejected_without_decoding() -> None:
    # 100 000 × 100 000 would be 10 GB of pixels; the payload is under 100 bytes.
    bomb = _png_header_only(100_000, 100_000)
    assert len(bomb) < 100
    with pytest.raises(ImageRejected) as caught:
        decode_image(bomb, ImageLimits(max_width=200_000, max_height=200_000))
    assert caught.value.code == "bad_dimensions"


def test_real_bomb_within_pillow_limit_is_rejected_by_ours() -> None:
    data = _encode(np.zeros((4100, 64), dtype=np.uint8), "PNG")  # compresses to a few kB
    assert len(data) < 20_000
    assert _code(data) == "bad_dimensions"


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValueError, match="minimum"):
        ImageLimits(min_width=100, max_width=50)
    with pytest.raises(ValueError, match="formats"):
        ImageLimits(formats=frozenset({"gif"}))


def test_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        ImageRejected("nope", "x")  # type: ignore[arg-type]


def test_sniff_names_formats_by_magic_number() -> None:
    assert sniff_format(_encode(_rgb(), "JPEG")) == "jpeg"
    assert sniff_format(_encode(_rgb(), "BMP")) == "bmp"
    assert sniff_format(b"\x00\x01") is None
