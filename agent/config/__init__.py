"""Agent configuration: a YAML file validated once, at start, before any connection.

Every section is a frozen pydantic model (``extra="forbid"``, strict types, a description on every field);
``ConfigError`` reports every problem of a file at once, each with its key path
(``storage.v1.database: expected a string, got 5``). String values may reference environment variables as
``${NAME}`` or ``${NAME:-default}``; this is how secrets stay out of the file. Relative paths are resolved
against the directory of the config file. ``pdm-agent config schema`` prints the JSON Schema.

=====================  ==================================================================
module                 sections
=====================  ==================================================================
``service``            ``agent``, ``queues``, ``health``
``mqtt``               ``mqtt`` (TLS, credentials, decoder)
``storage``            ``storage`` (InfluxDB v1/v2), ``spool``
``inference``          ``inference`` (models, defect classifier, registry)
``alerts``             ``alerts`` (rules by alert type)
``learning``           ``commissioning``, ``adaptation``
``loader``             ``Config``, ``load_config``, ``parse_config``, ``json_schema``
``base``, ``errors``   strict base model, ``${ENV}``, paths, secrets, YAML; the error engine
=====================  ==================================================================
"""

from agent.config.alerts import AlertRuleSection, AlertsSection
from agent.config.errors import ConfigError
from agent.config.inference import DefectSection, InferenceSection, ModelEntry
from agent.config.learning import AdaptationAutoSection, AdaptationSection, CommissioningSection
from agent.config.loader import Config, json_schema, load_config, parse_config
from agent.config.mqtt import DecoderSection, MqttSection, MqttTlsSection
from agent.config.service import AgentSection, HealthSection, HomeAssistantSection, QueuesSection
from agent.config.storage import InfluxV1Section, InfluxV2Section, RawVibrationSection, SpoolSection, StorageSection

__all__ = [
    "AdaptationAutoSection",
    "AdaptationSection",
    "AgentSection",
    "AlertRuleSection",
    "AlertsSection",
    "CommissioningSection",
    "Config",
    "ConfigError",
    "DecoderSection",
    "DefectSection",
    "HealthSection",
    "HomeAssistantSection",
    "InferenceSection",
    "InfluxV1Section",
    "InfluxV2Section",
    "ModelEntry",
    "MqttSection",
    "MqttTlsSection",
    "QueuesSection",
    "RawVibrationSection",
    "SpoolSection",
    "StorageSection",
    "json_schema",
    "load_config",
    "parse_config",
]
