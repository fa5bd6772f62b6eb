"""The whole configuration (``Config``), read from YAML and validated once, at start, before any connection."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from agent.config.alerts import AlertsSection
from agent.config.base import Section, context_for, read_yaml
from agent.config.camera import CameraSection
from agent.config.errors import validate_model
from agent.config.inference import InferenceSection
from agent.config.learning import AdaptationSection, CommissioningSection
from agent.config.mqtt import MqttSection
from agent.config.service import AgentSection, HealthSection, HomeAssistantSection, QueuesSection
from agent.config.storage import SpoolSection, StorageSection

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class Config(Section):
    """The agent's configuration file (``config/agent.yaml`` is the commented example)."""

    agent: AgentSection = Field(default_factory=AgentSection, description="Identity, logging and heartbeat.")
    mqtt: MqttSection = Field(
        default_factory=MqttSection, description="The broker: connection, TLS, credentials, inbound topics."
    )
    storage: StorageSection = Field(
        default_factory=StorageSection, description="Where readings, scores and alerts are stored (InfluxDB)."
    )
    spool: SpoolSection = Field(
        default_factory=SpoolSection, description="The local queue of accepted points until the database has them."
    )
    inference: InferenceSection = Field(
        default_factory=InferenceSection, description="The anomaly models and the defect classifier."
    )
    alerts: AlertsSection = Field(
        default_factory=AlertsSection,
        description="One event per (source, alert type = model id): new -> update... -> clear (docs/alerts.md).",
    )
    commissioning: CommissioningSection = Field(
        default_factory=CommissioningSection,
        description="Per-machine baselines learned on the device from its first readings.",
    )
    adaptation: AdaptationSection = Field(
        default_factory=AdaptationSection,
        description="Per-machine LoRA adapters on the frozen fleet models (docs/adaptation.md).",
    )
    queues: QueuesSection = Field(default_factory=QueuesSection, description="Bounded queues between the threads.")
    health: HealthSection = Field(
        default_factory=HealthSection, description="HTTP /healthz, /readyz and Prometheus /metrics."
    )
    camera: CameraSection = Field(
        default_factory=CameraSection,
        description="Camera images beside the readings: decoded, stored by sha256, classified, alerted "
        "(docs/camera.md).",
    )
    homeassistant: HomeAssistantSection = Field(
        default_factory=HomeAssistantSection,
        description="Optional Home Assistant MQTT discovery: machines as devices, their alert state as entities.",
    )


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute ``${ENV}`` references, validate; ``ConfigError`` reports every problem of the file."""
    path = Path(path)
    data = read_yaml(path)
    return parse_config({} if data is None else data, base_dir=path.parent, environ=environ)


def parse_config(data: Any, base_dir: Path = Path("."), environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already parsed mapping (tests build configs this way); ``environ`` None: the process's."""
    return validate_model(Config, data, context_for(base_dir, environ))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors (YAML language server) and other tools."""
    schema = Config.model_json_schema()
    return {"$schema": SCHEMA_DIALECT, **schema, "title": "pdm-agent configuration"}
