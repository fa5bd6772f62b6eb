"""The shipped anomaly threshold rule (``Manifest.threshold_rule``), label-free, from healthy scores.

``pdm-agent train`` sets each anomaly model's threshold with it; ``pdm-agent model quantize`` measures every
candidate at its own threshold by the same rule (and ``--ship`` recomputes the shipped one's).
"""

from __future__ import annotations

import math

import numpy as np

# Threshold rule: peaks over threshold (an exponential tail fitted to the top 1 % of held-out healthy
# scores, as in SPOT, Siffer et al., KDD 2017), extrapolated to a false-alarm probability per window.
TAIL_QUANTILE = 0.99
FALSE_ALARM_PER_WINDOW = 1e-8
MAX_FACTOR = 1.5
THRESHOLD_RULE = (
    f"max(u + beta * ln({1 - TAIL_QUANTILE:g} / {FALSE_ALARM_PER_WINDOW:g}), {MAX_FACTOR:g} x max) over the "
    f"shipped model's scores on held-out healthy windows of machines not used for fitting, where "
    f"u = q{TAIL_QUANTILE * 100:g} and beta = mean excess over u: an exponential tail fitted to the top "
    f"{(1 - TAIL_QUANTILE) * 100:g} % (peaks over threshold) and extrapolated to a false-alarm probability "
    f"of {FALSE_ALARM_PER_WINDOW:g} per window, never below {MAX_FACTOR:g} x the largest healthy score. "
    "Label-free. Why so far out: one vibration window every 0.2 s is over 400,000 windows a day per "
    "machine (process: 17,000), far more than validation holds."
)


def threshold_from_scores(scores: np.ndarray) -> float:
    """The anomaly threshold from held-out healthy scores (see ``THRESHOLD_RULE``).

    >>> threshold_from_scores(np.linspace(0.0, 1.0, 1001))  # tail too thin: 1.5 x max wins
    1.5
    >>> threshold_from_scores(np.r_[np.zeros(990), np.linspace(0.1, 1.0, 10)])  # ~ 0.55 x ln(1e6)
    7.58572
    """
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0 or not np.isfinite(s).all():
        raise ValueError("threshold needs a non-empty set of finite validation scores")
    u = float(np.quantile(s, TAIL_QUANTILE))
    excess = s[s > u] - u
    beta = float(excess.mean()) if len(excess) else 0.0
    tail = u + beta * math.log((1 - TAIL_QUANTILE) / FALSE_ALARM_PER_WINDOW)
    return round_sig(max(tail, MAX_FACTOR * float(s.max())))


def round_sig(value: float, digits: int = 6) -> float:
    """Round to ``digits`` significant digits (manifests stay readable and diffs stay small).

    >>> round_sig(0.000123456789)
    0.000123457
    """
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))
