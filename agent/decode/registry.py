"""Payload decoders by the config's ``mqtt.decoder.type``.

A new input format is one module beside ``json_v1.py`` (a class implementing ``agent.decode.base.Decoder``,
built from a ``DecoderContext``) plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from agent.decode.base import Decoder, DecoderContext
from agent.decode.image import ImageDecoder
from agent.decode.json_v1 import JsonV1Decoder
from agent.decode.sparkplug_b import SparkplugBDecoder
from agent.plugins import registered

DecoderFactory = Callable[[DecoderContext], Decoder]

DECODERS: Mapping[str, DecoderFactory] = {
    "json_v1": JsonV1Decoder,
    "sparkplug_b": SparkplugBDecoder,
    "image": ImageDecoder,  # camera images (camera.decoder), beside the main decoder: agent.decode.routes
}


def build_decoder(kind: str, context: DecoderContext) -> Decoder:
    """The decoder registered as ``kind``; ``ValueError`` naming the known kinds otherwise."""
    return registered(DECODERS, kind, "decoder type")(context)
