"""``fleet evaluate --seeds N``: the same evaluation with N seeds, and what holds across them.

One seed ranks nothing when the models' own training noise is as large as the differences being measured
(SKAB's process autoencoder: F1 moves by up to 6 points between seeds of the same federation). A seed sets
the initial weights, the clients' batch orders and, for the simulated fleets, the machines; the data split
and the settings stay. The result keeps the single run's shape, its figures replaced by their means, and
adds per figure its spread over the seeds (``over_seeds``), the paired differences federated minus central
and federated minus local-only, seed by seed, with a 95 % confidence interval of their mean (``paired``: the
difference of two models trained from the same start on the same data is what the target is about, and
pairing removes the part of the noise the two share), and every run whole (``runs``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

# The entries whose figures are compared seed by seed (the issue's ``federated``, ``central``, ``local``).
PAIRED = (("federated", "central"), ("federated", "local"))


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, extremes and the values themselves.

    >>> spread([0.5, 0.7, 0.6])
    {'mean': 0.6, 'std': 0.1, 'min': 0.5, 'max': 0.7, 'values': [0.5, 0.7, 0.6]}
    """
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {
        "mean": round(float(a.mean()), 6),
        "std": round(std, 6),
        "min": round(float(a.min()), 6),
        "max": round(float(a.max()), 6),
        "values": [round(float(v), 6) for v in a],
    }


def mean_with_ci(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """``spread`` plus the two-sided ``level`` confidence interval of the mean (Student's t, n - 1 degrees of
    freedom; it assumes the seeds' values independent and roughly normal).

    >>> r = mean_with_ci([1.0, 2.0, 3.0])
    >>> r["mean"], r["ci95"]
    (2.0, [-0.484138, 4.484138])
    """
    out = spread(values)
    n = len(values)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * out["std"] / math.sqrt(n)
    out[f"ci{round(level * 100)}"] = [round(out["mean"] - half, 6), round(out["mean"] + half, 6)]
    return out


def summarize(runs: Sequence[Any]) -> Any:
    """The float figures the ``runs`` share, each replaced by its ``spread``; nested dicts kept; anything else
    (counts, names, settings) left out. ``None`` when the runs share no float figure there.

    >>> summarize([{"f1": 0.5, "tp": 3, "by": {"a": 0.1}}, {"f1": 0.7, "tp": 4, "by": {"a": 0.3}}])["by"]["a"]["mean"]
    0.2
    """
    first = runs[0]
    if all(isinstance(r, float) for r in runs):
        return spread(runs)
    if not all(isinstance(r, Mapping) for r in runs):
        return None
    out = {}
    for key in first:
        if all(key in r for r in runs):
            inner = summarize([r[key] for r in runs])
            if inner is not None:
                out[key] = inner
    return out or None


def _is_spread(value: Mapping[str, Any]) -> bool:
    """A figure's ``spread`` (else a dict of figures: a figure may be named ``mean``, as in ``least_data``)."""
    return "values" in value and "std" in value


def _means(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``summary`` with each spread replaced by its mean: the single run's shape."""
    return {k: v["mean"] if _is_spread(v) else _means(v) for k, v in summary.items()}


def paired_differences(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Seed by seed, federated minus central and federated minus local-only for every float figure at the top
    of both entries (macro-F1; F1, FAR, MAR), with the mean's confidence interval. The entries are at the top
    of a run or, for ``--adapters``, under ``adapters``."""
    out: dict[str, Any] = {}
    runs = [r["adapters"] if isinstance(r.get("adapters"), Mapping) else r for r in runs]
    for a, b in PAIRED:
        if not all(isinstance(r.get(a), Mapping) and isinstance(r.get(b), Mapping) for r in runs):
            continue
        figures = [k for k, v in runs[0][a].items() if isinstance(v, float) and isinstance(runs[0][b].get(k), float)]
        out[f"{a}_minus_{b}"] = {k: mean_with_ci([r[a][k] - r[b][k] for r in runs]) for k in figures}
    return out


def over_seeds(runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """One result for ``runs`` (one per seed of ``seeds``, each a ``fleet evaluate`` result)."""
    if len(runs) != len(seeds) or len(runs) < 2:
        raise ValueError(f"over_seeds needs one run per seed and at least 2, got {len(runs)} for {list(seeds)}")
    summary = summarize(runs) or {}
    first = runs[0]
    # What does not depend on the seed (dataset, clients, rows, bytes, settings) as in the first run.
    fixed = {k: v for k, v in first.items() if k not in summary}
    if "federation" in fixed:
        fixed["federation"] = {k: v for k, v in fixed["federation"].items() if k != "seed"}
    return {
        **fixed,
        **_means(summary),
        "seeds": list(seeds),
        "over_seeds": summary,
        "paired": paired_differences(runs),
        "runs": list(runs),
    }


def render_seeds_text(result: Mapping[str, Any]) -> str:
    """Plain lines: each figure of the federated, central and local entries as mean ± std [min, max] over the
    seeds, then the paired differences with their 95 % intervals."""
    seeds = result["seeds"]
    lines = [f"{result.get('dataset', '')}: {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), mean ± std [min, max]"]
    summary = result["over_seeds"]
    summary = summary.get("adapters", summary)
    entries = [name for name in ("federated", "central", "local") if name in summary] or list(summary)
    for name in entries:
        for figure, s in _flat(summary[name]):
            lines.append(f"  {name} {figure}: {s['mean']:.4g} ± {s['std']:.3g} [{s['min']:.4g}, {s['max']:.4g}]")
    for pair, figures in result["paired"].items():
        for figure, s in figures.items():
            lo, hi = s["ci95"]
            lines.append(f"  {pair} {figure}: {s['mean']:+.4g} (95 % CI {lo:+.4g} to {hi:+.4g})")
    return "\n".join(lines)


def _flat(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key, value in summary.items():
        if _is_spread(value):
            out.append((prefix + key, value))
        else:
            out += _flat(value, f"{prefix}{key}.")
    return out
