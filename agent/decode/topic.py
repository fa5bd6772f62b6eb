"""Inbound topic template: which topics the agent reads and which tags it takes from them.

A template such as ``factory/{site}/{line}/{machine}/{sensor}`` is a list of topic levels; a level is
either literal text or a ``{name}`` placeholder that matches exactly one level and becomes a tag.
``{machine}`` and ``{sensor}`` are required. Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Final

from agent import schema
from agent.decode.errors import DecodeError, quote
from agent.records import Source

REQUIRED_TAGS: Final = ("machine", "sensor")

# Tags the agent itself adds to InfluxDB points; a topic tag of the same name would clash with them.
_RESERVED_TAGS: Final = frozenset(
    {
        schema.TAG_CHANNEL,
        schema.ALERT_STATE_TAG,
        schema.ALERT_TYPE_TAG,
        schema.ALERT_SEVERITY_TAG,
        schema.DEFECT_CLASS_TAG,
        schema.INSPECTION_CLASS_TAG,
        schema.COMMAND_TAG,
        schema.COMMAND_RESULT_TAG,
        schema.TAG_MODEL_ID,
        schema.TAG_MODEL_VERSION,
        schema.TAG_ADAPTER,
        schema.TAG_AGENT_ID,
        "time",
    }
)

_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f]")


def tag_value_problem(value: str) -> str | None:
    r"""Why a topic level cannot be a tag value (``agent.schema.name_problem``, and no control characters).

    >>> tag_value_problem("press-7"), tag_value_problem("press\\"), tag_value_problem("a\tb")
    (None, 'ends with a backslash', 'contains a control character')
    """
    if _CONTROL_CHARS.search(value):
        return "contains a control character"
    return schema.name_problem(value)


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FORBIDDEN_IN_LEVEL = ("+", "#", "\x00")


MATCHED_TOPICS_MAX = 100_000
"""Topics whose tags a template remembers (a plant's machines and sensors; cleared when full)."""


class TopicTemplate:
    """A validated topic template; ``match`` turns a topic into a ``Source``.

    >>> t = TopicTemplate("factory/{site}/{line}/{machine}/{sensor}")
    >>> t.subscription()
    'factory/+/+/+/+'
    >>> t.match("factory/berlin/l1/press-7/vibration").as_dict()
    {'site': 'berlin', 'line': 'l1', 'machine': 'press-7', 'sensor': 'vibration'}
    >>> t.format(site="berlin", line="l1", machine="press-7", sensor="process")
    'factory/berlin/l1/press-7/process'
    """

    def __init__(self, template: str, required: tuple[str, ...] = REQUIRED_TAGS) -> None:
        """``required``: the placeholders the template must have (a camera topic may name its ``sensor`` as
        a literal level, e.g. ``factory/{site}/{line}/{machine}/camera``; its decoder adds the tag)."""
        if not isinstance(template, str) or not template:
            raise ValueError(f"topic template must be a non-empty string, got {template!r}")
        self._template = template
        self._matched: dict[str, Source] = {}  # topics seen (bounded): every message of a machine repeats one
        # One entry per level: (tag name, None) for a placeholder, (None, text) for a literal level.
        levels: list[tuple[str | None, str | None]] = []
        names: list[str] = []
        for index, level in enumerate(template.split("/"), start=1):
            match = _PLACEHOLDER.fullmatch(level)
            if match:
                name = match.group(1)
                if name in names:
                    self._invalid(f"placeholder {{{name}}} appears twice")
                if name in _RESERVED_TAGS:
                    self._invalid(f"placeholder {{{name}}} clashes with the tag {name!r} that the agent adds itself")
                names.append(name)
                levels.append((name, None))
                continue
            if not level:
                self._invalid(f"level {index} is empty (check for '//' or a leading or trailing '/')")
            if "{" in level or "}" in level:
                self._invalid(
                    f"level {index} {level!r} is not a valid placeholder: a placeholder is a whole level "
                    "of the form {name} (letters, digits, '_')"
                )
            if any(c in level for c in _FORBIDDEN_IN_LEVEL):
                self._invalid(f"level {index} {level!r} contains a wildcard; use a {{name}} placeholder instead")
            if index == 1 and level.startswith("$"):
                self._invalid(f"topics starting with '$' ({level!r}) are reserved for the broker")
            levels.append((None, level))
        missing = [name for name in required if name not in names]
        if missing:
            self._invalid("missing required placeholder(s) " + ", ".join(f"{{{m}}}" for m in missing))
        self._levels: tuple[tuple[str | None, str | None], ...] = tuple(levels)
        self.names: tuple[str, ...] = tuple(names)
        """Tag names in template order."""

    def _invalid(self, reason: str) -> None:
        raise ValueError(f"topic template {self._template!r}: {reason}")

    @property
    def template(self) -> str:
        return self._template

    def match(self, topic: str) -> Source:
        """The tags of ``topic``; raises ``DecodeError`` (code ``topic``) if it does not fit the template."""
        source = self._matched.get(topic)
        if source is None:
            source = self._match(topic)  # raises for a topic that does not fit: never remembered
            if len(self._matched) >= MATCHED_TOPICS_MAX:
                self._matched.clear()  # a flood of distinct topics costs the cache, not memory
            self._matched[topic] = source
        return source

    def _match(self, topic: str) -> Source:
        parts = topic.split("/")
        if len(parts) != len(self._levels):
            raise DecodeError(
                "topic",
                f"topic {quote(topic)} has {len(parts)} levels, template {self._template!r} has {len(self._levels)}",
            )
        tags: list[tuple[str, str]] = []
        for index, (part, (name, literal)) in enumerate(zip(parts, self._levels, strict=True), start=1):
            if name is None:
                if part != literal:
                    raise DecodeError(
                        "topic",
                        f"topic {quote(topic)}: level {index} is {quote(part)}, template expects {literal!r}",
                    )
            elif not part:
                # '+' matches an empty level too; an empty tag value cannot be stored in InfluxDB.
                raise DecodeError("topic", f"topic {quote(topic)}: level {index} ({{{name}}}) is empty")
            else:
                problem = tag_value_problem(part)
                if problem is not None:
                    raise DecodeError(
                        "name", f"topic {quote(topic)}: level {index} ({{{name}}}) {problem}; InfluxDB cannot store it"
                    )
                tags.append((name, part))
        return Source(tuple(tags))

    def subscription(self) -> str:
        """The MQTT topic filter that selects every topic of this template (placeholders become ``+``)."""
        return "/".join("+" if name is not None else str(literal) for name, literal in self._levels)

    def catch_all(self, exclude: str = "") -> str:
        """The filter the agent subscribes by default: everything below the template's literal first levels
        (``factory/#``), so that a topic with too few or too many levels, or a wrong literal level, arrives
        and is dead-lettered with its reason instead of never being seen. The exact ``subscription()``
        when the template starts with a placeholder (``#`` alone would take in every topic of the broker)
        or when the prefix would also take in ``exclude``, the agent's own outbound topics (the agent
        would read its own dead letters and alerts).

        >>> t = TopicTemplate("factory/{site}/{line}/{machine}/{sensor}")
        >>> t.catch_all(), t.catch_all(exclude="factory/pdm/edge-01")
        ('factory/#', 'factory/+/+/+/+')
        >>> TopicTemplate("{machine}/{sensor}").catch_all()
        '+/+'
        """
        prefix: list[str] = []
        for name, literal in self._levels:
            if name is not None:
                break
            prefix.append(str(literal))
        if not prefix:
            return self.subscription()
        if exclude and exclude.split("/")[: len(prefix)] == prefix:
            return self.subscription()
        return "/".join(prefix) + "/#"

    def format(self, **tags: str) -> str:
        """The topic for these tags (the simulator publishes to it); every placeholder needs a value."""
        missing = [name for name in self.names if name not in tags]
        unknown = sorted(set(tags) - set(self.names))
        if missing or unknown:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(missing))
            if unknown:
                parts.append("unknown " + ", ".join(unknown))
            raise ValueError(f"tags for {self._template!r}: {'; '.join(parts)}")
        out: list[str] = []
        for name, literal in self._levels:
            if name is None:
                out.append(str(literal))
                continue
            value = tags[name]
            if not isinstance(value, str) or not value or "/" in value or any(c in value for c in _FORBIDDEN_IN_LEVEL):
                raise ValueError(f"tag {name}={value!r}: must be a non-empty string without '/', '+', '#' or NUL")
            out.append(value)
        return "/".join(out)

    def __repr__(self) -> str:
        return f"TopicTemplate({self._template!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TopicTemplate) and other._template == self._template

    def __hash__(self) -> int:
        return hash(self._template)
