"""Home Assistant MQTT discovery: the agent and each machine as devices, a machine's alert state and its
anomaly scores as entities.

Home Assistant creates an entity for every retained JSON config it finds under
``{prefix}/{component}/{node_id}/{object_id}/config``; the entities then read the agent's own topics, so
nothing is published twice:

- the agent (device ``pdm_{agent_id}``): ``binary_sensor`` connectivity from ``{base}/status``, and the
  messages it received and rejected from ``{base}/heartbeat`` (its flat ``fields``);
- each machine (device ``pdm_{agent_id}_{machine}``, via the agent): ``binary_sensor`` problem (on while an
  alert event is open), ``sensor`` severity (``ok``, ``warning``, ``major``, ``critical``) with the open
  events and silences as attributes, and ``sensor`` open alert events, all from ``{base}/state/{machine}``;
- each model scoring a sensor of the machine: ``sensor`` anomaly score (threshold, score / threshold, model
  and window end as attributes) from ``{base}/scores/{machine}``, which only this integration makes the
  agent publish: the latest score per sensor and model, at most every ``scores_interval_s`` per machine.

A machine's alert entities are announced just before its first state message of this run (its first alert
event or silence), a score entity with the first score of its sensor and model, so Home Assistant never
shows a machine the agent has not scored. Every entity is unavailable while the agent's status is
``offline`` (its last will). Pure: the caller publishes what it returns, retained.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from agent import __version__
from agent.records import Score
from agent.topics import Topics, format_rfc3339

_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")


def _id(*parts: str) -> str:
    """A discovery node or object id: letters, digits, ``_`` and ``-`` only.

    >>> _id("pdm", "edge-01", "press 7/a")
    'pdm_edge-01_press_7_a'
    """
    return _NOT_ID.sub("_", "_".join(parts))


class Discovery:
    """The discovery configs of one agent: the agent's device once, then each machine once."""

    def __init__(self, topics: Topics, prefix: str = "homeassistant", scores_interval_s: float = 10.0) -> None:
        self._topics = topics
        self._prefix = prefix.rstrip("/")
        self._node = _id("pdm", topics.agent_id)
        self._announced: set[str] = set()
        self._agent_announced = False
        self._scores_interval_ns = round(scores_interval_s * 1e9)  # 0: no score entities
        self._scores: dict[str, dict[str, dict[str, Any]]] = {}  # machine -> "{sensor}/{model}" -> latest
        self._scores_announced: set[tuple[str, str]] = set()
        self._scores_sent_ns: dict[str, int] = {}
        self._scores_pending: set[str] = set()

    def on_score(self, score: Score, now_ns: int) -> list[tuple[str, bytes]]:
        """What to publish, retained, for one window's score: the score entity's config the first time its
        machine, sensor and model are seen, then the machine's scores if it was not published for
        ``scores_interval_s`` (else it waits for ``due``)."""
        if not self._scores_interval_ns:
            return []
        machine, key = score.source.machine, f"{score.source.sensor}/{score.model_id}"
        out: list[tuple[str, bytes]] = []
        if (machine, key) not in self._scores_announced:
            if not self._agent_announced:
                out += self.agent()
                self._agent_announced = True
            out.append(self.score_entity(machine, score.source.sensor, score.model_id))
            self._scores_announced.add((machine, key))
        self._scores.setdefault(machine, {})[key] = _score_entry(score)
        self._scores_pending.add(machine)
        return out + self.due(now_ns, only=machine)

    def due(self, now_ns: int, only: str | None = None, final: bool = False) -> list[tuple[str, bytes]]:
        """The scores of each machine with a new score whose last publication is ``scores_interval_s`` old
        (called on every score, and periodically so that the last score of a quiet machine goes out too);
        ``final``: every machine with a new score, whatever the interval (at the agent's stop)."""
        out: list[tuple[str, bytes]] = []
        for machine in [only] if only is not None else sorted(self._scores_pending):
            if machine not in self._scores_pending:
                continue
            if not final and now_ns - self._scores_sent_ns.get(machine, -(2**62)) < self._scores_interval_ns:
                continue
            self._scores_pending.discard(machine)
            self._scores_sent_ns[machine] = now_ns
            payload = self._topics.scores_payload(machine, self._scores[machine], now_ns)
            out.append((self._topics.scores(machine), payload))
        return out

    def for_machine(self, machine: str) -> list[tuple[str, bytes]]:
        """The (topic, payload) configs to publish, retained, before ``machine``'s first state; empty once it
        (and the agent) were announced."""
        configs: list[tuple[str, bytes]] = []
        if not self._agent_announced:
            configs += self.agent()
            self._agent_announced = True
        if machine not in self._announced:
            configs += self.machine(machine)
            self._announced.add(machine)
        return configs

    def agent(self) -> list[tuple[str, bytes]]:
        device = {
            "identifiers": [self._node],
            "name": f"pdm-agent {self._topics.agent_id}",
            "manufacturer": "pdm-agent",
            "model": "edge predictive-maintenance agent",
            "sw_version": __version__,
        }
        heartbeat = self._topics.heartbeat
        return [
            self._config(
                "binary_sensor",
                "agent_online",
                {
                    "name": "Online",
                    "device_class": "connectivity",
                    "state_topic": self._topics.status,
                    "value_template": "{{ value_json.state }}",
                    "payload_on": "online",
                    "payload_off": "offline",
                    "device": device,
                },
                available=False,  # it is the availability itself
            ),
            self._config(
                "sensor",
                "agent_messages",
                {
                    "name": "Messages received",
                    "state_topic": heartbeat,
                    "value_template": "{{ value_json.fields.ingest_messages | int(0) }}",
                    "state_class": "total_increasing",
                    "icon": "mdi:message-arrow-left",
                    "device": device,
                },
            ),
            self._config(
                "sensor",
                "agent_rejected",
                {
                    "name": "Messages rejected",
                    "state_topic": heartbeat,
                    "value_template": "{{ value_json.fields.decode_errors | int(0) }}",
                    "state_class": "total_increasing",
                    "icon": "mdi:message-alert",
                    "device": device,
                },
            ),
        ]

    def _machine_device(self, machine: str) -> dict[str, Any]:
        """The device block of a machine: the same in every config of it, so they make one device."""
        return {
            "identifiers": [_id(self._node, machine)],
            "name": machine,
            "manufacturer": "pdm-agent",
            "model": "monitored machine",
            "via_device": self._node,
        }

    def score_entity(self, machine: str, sensor: str, model_id: str) -> tuple[str, bytes]:
        """The sensor entity of one model's score of one sensor of ``machine``."""
        topic, key = self._topics.scores(machine), json.dumps(f"{sensor}/{model_id}")  # a Jinja string literal
        return self._config(
            "sensor",
            _id(machine, "score", sensor, model_id),
            {
                "name": f"Anomaly score {sensor} ({model_id})",
                "state_topic": topic,
                "value_template": f"{{{{ value_json.scores[{key}].score }}}}",
                "json_attributes_topic": topic,
                "json_attributes_template": f"{{{{ value_json.scores[{key}] | tojson }}}}",
                "state_class": "measurement",
                "icon": "mdi:chart-bell-curve",
                "device": self._machine_device(machine),
            },
        )

    def machine(self, machine: str) -> list[tuple[str, bytes]]:
        state = self._topics.state(machine)
        device = self._machine_device(machine)
        return [
            self._config(
                "binary_sensor",
                _id(machine, "problem"),
                {
                    "name": "Problem",
                    "device_class": "problem",
                    "state_topic": state,
                    "value_template": "{{ 'OFF' if value_json.state == 'ok' else 'ON' }}",
                    "device": device,
                },
            ),
            self._config(
                "sensor",
                _id(machine, "severity"),
                {
                    "name": "Alert severity",
                    "state_topic": state,
                    "value_template": "{{ value_json.state }}",
                    "json_attributes_topic": state,
                    "json_attributes_template": "{{ {'open_alerts': value_json.open_alerts, "
                    "'silences': value_json.silences} | tojson }}",
                    "icon": "mdi:alert-octagon",
                    "device": device,
                },
            ),
            self._config(
                "sensor",
                _id(machine, "open_alerts"),
                {
                    "name": "Open alert events",
                    "state_topic": state,
                    "value_template": "{{ value_json.open_alerts | length }}",
                    "state_class": "measurement",
                    "icon": "mdi:alert-circle-outline",
                    "device": device,
                },
            ),
        ]

    def _config(
        self, component: str, object_id: str, body: dict[str, Any], available: bool = True
    ) -> tuple[str, bytes]:
        unique = _id(self._node, object_id)
        config: dict[str, Any] = {"unique_id": unique, "object_id": unique, **body}
        if available:
            config |= {
                "availability_topic": self._topics.status,
                "availability_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        topic = f"{self._prefix}/{component}/{self._node}/{_id(object_id)}/config"
        return topic, json.dumps(config, separators=(",", ":")).encode()


def _score_entry(score: Score) -> dict[str, Any]:
    """One score as the scores payload carries it; a non-finite value as null (JSON has no NaN)."""

    def finite(value: float) -> float | None:
        return float(value) if math.isfinite(value) else None

    ratio = score.score / score.threshold if score.threshold > 0 else math.nan
    return {
        "score": finite(score.score),
        "threshold": finite(score.threshold),
        "ratio": finite(ratio),
        "anomalous": score.is_anomalous,
        "model_id": score.model_id,
        "model_version": score.model_version,
        "adapter": score.adapter,
        "window_end": format_rfc3339(score.end_ns),
    }
