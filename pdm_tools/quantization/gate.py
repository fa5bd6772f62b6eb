"""The ship gate: which candidate (FP32 parent included) ships, and why every other one does not.

Pure decision logic: candidates come in with their measured size, latency and metric deltas against the
FP32 parent on held-out data; out comes the chosen candidate and one reason per loser. No ONNX here, so
the rules are unit-tested on plain numbers (``tests/unit/test_quant_gate.py``).

Rules (``Criteria`` holds the numbers; they are recorded in the manifest with the outcome):

1. A candidate that failed to build or to run loses ("error: ...").
2. Accuracy, on held-out data, against the FP32 parent:
   - classifier: accuracy and macro-F1 may drop by at most 0.5 points for 8-bit candidates and 1 point for
     candidates with 4-bit layers, and the predicted class must agree with FP32's on ≥ 99 % (8-bit) or
     ≥ 98 % (4-bit) of the rows;
   - anomaly model: AUC may drop by at most 0.005, and the detection rate at the operating false-alarm
     rate (each model's own threshold, set by the shipped threshold rule on the held-out healthy rows)
     by at most 1 point.
   A metric that was not measured (no held-out data) fails the candidate: nothing ships unchecked.
3. Latency: a quantized candidate whose p50 per window (at the configured batch size and thread count)
   is above its FP32 parent's never ships. Because a shared 2-core box is noisy, it must also be faster
   in every interleaved timing round (``round_p50_us``), not just in the pooled p50: a candidate that
   is only "faster" by noise stays out.
4. Of the candidates that pass, the cheapest ships: lowest p50 per window, then smallest file, then the
   earlier candidate in the list (the FP32 parent comes first, so an exact tie keeps FP32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Task = Literal["classifier", "anomaly"]
PARENT = "fp32"


@dataclass(frozen=True, slots=True)
class Criteria:
    """Pass limits of the gate (see the module docstring); points are percentage points."""

    max_accuracy_drop_points_8bit: float = 0.5
    max_accuracy_drop_points_4bit: float = 1.0
    min_agreement_8bit: float = 0.99
    min_agreement_4bit: float = 0.98
    max_auc_drop: float = 0.005
    max_detection_drop_points: float = 1.0
    max_latency_ratio: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Measured:
    """One candidate as the gate sees it.

    ``min_bits``: the narrowest weight width in the model (32 for the FP32 parent, 8, or 4).
    ``p50_us``/``p99_us``: microseconds per window at the configured batch and threads.
    ``metrics``: deltas against the parent on held-out data; keys ``accuracy_delta_points``,
    ``macro_f1_delta_points``, ``agreement`` (classifier) or ``auc_delta``, ``detection_delta_points``
    (anomaly). ``error``: why the candidate could not be built or run, if it could not.
    ``round_p50_us``: the p50 of each interleaved timing round (the same rounds for every candidate).
    """

    name: str
    min_bits: int
    size_bytes: int
    p50_us: float
    p99_us: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    round_p50_us: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    passed: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """The shipped candidate, why, and every candidate's verdict (losers: why they lost)."""

    chosen: str
    reason: str
    verdicts: tuple[Verdict, ...]

    def losers(self) -> dict[str, str]:
        return {v.name: "; ".join(v.reasons) for v in self.verdicts if v.name != self.chosen}

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "reason": self.reason,
            "verdicts": {v.name: {"passed": v.passed, "reasons": list(v.reasons)} for v in self.verdicts},
        }


