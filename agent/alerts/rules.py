"""Alert rules: when a stream of window scores opens, updates and clears an alert event (pure values).

One ``AlertRule`` per alert type (an alert type is the id of the model whose scores it follows, for example
``vibration-anomaly``); ``RuleBook`` gives the rule of a type, falling back to the default rule.
All comparisons are on the ratio ``score / threshold`` so one rule fits models with different thresholds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["warning", "major", "critical"]
SEVERITIES: tuple[Severity, ...] = ("warning", "major", "critical")


@dataclass(frozen=True, slots=True)
class AlertRule:
    """How one alert type behaves (see ``config/agent.yaml`` for the operator's view of each knob).

    - hot window: ``score / threshold > enter``; cool window: ``score / threshold < exit`` (hysteresis:
      a window in between neither raises nor counts towards clearing).
    - raise when at least ``raise_n`` of the last ``raise_m`` windows are hot, the hot run has lasted
      ``min_duration_s`` (0 = no minimum), and ``cooldown_s`` has passed since this key's last clear.
    - clear after ``clear_after`` consecutive cool windows.
    - ``update`` when the severity or the defect class changes, at most once per ``update_min_interval_s``.
    - ``renotify_s``: an open, unacknowledged event is re-published this often (0 = never).
    - flapping: when a clear would be the ``flap_max_transitions``-th new/clear transition of the key within
      ``flap_window_s``, the event is held open (one ``update`` says so) until no window has been hot for
      ``flap_window_s``.
    - ``stale_after_s``: an open event whose source sends no scored window for this long is cleared.
    - ``no_data_after_s``: a source of this type that has sent no scored window for this long opens an
      event of the alert type ``no_data`` (0 = never), cleared by its next window.
    - severity: ``warning`` above the threshold, ``major`` from ``major_ratio``, ``critical`` from
      ``critical_ratio`` times the threshold.
    """

    enter: float = 1.0
    exit: float = 0.8
    raise_n: int = 2
    raise_m: int = 3
    min_duration_s: float = 0.0
    clear_after: int = 5
    cooldown_s: float = 60.0
    update_min_interval_s: float = 10.0
    renotify_s: float = 3600.0
    flap_window_s: float = 1800.0
    flap_max_transitions: int = 6
    stale_after_s: float = 3600.0
    no_data_after_s: float = 0.0
    major_ratio: float = 1.5
    critical_ratio: float = 3.0

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.exit <= self.enter:
            problems.append(f"exit ({self.exit}) must be > 0 and <= enter ({self.enter})")
        if not 1 <= self.raise_n <= self.raise_m:
            problems.append(f"raise_n ({self.raise_n}) must be between 1 and raise_m ({self.raise_m})")
        if self.clear_after < 1:
            problems.append(f"clear_after must be >= 1, got {self.clear_after}")
        if self.flap_max_transitions < 2:
            problems.append(f"flap_max_transitions must be >= 2, got {self.flap_max_transitions}")
        for name in (
            "min_duration_s",
            "cooldown_s",
            "update_min_interval_s",
            "renotify_s",
            "flap_window_s",
            "no_data_after_s",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stale_after_s <= 0:
            problems.append(f"stale_after_s must be > 0, got {self.stale_after_s}")
        if not self.enter <= self.major_ratio <= self.critical_ratio:
            problems.append(
                f"severity ratios must satisfy enter <= major_ratio <= critical_ratio, "
                f"got {self.enter} / {self.major_ratio} / {self.critical_ratio}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def severity(self, ratio: float) -> Severity:
        """Severity of a window whose score is ``ratio`` times the threshold.

        >>> AlertRule().severity(1.2), AlertRule().severity(2.0), AlertRule().severity(9.0)
        ('warning', 'major', 'critical')
        """
        if ratio >= self.critical_ratio:
            return "critical"
        if ratio >= self.major_ratio:
            return "major"
        return "warning"


@dataclass(frozen=True, slots=True)
class RuleBook:
    """The default rule and the rules of named alert types."""

    default: AlertRule = field(default_factory=AlertRule)
    by_type: Mapping[str, AlertRule] = field(default_factory=dict)

    def rule(self, alert_type: str) -> AlertRule:
        return self.by_type.get(alert_type, self.default)
