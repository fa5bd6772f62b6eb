"""The camera decoder (``agent.decode.image``) and the topic routes that put it beside the main decoder."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from agent.config import parse_config
from agent.config.errors import ConfigError
from agent.decode.base import DecodeLimits, DecoderContext
from agent.decode.errors import DecodeError
from agent.decode.image import ImageDecoder, camera_template
from agent.decode.json_v1 import JsonV1Decoder
from agent.decode.routes import Routes, topic_matches
from agent.decode.topic import TopicTemplate
from agent.records import NS_PER_S, ImageFrame, Message, Reading

T0 = 1_790_000_000 * NS_PER_S
TOPIC = "factory/s1/l1/press-7/camera"


def _image(fmt: str = "PNG", size: tuple[int, int] = (24, 32)) -> bytes:
    out = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, size=size, dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def _decoder(**camera: object) -> ImageDecoder:
    section = parse_config({"camera": {"enabled": True, **camera}}).camera
    return ImageDecoder(DecoderContext(camera_template(section.topic_template), options=section))


def _decode(payload: bytes, decoder: ImageDecoder | None = None, topic: str = TOPIC) -> ImageFrame:
    (frame,) = (decoder or _decoder()).decode(Message(topic, payload, 1, 1, T0))
    assert isinstance(frame, ImageFrame)
    return frame


def _reject(payload: bytes, decoder: ImageDecoder | None = None, topic: str = TOPIC) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        (decoder or _decoder()).decode(Message(topic, payload, 1, 1, T0))
    assert caught.value.detail
    return caught.value


def _envelope(data: bytes, **extra: object) -> bytes:
    doc: dict[str, object] = {"v": 1, "encoding": "png", "data": base64.b64encode(data).decode()}
    doc.update(extra)
    return json.dumps(doc).encode()


def test_raw_png_becomes_a_frame_with_the_camera_sensor_and_arrival_time() -> None:
    data = _image()
    frame = _decode(data)
    assert frame.source.as_dict() == {"site": "s1", "line": "l1", "machine": "press-7", "sensor": "camera"}
    assert frame.time_ns == T0
    assert (frame.width, frame.height, frame.format) == (32, 24, "png")
    assert frame.gray.shape == (24, 32) and not frame.gray.flags.writeable
    assert frame.payload == data and frame.metadata == {}


def test_raw_jpeg_is_accepted() -> None:
    assert _decode(_image("JPEG")).format == "jpeg"


def test_envelope_gives_time_and_metadata() -> None:
    data = _image()
    frame = _decode(_envelope(data, ts="2026-09-21T12:00:00Z", metadata={"part": "A-17", "exposure_ms": 4}))
    assert frame.payload == data
    assert frame.time_ns == 1_789_992_000 * NS_PER_S
    assert frame.metadata == {"part": "A-17", "exposure_ms": "4"}


def test_a_template_with_sensor_takes_it_from_the_topic() -> None:
    decoder = _decoder(topic_template="cams/{machine}/{sensor}")
    assert _decode(_image(), decoder, topic="cams/m1/top").source.sensor == "top"


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        (b"", "empty", "no bytes"),
        (b"GIF89a" + b"\x00" * 40, "unsupported_format", "gif"),
        (b"plain text", "unsupported_format", "not a JPEG"),
        (_image()[:40], "truncated", "png"),
        (_image("BMP")[:-100], "truncated", "bmp"),
        (_envelope(_image(), v=2), "version", "version"),
        (_envelope(_image(), encoding="gif"), "encoding", "'encoding'"),
        (_envelope(_image(), encoding="jpeg"), "encoding", "says jpeg but the data is png"),
        (json.dumps({"v": 1, "encoding": "png", "data": "!!"}).encode(), "encoding", "base64"),
        (json.dumps({"v": 1, "encoding": "png"}).encode(), "encoding", "'data'"),
        (_envelope(_image(), extra=1), "shape", "unknown key"),
        (_envelope(_image(), metadata=[1]), "shape", "'metadata' must be an object"),
        (_envelope(_image(), metadata={"a": {"b": 1}}), "value", "text or a number"),
        (_envelope(_image(), ts="1970-01-01T00:00:00Z"), "timestamp", "before"),
        (b'{"v":1,', "json", "invalid JSON"),
    ],
)
def test_bad_payloads_are_rejected_with_their_reason(payload: bytes, code: str, fragment: str) -> None:
    error = _reject(payload)
    assert (error.code, fragment in error.detail) == (code, True), error.detail


def test_limits_come_from_the_camera_section() -> None:
    data = _image(size=(24, 32))
    assert _reject(data, _decoder(max_bytes=len(data) - 1)).code == "too_large"
    assert _reject(data, _decoder(max_width=16)).code == "bad_dimensions"
    assert _reject(data, _decoder(formats=["jpeg"])).code == "unsupported_format"


def test_a_topic_off_the_template_is_a_topic_error() -> None:
    assert _reject(_image(), topic="factory/s1/press-7/camera").code == "topic"


def test_camera_template_needs_machine_but_not_sensor() -> None:
    assert camera_template("factory/{site}/{machine}/camera").names == ("site", "machine")
    with pytest.raises(ValueError, match="machine"):
        camera_template("factory/{site}/camera")
    with pytest.raises(ConfigError, match=r"camera\.topic_template"):
        parse_config({"camera": {"topic_template": "factory/{site}/camera"}})


def test_routes_send_camera_topics_to_the_camera_decoder_and_the_rest_to_the_main_one() -> None:
    main = JsonV1Decoder(DecoderContext(TopicTemplate("factory/{site}/{line}/{machine}/{sensor}")))
    routes = Routes([_decoder(), main])
    # One subscription: a broker delivers a message once per matching filter, the camera's is covered.
    assert routes.subscriptions() == ("factory/#",)
    exact = JsonV1Decoder(DecoderContext(TopicTemplate("plant/{machine}/{sensor}")))
    assert Routes([_decoder(), exact]).subscriptions() == ("factory/+/+/+/camera", "plant/#")
    (frame,) = routes.decode(Message(TOPIC, _image(), 1, 1, T0))
    assert isinstance(frame, ImageFrame)
    (reading,) = routes.decode(Message("factory/s1/l1/press-7/process", b'{"v":1,"value":2}', 1, 2, T0))
    assert isinstance(reading, Reading)
    # A camera topic with a wrong number of levels is the main decoder's, which rejects it.
    with pytest.raises(DecodeError):
        routes.decode(Message("factory/s1/camera", _image(), 1, 3, T0))


def test_the_envelope_size_limit_follows_the_image_limit() -> None:
    decoder = ImageDecoder(DecoderContext(camera_template("c/{machine}"), DecodeLimits()))
    big = _envelope(b"\x89PNG\r\n\x1a\n" + b"\x00" * (6 * 1024 * 1024))
    assert _reject(big, decoder, topic="c/m1").code == "too_large"


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("factory/+/+/+/camera", "factory/a/b/c/camera", True),
        ("factory/+/+/+/camera", "factory/a/b/c/process", False),
        ("factory/#", "factory/a/b/c/camera", True),
        ("factory/+", "factory/a/b", False),
        ("a/b", "a/b", True),
        ("+/b", "$SYS/b", False),
    ],
)
def test_topic_filter_matching(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_mutated_images_decode_or_are_rejected_never_another_exception(fmt: str) -> None:
    """Bit flips, truncations and spliced bytes over valid images: an ``ImageFrame`` or a ``DecodeError``."""
    rng = np.random.default_rng(11)
    valid = _image(fmt, size=(40, 48))
    decoder = _decoder()
    codes: set[str] = set()
    for i in range(300):
        data = bytearray(valid)
        kind = i % 3
        if kind == 0:
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                data[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            del data[int(rng.integers(1, len(data))) :]
        else:
            at = int(rng.integers(0, len(data)))
            data[at:at] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        try:
            frames = decoder.decode(Message(TOPIC, bytes(data), 1, i, T0))
        except DecodeError as exc:
            codes.add(exc.code)
            assert len(exc.detail) < 400
            continue
        assert isinstance(frames[0], ImageFrame) and frames[0].gray.dtype == np.uint8
    assert codes, "some mutations must be rejected"