def check(candidate: Measured, parent: Measured, task: Task, criteria: Criteria) -> Verdict:
    """Rules 1-3 for one candidate against its parent; the parent itself always passes."""
    if candidate.name == parent.name:
        return Verdict(candidate.name, True, ("the FP32 parent: the reference every candidate is measured against",))
    if candidate.error:
        return Verdict(candidate.name, False, (f"error: {candidate.error}",))
    fails: list[str] = []
    m = candidate.metrics
    four_bit = candidate.min_bits <= 4
    if task == "classifier":
        limit = criteria.max_accuracy_drop_points_4bit if four_bit else criteria.max_accuracy_drop_points_8bit
        for key, label in (("accuracy_delta_points", "accuracy"), ("macro_f1_delta_points", "macro-F1")):
            value = _metric(m, key, fails)
            if value is not None and value < -limit:
                fails.append(f"{label} drops {-value:.2f} points (limit {limit:g})")
        agreement = _metric(m, "agreement", fails)
        min_agreement = criteria.min_agreement_4bit if four_bit else criteria.min_agreement_8bit
        if agreement is not None and agreement < min_agreement:
            fails.append(f"agrees with FP32 on {agreement:.2%} of rows (needs {min_agreement:.0%})")
    else:
        auc = _metric(m, "auc_delta", fails)
        if auc is not None and auc < -criteria.max_auc_drop:
            fails.append(f"AUC drops {-auc:.4f} (limit {criteria.max_auc_drop:g})")
        det = _metric(m, "detection_delta_points", fails)
        if det is not None and det < -criteria.max_detection_drop_points:
            fails.append(
                f"detection at the operating false-alarm rate drops {-det:.2f} points "
                f"(limit {criteria.max_detection_drop_points:g})"
            )
    limit_us = parent.p50_us * criteria.max_latency_ratio
    if not candidate.p50_us <= limit_us:
        fails.append(
            f"slower than its FP32 parent: p50 {candidate.p50_us:.3g} vs {parent.p50_us:.3g} us per window "
            f"({candidate.p50_us / parent.p50_us:.2f}x); never shipped"
        )
    elif candidate.round_p50_us and len(candidate.round_p50_us) == len(parent.round_p50_us):
        rounds = list(zip(candidate.round_p50_us, parent.round_p50_us, strict=True))
        slower = [c / p for c, p in rounds if c > p * criteria.max_latency_ratio]
        if slower:
            fails.append(
                f"not reliably faster than its FP32 parent: p50 {candidate.p50_us / parent.p50_us:.2f}x overall but "
                f"slower in {len(slower)} of {len(rounds)} interleaved timing rounds (up to {max(slower):.2f}x)"
            )
    if fails:
        return Verdict(candidate.name, False, tuple(fails))
    return Verdict(candidate.name, True, ("passes accuracy and latency",))


def decide(candidates: Sequence[Measured], task: Task, criteria: Criteria | None = None) -> Decision:
    """Apply the rules to ``candidates`` (one of them named ``"fp32"``, the parent); see the module docstring."""
    criteria = criteria or Criteria()
    by_name = {c.name: c for c in candidates}
    if len(by_name) != len(candidates):
        raise ValueError("candidate names must be unique")
    if PARENT not in by_name:
        raise ValueError(f"the FP32 parent ({PARENT!r}) must be one of the candidates")
    parent = by_name[PARENT]
    verdicts = [check(c, parent, task, criteria) for c in candidates]
    order = {c.name: i for i, c in enumerate(candidates)}
    passing = [c for c, v in zip(candidates, verdicts, strict=True) if v.passed]
    best = min(passing, key=lambda c: (c.p50_us, c.size_bytes, order[c.name]))
    out: list[Verdict] = []
    for c, v in zip(candidates, verdicts, strict=True):
        if v.passed and c.name != best.name:
            v = Verdict(c.name, True, (_costlier(c, best),))
        out.append(v)
    if best.name == PARENT:
        reason = (
            "no quantized candidate passed the gate"
            if len(passing) == 1
            else "the FP32 parent is the cheapest candidate that passes"
        )
    else:
        reason = (
            f"cheapest candidate that passes: p50 {best.p50_us:.3g} us per window "
            f"({best.p50_us / parent.p50_us:.2f}x FP32), {best.size_bytes} bytes "
            f"({best.size_bytes / parent.size_bytes:.2f}x FP32)"
        )
    return Decision(best.name, reason, tuple(out))


def _costlier(c: Measured, best: Measured) -> str:
    if c.p50_us != best.p50_us:
        return f"passes, but {best.name} is faster (p50 {c.p50_us:.3g} vs {best.p50_us:.3g} us per window)"
    if c.size_bytes != best.size_bytes:
        return f"passes, ties on p50 with {best.name}, but is larger ({c.size_bytes} vs {best.size_bytes} bytes)"
    return f"passes, ties with {best.name} on p50 and size; the earlier candidate in the list wins"


def _metric(m: Mapping[str, float], key: str, fails: list[str]) -> float | None:
    value = m.get(key)
    if value is None or not math.isfinite(float(value)):
        fails.append(f"{key} not measured (no held-out data): nothing ships unchecked")
        return None
    return float(value)
