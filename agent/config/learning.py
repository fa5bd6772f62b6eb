"""What the agent learns on the device: ``commissioning`` baselines and ``adaptation`` (LoRA adapters)."""

from __future__ import annotations

from pydantic import Field, model_validator

from agent.commissioning.baseline import CommissioningConfig
from agent.commissioning.detector import DetectorConfig
from agent.config.base import ConfigPath, Section, StrList
from agent.config.errors import ConfigError, Problems


class CommissioningSection(Section):
    enabled: bool = Field(
        False,
        description="Learn each machine's normal from its first readings on the device, then score every "
        "process reading against it.",
    )
    sensors: StrList = Field(
        ("process*",),
        description="Glob patterns on the {sensor} tag of the multi-field process readings to learn and score.",
    )
    channels: StrList = Field(
        ("temperature", "current", "pressure"),
        min_length=1,
        description="Fields forming one step, in this order; readings lacking one are counted and skipped.",
    )
    commissioning_steps: int = Field(
        400,
        description="Readings learned before scoring starts (400 at 1 Hz is under 7 minutes; SKAB's protocol).",
    )
    commissioning_s: float | None = Field(
        None,
        description="If set, learn for this many seconds (from the first reading) instead of commissioning_steps "
        "readings.",
    )
    smoothing_steps: int = Field(30, description="Causal moving average of the standardized signals, in readings.")
    threshold_factor: float = Field(
        2.4,
        description="Threshold = this factor x the largest score seen while commissioning (label-free).",
    )
    state_path: ConfigPath | None = Field(
        None,
        description="Baselines survive restarts in this file (collection continues, fitted ones keep scoring); "
        "null = commissioning_baselines.json beside the spool.",
    )
    save_interval_s: float = Field(
        60.0,
        gt=0,
        description="Save the baselines at most this often while they only progress (a phase change, a new "
        "machine or a rebaseline is saved at once, and everything at stop); a crash loses at most this much "
        "commissioning progress.",
    )

    def to_commissioning_config(self) -> CommissioningConfig:
        try:
            return CommissioningConfig(
                commissioning_steps=self.commissioning_steps,
                commissioning_s=self.commissioning_s,
                detector=DetectorConfig(smoothing_steps=self.smoothing_steps, threshold_factor=self.threshold_factor),
            )
        except ValueError as exc:
            raise ConfigError("commissioning", str(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> CommissioningSection:
        problems = Problems()
        try:
            self.to_commissioning_config()
        except ConfigError as exc:
            problems.add("", exc.reason)
        problems.check()
        return self


class AdaptationAutoSection(Section):
    enabled: bool = Field(
        False,
        description="Adapt each machine's anomaly models at the end of its commissioning period (its first "
        "windows); needs adaptation.enabled.",
    )
    windows: int = Field(
        400,
        ge=20,
        description="First windows of each machine, assumed normal, to adapt on (the last 20 % are held out for "
        "its threshold).",
    )
    min_anomalous_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Adapt only machines whose windows the fleet model flagged at least this often (0 = all).",
    )
    models: StrList = Field((), description="Model ids to adapt automatically; empty = every anomaly model.")
    rank: int = Field(1, gt=0, description="Rank r of the low-rank matrices A (fan_in x r) and B (r x fan_out).")
    alpha: float = Field(2.0, gt=0, description="Scale of the update: W + (alpha / rank) * A @ B.")
    layers: StrList = Field((), description="Dense layers (MatMul node names) to adapt; empty = all of them.")
    refit_standardization: bool = Field(
        False,
        description="Also use the machine's own input mean and scale (helps at another operating point).",
    )


class AdaptationSection(Section):
    enabled: bool = Field(
        False,
        description="Serve per-machine LoRA adapters of the anomaly models, found in dir/{model_id}/{machine}/ "
        "(pdm-agent adapt writes them there).",
    )
    dir: ConfigPath | None = Field(
        None,
        description="Where adapters are found and written (automatic mode, pdm-agent adapt); null = adapters "
        "beside the spool.",
    )
    reload_interval_s: float = Field(
        10.0,
        ge=0,
        description="How often dir is rescanned for new or changed adapters; 0 = only at start and after training.",
    )
    auto: AdaptationAutoSection = Field(
        default_factory=AdaptationAutoSection,
        description="Adapt machines on the device at the end of their commissioning period.",
    )

    @model_validator(mode="after")
    def _check(self) -> AdaptationSection:
        problems = Problems()
        if self.auto.enabled and not self.enabled:
            problems.add("auto.enabled", "needs adaptation.enabled: true (adapters must be served)")
        problems.check()
        return self
