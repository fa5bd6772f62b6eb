"""``type: image``: one camera image per message, as raw bytes or in a JSON envelope.

A camera publishes on a topic of its template (``camera.topic_template``, default
``factory/{site}/{line}/{machine}/camera``): the sensor is then the literal level, and the ``sensor`` tag of
the image is ``camera.sensor`` (a template with ``{sensor}`` takes it from the topic instead).

Payloads:

- raw JPEG, PNG or BMP bytes (what a smart camera's "publish snapshot" sends): the image's time is the
  arrival time;
- a JSON envelope ``{"v": 1, "ts": ..., "encoding": "jpeg"|"png"|"bmp", "data": "<base64>", "metadata":
  {...}}`` (``ts`` optional as in ``json_v1``: epoch seconds, ``ts_ns`` or RFC 3339; ``metadata``
  optional, at most ``MAX_METADATA_KEYS`` keys of short text or numbers, e.g. the part id or the exposure).

Every rejection is a ``DecodeError`` whose code is the image codec's (``empty``, ``too_large``,
``unsupported_format``, ``bad_dimensions``, ``truncated``, ``corrupt``) or the envelope's (``json``,
``version``, ``timestamp``, ``encoding``, ``shape``, ``name``): the ingest worker dead-letters and counts it.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any, Final

from agent import schema
from agent.decode.base import DecodeLimits, DecoderContext
from agent.decode.errors import DecodeError, describe_json, quote

# The envelope is read by the same JSON rules as json_v1 payloads (duplicate keys, huge numbers, nesting).
from agent.decode.json_v1 import SCHEMA_VERSION
from agent.decode.json_v1 import _check_version as check_version
from agent.decode.json_v1 import _parse_json as parse_json
from agent.decode.timestamps import parse_timestamp
from agent.decode.topic import TopicTemplate
from agent.images.codec import FORMATS, ImageLimits, ImageRejected, decode_image, sniff_format
from agent.records import Decoded, ImageFrame, Message, Source

DEFAULT_TEMPLATE: Final = "factory/{site}/{line}/{machine}/camera"
DEFAULT_SENSOR: Final = "camera"
MAX_METADATA_KEYS: Final = 16
MAX_METADATA_CHARS: Final = 256
_ENVELOPE_KEYS: Final = frozenset({"v", "ts", "ts_ns", "encoding", "data", "metadata"})


def image_limits(options: Any) -> ImageLimits:
    """The codec's limits from a ``camera`` config section (``None``: the defaults)."""
    if options is None:
        return ImageLimits()
    return ImageLimits(
        max_bytes=options.max_bytes,
        min_width=options.min_width,
        min_height=options.min_height,
        max_width=options.max_width,
        max_height=options.max_height,
        formats=frozenset(options.formats),
    )


