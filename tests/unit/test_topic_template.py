"""The inbound topic template: validation, matching into tags, the subscription filter, formatting."""

from __future__ import annotations

import doctest

import pytest

import agent.decode.topic
from agent.decode.errors import DecodeError
from agent.decode.topic import TopicTemplate
from agent.records import Source

DEFAULT = "factory/{site}/{line}/{machine}/{sensor}"


def test_match_gives_the_tags_in_template_order() -> None:
    source = TopicTemplate(DEFAULT).match("factory/berlin/l1/press-7/vibration")
    assert source == Source((("site", "berlin"), ("line", "l1"), ("machine", "press-7"), ("sensor", "vibration")))
    assert (source.machine, source.sensor) == ("press-7", "vibration")


def test_subscription_replaces_placeholders_with_plus() -> None:
    assert TopicTemplate(DEFAULT).subscription() == "factory/+/+/+/+"
    assert TopicTemplate("plant/{machine}/data/{sensor}/v1").subscription() == "plant/+/data/+/v1"


def test_names_and_template() -> None:
    t = TopicTemplate("plant/{machine}/data/{sensor}")
    assert t.names == ("machine", "sensor")
    assert t.template == "plant/{machine}/data/{sensor}"
    assert t == TopicTemplate("plant/{machine}/data/{sensor}")
    assert repr(t) == "TopicTemplate('plant/{machine}/data/{sensor}')"


def test_minimal_template_and_literals_in_between() -> None:
    assert TopicTemplate("{machine}/{sensor}").match("m1/s1") == Source.of(machine="m1", sensor="s1")
    t = TopicTemplate("plant/{machine}/data/{sensor}/v1")
    assert t.match("plant/m1/data/process/v1") == Source.of(machine="m1", sensor="process")


def test_format_is_the_inverse_of_match() -> None:
    t = TopicTemplate(DEFAULT)
    topic = t.format(site="berlin", line="l1", machine="press-7", sensor="process")
    assert topic == "factory/berlin/l1/press-7/process"
    assert t.match(topic).as_dict() == {
        "site": "berlin",
        "line": "l1",
        "machine": "press-7",
        "sensor": "process",
    }


def test_tag_values_may_contain_any_character_but_slash() -> None:
    source = TopicTemplate(DEFAULT).match("factory/Zürich Nord/l 1/press=7,a/vib.x")
    assert source.as_dict() == {
        "site": "Zürich Nord",
        "line": "l 1",
        "machine": "press=7,a",
        "sensor": "vib.x",
    }


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("", "must be a non-empty string"),
        ("factory/{site}/{line}/{machine}", "missing required placeholder(s) {sensor}"),
        ("factory/{site}", "missing required placeholder(s) {machine}, {sensor}"),
        ("factory/{machine}/{machine}/{sensor}", "placeholder {machine} appears twice"),
        ("factory/x{machine}/{sensor}", "level 2 'x{machine}' is not a valid placeholder"),
        ("factory/{machine}-{line}/{sensor}", "is not a valid placeholder"),
        ("factory/{1st}/{machine}/{sensor}", "level 2 '{1st}' is not a valid placeholder"),
        ("factory/{}/{machine}/{sensor}", "is not a valid placeholder"),
        ("factory/{machine/{sensor}", "is not a valid placeholder"),
        ("factory//{machine}/{sensor}", "level 2 is empty"),
        ("/factory/{machine}/{sensor}", "level 1 is empty"),
        ("factory/{machine}/{sensor}/", "level 4 is empty"),
        ("factory/+/{machine}/{sensor}", "level 2 '+' contains a wildcard"),
        ("factory/{machine}/{sensor}/#", "level 4 '#' contains a wildcard"),
        ("$SYS/{machine}/{sensor}", "reserved for the broker"),
        ("factory/{channel}/{machine}/{sensor}", "placeholder {channel} clashes with the tag 'channel'"),
        ("factory/{model_id}/{machine}/{sensor}", "clashes with the tag 'model_id'"),
    ],
)
def test_invalid_template_is_refused_with_the_reason(template: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        TopicTemplate(template)
    assert fragment in str(info.value)
    if template:
        assert repr(template) in str(info.value)


@pytest.mark.parametrize(
    "topic, fragment",
    [
        ("factory/berlin/l1/press-7", "topic 'factory/berlin/l1/press-7' has 4 levels, template"),
        ("factory/berlin/l1/press-7/vibration/x", "has 6 levels"),
        ("plant/berlin/l1/press-7/vibration", "level 1 is 'plant', template expects 'factory'"),
        ("factory/berlin/l1//vibration", "level 4 ({machine}) is empty"),
        ("factory/berlin/l1/press-7/", "level 5 ({sensor}) is empty"),
        ("", "has 1 levels"),
    ],
)
def test_topic_that_does_not_fit_is_a_decode_error(topic: str, fragment: str) -> None:
    with pytest.raises(DecodeError) as info:
        TopicTemplate(DEFAULT).match(topic)
    assert info.value.code == "topic"
    assert fragment in info.value.detail


def test_long_topic_is_shortened_in_the_error() -> None:
    with pytest.raises(DecodeError) as info:
        TopicTemplate(DEFAULT).match("x" * 10_000)
    assert len(info.value.detail) < 300


@pytest.mark.parametrize(
    "tags, fragment",
    [
        ({"site": "b", "line": "l", "machine": "m"}, "missing sensor"),
        ({"site": "b", "line": "l", "machine": "m", "sensor": "s", "x": "1"}, "unknown x"),
        ({"site": "b", "line": "l", "machine": "m/2", "sensor": "s"}, "tag machine='m/2'"),
        ({"site": "b", "line": "l", "machine": "", "sensor": "s"}, "tag machine=''"),
        ({"site": "b", "line": "+", "machine": "m", "sensor": "s"}, "tag line='+'"),
        ({"site": "#", "line": "l", "machine": "m", "sensor": "s"}, "tag site='#'"),
    ],
)
def test_format_refuses_missing_unknown_or_bad_tags(tags: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        TopicTemplate(DEFAULT).format(**tags)
    assert fragment in str(info.value)


def test_doctests() -> None:
    assert doctest.testmod(agent.decode.topic).failed == 0
