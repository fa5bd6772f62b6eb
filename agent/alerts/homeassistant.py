"""Home Assistant MQTT discovery: the agent and each machine as devices, a machine's alert state as entities.

Home Assistant creates an entity for every retained JSON config it finds under
``{prefix}/{component}/{node_id}/{object_id}/config``; the entities then read the agent's own topics, so
nothing is published twice:

- the agent (device ``pdm_{agent_id}``): ``binary_sensor`` connectivity from ``{base}/status``, and the
  messages it received and rejected from ``{base}/heartbeat`` (its flat ``fields``);
- each machine (device ``pdm_{agent_id}_{machine}``, via the agent): ``binary_sensor`` problem (on while an
  alert event is open), ``sensor`` severity (``ok``, ``warning``, ``major``, ``critical``) with the open
  events and silences as attributes, and ``sensor`` open alert events, all from ``{base}/state/{machine}``.

A machine is announced just before its first state message of this run (its first alert event or silence),
so Home Assistant never shows a machine the agent has not scored. Every entity is unavailable while the
agent's status is ``offline`` (its last will). Pure: the caller publishes what it returns, retained.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent import __version__
from agent.topics import Topics

_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")


def _id(*parts: str) -> str:
    """A discovery node or object id: letters, digits, ``_`` and ``-`` only.

    >>> _id("pdm", "edge-01", "press 7/a")
    'pdm_edge-01_press_7_a'
    """
    return _NOT_ID.sub("_", "_".join(parts))


class Discovery:
    """The discovery configs of one agent: the agent's device once, then each machine once."""

    def __init__(self, topics: Topics, prefix: str = "homeassistant") -> None:
        self._topics = topics
        self._prefix = prefix.rstrip("/")
        self._node = _id("pdm", topics.agent_id)
        self._announced: set[str] = set()
        self._agent_announced = False

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

    def machine(self, machine: str) -> list[tuple[str, bytes]]:
        state = self._topics.state(machine)
        device = {
            "identifiers": [_id(self._node, machine)],
            "name": machine,
            "manufacturer": "pdm-agent",
            "model": "monitored machine",
            "via_device": self._node,
        }
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