class ImageDecoder:
    """Camera messages → one ``ImageFrame`` each (see the module docstring).

    Built from a ``DecoderContext`` whose ``options`` is the config's ``camera`` section (``None`` in tests:
    the defaults) and whose ``topic_template`` is the camera template. Ingest thread only; no state.
    """

    def __init__(self, context: DecoderContext) -> None:
        self._template = context.topic_template
        self._sensor = getattr(context.options, "sensor", DEFAULT_SENSOR)
        self._limits = image_limits(context.options)
        # The envelope's base64 text is 4/3 of the image plus the JSON around it.
        self._decode_limits = DecodeLimits(
            max_payload_bytes=self._limits.max_bytes * 4 // 3 + 4096,
            max_future_s=context.limits.max_future_s,
            min_time_ns=context.limits.min_time_ns,
        )
        # Exactly the camera topics: the main decoder's wider filter (factory/#) already brings the wrong ones.
        self._subscriptions = context.subscriptions or (self._template.subscription(),)

    def subscriptions(self) -> tuple[str, ...]:
        return self._subscriptions

    def decode(self, message: Message) -> list[Decoded]:
        source = self._source(message.topic)
        payload = message.payload
        if payload[:1] == b"{":
            data, time_ns, metadata = self._envelope(payload, message.received_ns)
        else:
            data, time_ns, metadata = payload, message.received_ns, {}
        try:
            image = decode_image(data, self._limits)
        except ImageRejected as exc:
            raise DecodeError(exc.code, exc.message) from None
        gray = image.gray
        gray.flags.writeable = False  # part of a frozen record
        return [
            ImageFrame(
                source=source,
                time_ns=time_ns,
                sha256=image.sha256,
                format=image.format,
                width=image.width,
                height=image.height,
                gray=gray,
                payload=bytes(data),
                metadata=metadata,
            )
        ]

    def _source(self, topic: str) -> Source:
        source = self._template.match(topic)
        if "sensor" in self._template.names:
            return source
        return Source((*source.tags, ("sensor", self._sensor)))

    def _envelope(self, payload: bytes, received_ns: int) -> tuple[bytes, int, dict[str, str]]:
        if len(payload) > self._decode_limits.max_payload_bytes:
            raise DecodeError(
                "too_large",
                f"JSON envelope is {len(payload):,} bytes, limit {self._decode_limits.max_payload_bytes:,}",
            )
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("not_utf8", f"JSON envelope is not valid UTF-8 at byte {exc.start}") from None
        doc = parse_json(text)
        if not isinstance(doc, dict):
            raise DecodeError("not_object", f"payload is {describe_json(doc)}; expected the image envelope")
        unknown = sorted(set(doc) - _ENVELOPE_KEYS)
        if unknown:
            raise DecodeError(
                "shape", f"unknown key(s) {', '.join(quote(k) for k in unknown[:5])} in the image envelope"
            )
        if "v" not in doc:
            raise DecodeError("version", f'the image envelope needs "v": {SCHEMA_VERSION}')
        check_version(doc["v"])
        time_ns = parse_timestamp(doc, received_ns, self._decode_limits)
        encoding = doc.get("encoding")
        if encoding not in FORMATS:
            raise DecodeError(
                "encoding", f"'encoding' must be one of {', '.join(sorted(FORMATS))}, got {describe_json(encoding)}"
            )
        data = doc.get("data")
        if not isinstance(data, str):
            raise DecodeError("encoding", f"'data' must be a base64 string, got {describe_json(data)}")
        try:
            image = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError("encoding", f"'data' is not valid base64 (standard alphabet, padded): {exc}") from None
        metadata = _metadata(doc.get("metadata"))
        sniffed = sniff_format(image)
        if sniffed is not None and sniffed != encoding:
            raise DecodeError("encoding", f"'encoding' says {encoding} but the data is {sniffed}")
        return image, time_ns, metadata


def _metadata(raw: object) -> dict[str, str]:
    """The envelope's metadata as text values (stored as string fields beside the image reference)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise DecodeError("shape", f"'metadata' must be an object, got {describe_json(raw)}")
    if len(raw) > MAX_METADATA_KEYS:
        raise DecodeError("shape", f"'metadata' has {len(raw)} keys, at most {MAX_METADATA_KEYS}")
    out: dict[str, str] = {}
    for key, value in raw.items():
        problem = schema.name_problem(key)
        if problem is not None or len(key) > 64:
            raise DecodeError("name", f"metadata key {quote(key)} {problem or 'is longer than 64 characters'}")
        if isinstance(value, bool) or value is None or isinstance(value, dict | list):
            raise DecodeError("value", f"metadata {quote(key)} must be text or a number, got {describe_json(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise DecodeError("value", f"metadata {quote(key)} is not finite")
        text = str(value)
        if len(text) > MAX_METADATA_CHARS:
            raise DecodeError("value", f"metadata {quote(key)} is longer than {MAX_METADATA_CHARS} characters")
        out[key] = text
    return out


def camera_template(template: str) -> TopicTemplate:
    """A camera topic template: ``{machine}`` required, ``{sensor}`` optional (``ValueError`` otherwise)."""
    return TopicTemplate(template, required=("machine",))
