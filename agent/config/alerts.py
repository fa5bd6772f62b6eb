"""``alerts``: the rules of the alert engine, by alert type, and its state file."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from agent.alerts.commands import MIN_KEY_BYTES, CommandAuth, Operator
from agent.alerts.engine import MAX_SILENCE_S, SilenceLimits
from agent.alerts.rules import AlertRule, RuleBook
from agent.config.base import ConfigPath, EnvStr, Section, StrList, secret_from_file
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


class OperatorSection(Section):
    """One operator who may command the agent: the key they sign with, and what they may do."""

    key: EnvStr | None = Field(
        None,
        repr=False,
        description=f"The operator's HMAC-SHA256 key (at least {MIN_KEY_BYTES} bytes), better ${{PDM_OP_KEY}} or "
        "key_file. Never logged, not in repr.",
    )
    key_file: ConfigPath | None = Field(
        None, description="A file holding the key (one line, read once at start); exclusive with key."
    )
    commands: StrList = Field(
        (),
        description="The commands this operator may give (ack, silence, unsilence, rebaseline); empty = all.",
    )

    @model_validator(mode="after")
    def _check(self) -> OperatorSection:
        problems = Problems()
        secret_from_file(self, "key", "key_file", problems)
        if not problems.items:
            if self.key is None:
                problems.add("key", "is required (or key_file)")
            elif len(self.key.encode()) < MIN_KEY_BYTES:
                problems.add("key", f"needs at least {MIN_KEY_BYTES} bytes (e.g. openssl rand -hex 32)")
        problems.check()
        return self


class CommandsSection(Section):
    """Who may send operator commands on ``{base}/commands``, and the bounds of silences (docs/security.md)."""

    auth: Literal["hmac", "none"] = Field(
        "hmac",
        description="hmac: a command must be signed with the key of an operator below (HMAC-SHA256); none: unsigned "
        "commands are accepted and only the broker's ACL decides who may command.",
    )
    operators: dict[str, OperatorSection] = Field(
        default_factory=dict,
        description="Operator id (the key id, and the 'by' of their commands) -> key and allowed commands. "
        "auth hmac without operators: every command is refused.",
    )
    max_clock_skew_s: float = Field(
        300.0,
        gt=0,
        description="A signed command must be this close to the agent's clock; its nonce is remembered this long.",
    )
    max_silence_s: float = Field(
        86_400.0, gt=0, le=MAX_SILENCE_S, description="The longest silence a command may set (at most 7 days)."
    )
    max_silences_per_machine: int = Field(10, gt=0, description="Silences of one machine at once, at most.")
    max_silences: int = Field(200, gt=0, description="Silences of all machines at once, at most.")

    @model_validator(mode="after")
    def _check(self) -> CommandsSection:
        problems = Problems()
        for name in self.operators:
            if not name.strip() or len(name) > 200 or any(c < " " for c in name):
                problems.add(f"operators.{name}", "an operator id is 1 to 200 printable characters")
        problems.check()
        return self

    def silence_limits(self) -> SilenceLimits:
        return SilenceLimits(self.max_silence_s, self.max_silences_per_machine, self.max_silences)

    def command_auth(self, agent_id: str, started_ns: int) -> CommandAuth:
        """The check every command passes before it is applied (built once, when the agent starts)."""
        operators = {
            name: Operator((op.key or "").encode(), frozenset(op.commands)) for name, op in self.operators.items()
        }
        return CommandAuth(agent_id, operators, self.auth, self.max_clock_skew_s, started_ns)


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
    commands: CommandsSection = Field(
        default_factory=CommandsSection, description="Who may command the agent, and the bounds of silences."
    )

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
