"""``alerts``: the rules of the alert engine, by alert type, and its state file."""

from __future__ import annotations

from pydantic import Field, model_validator

from agent.alerts.rules import AlertRule, RuleBook
from agent.config.base import ConfigPath, Section
from agent.config.errors import Problems


class AlertRuleSection(Section):
    """One alert type's rule (``agent/alerts/rules.py``); ratios are score / the model's threshold.

    Each field is checked here; how the fields go together (``exit <= enter`` ...) is checked by
    ``AlertRule`` on the merged rule of every type, in ``AlertsSection``.
    """

    enter: float = Field(1.0, description="A window is hot above enter x threshold ...")
    exit: float = Field(0.8, description="... and cool below exit x threshold (hysteresis: in between it is neither).")
    raise_n: int = Field(2, description="Raise when raise_n of the last raise_m windows are hot (N-of-M debounce).")
    raise_m: int = Field(3, description="The M of N-of-M.")
    min_duration_s: float = Field(
        0.0, description="And the hot run has lasted this long before an event is raised (0 = no minimum)."
    )
    clear_after: int = Field(5, description="Clear after this many consecutive cool windows.")
    cooldown_s: float = Field(60.0, description="No new event for the same source and type this soon after a clear.")
    update_min_interval_s: float = Field(
        10.0, description="At most one update (severity or defect class changed) per interval."
    )
    renotify_s: float = Field(3600.0, description="Re-publish an open, unacknowledged event this often (0 = never).")
    flap_window_s: float = Field(
        1800.0,
        description="A clear that would be the flap_max_transitions-th new/clear within this window holds the "
        "event open instead (one update says so), until no window has been hot for this long.",
    )
    flap_max_transitions: int = Field(6, description="See flap_window_s.")
    stale_after_s: float = Field(
        3600.0, description="Clear an open event whose source has sent nothing for this long (reason no_data)."
    )
    no_data_after_s: float = Field(
        0.0, description="A source silent this long opens a no_data event (dropouts); 0 = off."
    )
    major_ratio: float = Field(
        1.5, description="Severity: warning above the threshold, major from major_ratio x threshold ..."
    )
    critical_ratio: float = Field(3.0, description="... critical from critical_ratio x threshold.")

    def rule(self) -> AlertRule:
        """This rule as the alert engine's value (``ValueError`` when the fields do not go together)."""
        return AlertRule(**self.model_dump())


class AlertsSection(Section):
    default: AlertRuleSection = Field(
        default_factory=AlertRuleSection,
        description="The rule of every alert type without its own entry in types.",
    )
    types: dict[str, AlertRuleSection] = Field(
        default_factory=dict,
        description="Rules by alert type (the model id, e.g. vibration-anomaly): only the keys that differ "
        "from default.",
    )
    state_path: ConfigPath | None = Field(
        None,
        description="Open events and silences survive restarts in this file; null = alert_state.json beside the spool.",
    )
    top_features: int = Field(5, ge=0, le=10, description="Contributing features named in each alert (0 = none).")

    @model_validator(mode="after")
    def _check(self) -> AlertsSection:
        problems = Problems()
        try:
            self.default.rule()
        except ValueError as exc:
            problems.add("default", str(exc))
        for alert_type in self.types:
            try:
                self._merged(alert_type)
            except ValueError as exc:
                problems.add(f"types.{alert_type}", str(exc))
        problems.check()
        return self

    def _merged(self, alert_type: str) -> AlertRule:
        override = self.types[alert_type]
        return AlertRule(**{**self.default.model_dump(), **override.model_dump(include=override.model_fields_set)})

    def rulebook(self) -> RuleBook:
        """The default rule and, per alert type, the default with that type's keys replaced."""
        return RuleBook(self.default.rule(), {alert_type: self._merged(alert_type) for alert_type in self.types})
