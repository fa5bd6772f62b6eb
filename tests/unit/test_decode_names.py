"""Names the decoder accepts are names InfluxDB can store; field names are bounded per message and over time.

Issue 22: a field name or topic level ending in a backslash was decoded, acknowledged, then refused by the
line-protocol encoder in the writer (``storage.unencodable``): neither stored nor dead-lettered. The
decoder and the encoder now share one rule (``agent.schema.name_problem``); the properties below check
that whatever the decoder lets through, the encoder can write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode.base import DecodeLimits, DecoderContext
from agent.decode.errors import DecodeError
from agent.decode.fieldkeys import FieldKeys
from agent.decode.json_v1 import JsonV1Decoder, decode
from agent.decode.topic import TopicTemplate
from agent.records import NS_PER_S, Message, Reading, Source
from agent.storage.line_protocol import format_point

SOURCE = Source.of(site="s1", line="l1", machine="press-7", sensor="process")
ARRIVAL_NS = 1_764_000_000 * NS_PER_S
TEMPLATE = TopicTemplate("factory/{site}/{line}/{machine}/{sensor}")

# Names built mostly from the characters that matter to line protocol, so that the hard cases are common.
_TRICKY = st.sampled_from([*"\\ ,=\"'#\t\n\r\x00\x7f\ud800é€😀", "a", "b", "_", "-"])
NAMES = st.one_of(
    st.lists(_TRICKY, min_size=0, max_size=12).map("".join),
    st.text(max_size=40),
)


def accepted_field_name(name: str) -> bool:
    try:
        decode(SOURCE, json.dumps({"fields": {name: 1.0}}).encode(), ARRIVAL_NS)
    except DecodeError:
        return False
    return True


@settings(max_examples=1500, deadline=None)
@given(NAMES)
def test_every_field_name_the_decoder_accepts_can_be_written_as_line_protocol(name: str) -> None:
    if accepted_field_name(name):
        line = format_point("reading", SOURCE.as_dict(), {name: 1.0, "seq": 1}, ARRIVAL_NS)
        line.encode("utf-8")  # what the sink sends
        assert "\n" not in line


@settings(max_examples=1500, deadline=None)
@given(NAMES)
def test_every_topic_level_the_decoder_accepts_can_be_written_as_a_tag(level: str) -> None:
    topic = f"factory/s1/l1/{level}/process"
    try:
        source = TEMPLATE.match(topic)
    except DecodeError as exc:
        assert exc.code in ("topic", "name")
        return
    line = format_point("reading", source.as_dict(), {"value": 1.0}, ARRIVAL_NS)
    line.encode("utf-8")
    assert "\n" not in line


@settings(max_examples=500, deadline=None)
@given(NAMES)
def test_every_channel_the_decoder_accepts_can_be_written_as_a_tag(channel: str) -> None:
    payload = json.dumps({"samples": [1.0], "rate_hz": 10, "channel": channel}).encode()
    try:
        (block,) = decode(SOURCE, payload, ARRIVAL_NS)
    except DecodeError:
        return
    format_point("vibration", {**SOURCE.as_dict(), "channel": block.channel}, {"value": 1.0}, ARRIVAL_NS)


@pytest.mark.parametrize(
    ("level", "fragment"),
    [
        ("press\\", "ends with a backslash"),
        ("a\\,b", "has a backslash before ','"),
        ("a\\ b", "has a backslash before ' '"),
        ("tab\there", "contains a control character"),
    ],
)
def test_a_topic_level_influxdb_cannot_store_is_refused_with_code_name(level: str, fragment: str) -> None:
    with pytest.raises(DecodeError) as info:
        TEMPLATE.match(f"factory/s1/l1/{level}/process")
    assert info.value.code == "name"
    assert "level 4 ({machine})" in info.value.detail and fragment in info.value.detail


# --- the default subscription ------------------------------------------------------------------------------


def test_the_default_subscription_takes_in_topics_of_a_wrong_shape_but_not_the_agents_own() -> None:
    decoder = JsonV1Decoder(DecoderContext(TEMPLATE, outbound_base="pdm/edge-01"))
    assert decoder.subscriptions() == ("factory/#",)
    # Outbound topics below the same prefix: the exact filter, or the agent would read its own dead letters.
    inside = JsonV1Decoder(DecoderContext(TEMPLATE, outbound_base="factory/pdm/edge-01"))
    assert inside.subscriptions() == ("factory/+/+/+/+",)
    # A template that starts with a placeholder: '#' would be the whole broker.
    assert TopicTemplate("{site}/{machine}/{sensor}").catch_all() == "+/+/+"
    # Configured filters win.
    configured = JsonV1Decoder(DecoderContext(TEMPLATE, subscriptions=("factory/a/#",)))
    assert configured.subscriptions() == ("factory/a/#",)


# --- fields per message and field keys over time -------------------------------------------------------------


def fields_message(machine: str, names: list[str]) -> Message:
    payload = json.dumps({"fields": {n: 1.0 for n in names}}).encode()
    return Message(f"factory/s1/l1/{machine}/process", payload, 1, 1, ARRIVAL_NS)


def test_more_fields_in_one_message_than_the_limit_are_refused() -> None:
    payload = json.dumps({"fields": {f"f{i}": 1.0 for i in range(5)}}).encode()
    assert len(decode(SOURCE, payload, ARRIVAL_NS, DecodeLimits(max_fields=5))[0].fields) == 5
    with pytest.raises(DecodeError) as info:
        decode(SOURCE, payload, ARRIVAL_NS, DecodeLimits(max_fields=4))
    assert info.value.code == "too_many_fields"


def test_new_field_names_beyond_the_limit_per_machine_are_refused_known_ones_still_accepted() -> None:
    keys = FieldKeys(max_per_machine=3, max_total=100)
    decoder = JsonV1Decoder(DecoderContext(TEMPLATE, field_keys=keys))
    decoder.decode(fields_message("m1", ["a", "b"]))
    decoder.decode(fields_message("m1", ["c"]))
    with pytest.raises(DecodeError) as info:
        decoder.decode(fields_message("m1", ["a", "d"]))  # one new name too many: the whole message
    assert info.value.code == "field_keys"
    assert "'d'" in info.value.detail and "mqtt.max_field_keys_per_machine" in info.value.detail
    assert keys.known("m1") == {"a", "b", "c"}
    (reading,) = decoder.decode(fields_message("m1", ["c", "a"]))
    assert isinstance(reading, Reading)
    decoder.decode(fields_message("m2", ["d"]))  # another machine has its own budget


def test_the_total_of_distinct_field_names_is_bounded_too() -> None:
    keys = FieldKeys(max_per_machine=10, max_total=4)
    for machine in ("m1", "m2"):
        keys.admit(machine, ["a", "b"])  # shared names count once
    keys.admit("m3", ["c", "d"])
    assert keys.total == 4
    with pytest.raises(DecodeError) as info:
        keys.admit("m4", ["a", "e"])
    assert info.value.code == "field_keys" and "mqtt.max_field_keys" in info.value.detail
    keys.admit("m4", ["a", "d"])  # known names, new to this machine: fine


def test_the_known_field_names_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "field_keys.json"
    first = FieldKeys(max_per_machine=2, max_total=100, path=path)
    first.admit("m1", ["a", "b"])
    again = FieldKeys(max_per_machine=2, max_total=100, path=path)
    assert again.known("m1") == {"a", "b"}
    with pytest.raises(DecodeError):
        again.admit("m1", ["c"])  # without the file, the limit would start from zero again


def test_an_unreadable_field_key_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "field_keys.json"
    path.write_text("{not json")
    keys = FieldKeys(max_per_machine=2, max_total=100, path=path)
    assert keys.total == 0
    assert (tmp_path / "field_keys.json.corrupt").read_text() == "{not json"
