"""Every outbound MQTT topic and the small payloads that go with them, in one place.

Base ``pdm/{agent_id}`` (configurable), see ``docs/contracts.md``:

| topic | retained | payload |
|---|---|---|
| ``{base}/status`` | yes | ``{"v":1,"state":"online"|"offline","agent_id":..,"time":..}``; will: offline |
| ``{base}/heartbeat`` | yes | ``{"v":2,"agent_id","time_ns","time","fields":{..}}``: the ``agent`` point's fields |
| ``{base}/alerts/{machine}/{sensor}`` | no, QoS 1 | alert JSON, ``agent/schemas/alert.schema.json`` |
| ``{base}/state/{machine}`` | yes | ``{"v":1,"machine","state":"ok"|severity,"open_alerts":[..],"silences":[..]}`` |
| ``{base}/scores/{machine}`` | yes | for Home Assistant: ``{"v":1,"machine","scores":{"{sensor}/{model}":{..}}}`` |
| ``{base}/commands`` (subscribed) | no | operator commands: ack, silence, unsilence (see ``docs/contracts.md``) |
| ``{base}/commands/result`` | no | ``{"v":1,"command","by","accepted","detail","time"}`` |
| ``{base}/deadletter`` | no | ``{"v":1,"topic","code","reason","payload_excerpt","payload_bytes","time"}`` |
| ``{base}/fleet`` | yes | sharded: ``{"v":1,"agent_id","shard":{"index","count"},"machines":[..],"time"}`` |
| (summary) | no | beyond a rate: ``{"v":1,"code":"summary","reason","counts":{..},"total","from","to","time"}`` |

Times in payloads are RFC 3339 UTC with milliseconds (``2024-11-25T23:00:00.250Z``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final, Literal

SCHEMA_VERSION: Final = 1
HEARTBEAT_VERSION: Final = 2
"""2: ``fields`` only (version 1 also had ``counters``, the same values keyed ``name{label=value}``)."""
EXCERPT_BYTES: Final = 256

StatusState = Literal["online", "offline"]

_NOT_IN_LEVEL: Final = ("/", "+", "#", "\x00")


def format_rfc3339(time_ns: int) -> str:
    """UTC time with milliseconds, as used in every outbound payload.

    >>> format_rfc3339(1_732_575_600_250_000_000)
    '2024-11-25T23:00:00.250Z'
    """
    seconds, ns = divmod(time_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns // 1_000_000:03d}Z"


def _level(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in _NOT_IN_LEVEL):
        raise ValueError(f"{name} must be a non-empty string without '/', '+', '#' or NUL, got {value!r}")
    return value


class Topics:
    """Outbound topic names of one agent, and the builders of the status, dead-letter and state payloads.

    >>> t = Topics("edge-01")
    >>> t.status, t.alerts("press-7", "vibration"), t.alerts_filter
    ('pdm/edge-01/status', 'pdm/edge-01/alerts/press-7/vibration', 'pdm/edge-01/alerts/+/+')
    """

    def __init__(self, agent_id: str, base_template: str = "pdm/{agent_id}") -> None:
        self.agent_id = _level("agent_id", agent_id)
        try:
            base = base_template.format(agent_id=agent_id)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"base topic {base_template!r}: only the placeholder {{agent_id}} is allowed ({exc!r})"
            ) from None
        for level in base.split("/"):
            _level(f"base topic {base_template!r}: level", level)
        self.base: Final = base

    @property
    def status(self) -> str:
        """Retained ``online``/``offline``; the last will sets ``offline`` when the agent vanishes."""
        return f"{self.base}/status"

    @property
    def heartbeat(self) -> str:
        """Retained counters, refreshed periodically."""
        return f"{self.base}/heartbeat"

    @property
    def deadletter(self) -> str:
        """Rejected input with the reason (not retained)."""
        return f"{self.base}/deadletter"

    def alerts(self, machine: str, sensor: str) -> str:
        return f"{self.base}/alerts/{_level('machine', machine)}/{_level('sensor', sensor)}"

    @property
    def alerts_filter(self) -> str:
        """Subscription filter for every alert of this agent."""
        return f"{self.base}/alerts/+/+"

    def state(self, machine: str) -> str:
        """Retained alert state of one machine."""
        return f"{self.base}/state/{_level('machine', machine)}"

    def scores(self, machine: str) -> str:
        """Retained latest anomaly scores of one machine (published for Home Assistant's score sensors)."""
        return f"{self.base}/scores/{_level('machine', machine)}"

    def scores_payload(self, machine: str, scores: Mapping[str, Mapping[str, object]], time_ns: int) -> bytes:
        """The latest score of each sensor and model of ``machine``, keyed ``{sensor}/{model_id}``."""
        return _dump(
            {
                "v": SCHEMA_VERSION,
                "agent_id": self.agent_id,
                "machine": machine,
                "scores": {key: dict(entry) for key, entry in sorted(scores.items())},
                "time": format_rfc3339(time_ns),
            }
        )

    @property
    def state_filter(self) -> str:
        return f"{self.base}/state/+"

    @property
    def commands(self) -> str:
        """Operator commands to the alert engine (the agent subscribes to it)."""
        return f"{self.base}/commands"

    @property
    def command_result(self) -> str:
        """The agent's reply to each command: accepted and what it did, or refused and why."""
        return f"{self.base}/commands/result"

    @property
    def fleet(self) -> str:
        """Retained: this agent's share of a sharded plant and the machines it owns (``pdm/+/fleet`` = the fleet)."""
        return f"{self.base}/fleet"

    def fleet_payload(self, index: int, count: int, machines: list[str], time_ns: int) -> bytes:
        return _dump(
            {
                "v": SCHEMA_VERSION,
                "agent_id": self.agent_id,
                "shard": {"index": index, "count": count},
                "machines": machines,
                "time": format_rfc3339(time_ns),
            }
        )

    def status_payload(self, state: StatusState, time_ns: int | None = None) -> bytes:
        if state not in ("online", "offline"):
            raise ValueError(f"status state must be 'online' or 'offline', got {state!r}")
        return _dump(
            {
                "v": SCHEMA_VERSION,
                "state": state,
                "agent_id": self.agent_id,
                "time": format_rfc3339(time.time_ns() if time_ns is None else time_ns),
            }
        )

    def heartbeat_payload(self, fields: Mapping[str, float], time_ns: int) -> bytes:
        """The agent's self-metrics, flat (``agent.health.selfmetrics.agent_fields``: the ``agent`` point's
        fields), so that Home Assistant templates and Node-RED read a key without parsing labels out of it.

        >>> Topics("e").heartbeat_payload({"decode_errors": 1.0}, 10**9)
        b'{"v":2,"agent_id":"e","time_ns":1000000000,"time":"1970-01-01T00:00:01.000Z","fields":{"decode_errors":1.0}}'
        """
        body = {"v": HEARTBEAT_VERSION, "agent_id": self.agent_id, "time_ns": time_ns, "time": format_rfc3339(time_ns)}
        return _dump({**body, "fields": dict(fields)})

    def deadletter_payload(
        self, topic: str, code: str, reason: str, payload: bytes, time_ns: int | None = None
    ) -> bytes:
        """The report of one rejected message: where it came from, why, and its first 256 bytes as text."""
        return _dump(
            {
                "v": SCHEMA_VERSION,
                "topic": topic,
                "code": code,
                "reason": reason,
                "payload_excerpt": bytes(payload[:EXCERPT_BYTES]).decode("utf-8", errors="replace"),
                "payload_bytes": len(payload),
                "time": format_rfc3339(time.time_ns() if time_ns is None else time_ns),
            }
        )

    def deadletter_summary_payload(
        self, counts: Mapping[str, int], from_ns: int, to_ns: int, rate_per_s: float, time_ns: int | None = None
    ) -> bytes:
        """Rejections beyond the dead-letter rate, counted per reason (``code``) from ``from_ns`` to ``to_ns``.

        >>> Topics("e").deadletter_summary_payload({"json": 3}, 0, 10**10, 20.0, time_ns=10**10)[:60]
        b'{"v":1,"code":"summary","reason":"3 rejected messages beyond'
        """
        total = sum(counts.values())
        return _dump(
            {
                "v": SCHEMA_VERSION,
                "code": "summary",
                "reason": f"{total} rejected messages beyond {rate_per_s:g}/s, counted per reason",
                "counts": dict(sorted(counts.items())),
                "total": total,
                "from": format_rfc3339(from_ns),
                "to": format_rfc3339(to_ns),
                "time": format_rfc3339(time.time_ns() if time_ns is None else time_ns),
            }
        )

    def command_result_payload(self, command: str, by: str, accepted: bool, detail: str, time_ns: int) -> bytes:
        """The reply to one operator command."""
        return _dump(
            {
                "v": SCHEMA_VERSION,
                "command": command,
                "by": by,
                "accepted": accepted,
                "detail": detail,
                "time": format_rfc3339(time_ns),
            }
        )

    def __repr__(self) -> str:
        return f"Topics(agent_id={self.agent_id!r}, base={self.base!r})"


def _dump(body: Mapping[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
