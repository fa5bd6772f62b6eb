"""``LeanProperties`` decodes received PUBLISH packets exactly as paho's own ``Properties`` does."""

from __future__ import annotations

import struct

import paho.mqtt._packet as paho_packet
import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.ingest.paho_buffered import LeanProperties, client_class

PAYLOAD = b'{"v": 1.5}'
TOPIC = b"factory/line1/pump-7/process"


def _publish(properties: Properties | None) -> bytes:
    """A QoS 1 PUBLISH packet's variable header and payload (mid 7), with ``properties`` or none."""
    props = properties.pack() if properties is not None else b"\x00"
    return struct.pack("!H", len(TOPIC)) + TOPIC + struct.pack("!H", 7) + props + PAYLOAD


def _with_properties() -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("line", "1")
    props.UserProperty = ("cell", "b")
    props.MessageExpiryInterval = 30
    props.ContentType = "application/json"
    return props


def _decode(packet: bytes, cls: type[Properties]) -> paho_packet.PublishPacket:
    saved = paho_packet.Properties
    setattr(paho_packet, "Properties", cls)  # noqa: B010
    try:
        return paho_packet.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
    finally:
        setattr(paho_packet, "Properties", saved)  # noqa: B010


@pytest.mark.parametrize("properties", [None, _with_properties()], ids=["none", "four"])
def test_decodes_like_paho(properties: Properties | None) -> None:
    packet = _publish(properties)
    stock = _decode(packet, Properties)
    lean = _decode(packet, LeanProperties)
    assert isinstance(lean.properties, LeanProperties)
    assert (lean.topic, lean.mid, lean.qos, lean.payload) == (TOPIC, 7, 1, PAYLOAD)
    assert (stock.topic, stock.mid, stock.payload) == (lean.topic, lean.mid, lean.payload)
    assert lean.properties is not None and stock.properties is not None
    assert lean.properties.json() == stock.properties.json()
    assert lean.properties.isEmpty() == (properties is None)
    assert str(lean.properties) == str(stock.properties)


def test_instances_keep_their_own_properties() -> None:
    """The lookup tables are shared; the decoded values are not (a message without properties decoded after
    one with them has none)."""
    with_props = _decode(_publish(_with_properties()), LeanProperties).properties
    without = _decode(_publish(None), LeanProperties).properties
    assert with_props is not None and without is not None
    assert with_props.UserProperty == [("line", "1"), ("cell", "b")]  # type: ignore[attr-defined]
    assert not hasattr(without, "UserProperty")
    assert without.names is with_props.names  # shared, built once


def test_client_class_installs_it_for_received_packets() -> None:
    client_class()
    assert paho_packet.Properties is LeanProperties
    decoded = paho_packet.decode_publish(0x32, _publish(None), MQTTProtocolVersion.MQTTv5)
    assert isinstance(decoded.properties, LeanProperties)
