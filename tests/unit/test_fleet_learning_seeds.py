"""``fleet evaluate --seeds N``: one result over several seeds (means, spreads, paired differences)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from pdm_tools.fleet_learning import cli as fleet_cli
from pdm_tools.fleet_learning.fleets import synthetic_fleet
from pdm_tools.fleet_learning.seeds import over_seeds, render_seeds_text


def _run(seed: int, federated: float, central: float, local: float) -> dict[str, object]:
    return {
        "dataset": "skab",
        "federated": {"f1": federated, "tp": 10 + seed},
        "central": {"f1": central, "tp": 11},
        "local": {"f1": local, "tp": 12},
        "bytes_per_round": 17068,
        "rounds": 20,
        "federation": {"strategy": "fedavg", "seed": seed},
    }


def test_over_seeds_pairs_federated_with_central_seed_by_seed() -> None:
    runs = [_run(1, 0.60, 0.59, 0.50), _run(2, 0.70, 0.69, 0.75), _run(3, 0.50, 0.49, 0.55)]
    result = over_seeds(runs, [1, 2, 3])
    assert result["seeds"] == [1, 2, 3] and result["runs"] == runs
    # The single run's shape, with means where the figures were; what the seed does not change, kept.
    assert result["federated"]["f1"] == pytest.approx(0.6) and "tp" not in result["federated"]
    assert result["bytes_per_round"] == 17068 and result["federation"] == {"strategy": "fedavg"}
    assert result["over_seeds"]["central"]["f1"]["values"] == [0.59, 0.69, 0.49]
    assert result["over_seeds"]["central"]["f1"]["std"] == pytest.approx(0.1)
    # Federated is 1 point above central in every seed: pairing removes the 10-point seed noise they share.
    paired = result["paired"]["federated_minus_central"]["f1"]
    assert paired["mean"] == pytest.approx(0.01) and paired["ci95"] == pytest.approx([0.01, 0.01])
    # Against local-only the differences disagree in sign: the interval spans 0.
    versus_local = result["paired"]["federated_minus_local"]["f1"]
    assert versus_local["values"] == pytest.approx([0.1, -0.05, -0.05])
    low, high = versus_local["ci95"]
    assert low < 0 < high
    text = render_seeds_text(result)
    assert "federated f1: 0.6 ± 0.1 [0.5, 0.7]" in text
    assert "federated_minus_central f1: +0.01 (95 % CI +0.01 to +0.01)" in text


def test_over_seeds_needs_a_run_per_seed() -> None:
    with pytest.raises(ValueError, match="one run per seed and at least 2"):
        over_seeds([_run(1, 0.6, 0.6, 0.6)], [1])
    with pytest.raises(ValueError, match="one run per seed"):
        over_seeds([_run(1, 0.6, 0.6, 0.6), _run(2, 0.6, 0.6, 0.6)], [1, 2, 3])


def _fleet_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fleet_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_fleet_evaluate_with_seeds_runs_each_seed_and_pairs_them(capsys: pytest.CaptureFixture[str]) -> None:
    """Two real simulations (synthetic fleet of 3, 1 round), seeds 7 and 8."""
    argv = ("evaluate", "--dataset", "synthetic", "--clients", "3", "--rounds", "1", "--seed", "7")
    assert fleet_cli.main(_fleet_args(*argv, "--seeds", "0")) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert fleet_cli.main(_fleet_args(*argv, "--seeds", "2", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seeds"] == [7, 8]
    assert [run["federation"]["seed"] for run in result["runs"]] == [7, 8]
    per_seed = [run["federated"]["macro_f1"] for run in result["runs"]]
    assert result["federated"]["macro_f1"] == pytest.approx(np.mean(per_seed), abs=1e-6)
    differences = [run["federated"]["macro_f1"] - run["central"]["macro_f1"] for run in result["runs"]]
    assert result["paired"]["federated_minus_central"]["macro_f1"]["values"] == pytest.approx(differences, abs=1e-6)
    assert {"federated", "central", "local", "bytes_per_round", "rounds"} <= set(result)
    # The quantization gate ran on every client's held-out rows after the last round (on unless --no-quantize).
    for seed, run in zip((7, 8), result["runs"], strict=True):
        gate = run["quantization_gate"]
        assert len(gate["clients"]) == 3 and gate["ship"] in ("int8", "fp32"), gate
        held_out = sum(len(c.y_held) for c in synthetic_fleet(3, 300, seed).clients)
        assert gate["fleet"]["rows"] == sum(c["rows"] for c in gate["clients"].values()) == held_out


def test_over_seeds_pairs_the_adapters_entries_too() -> None:
    runs = [
        {"dataset": "cwru", "adapters": {"federated": {"macro_f1": f}, "central": {"macro_f1": c}, "rounds": 20}}
        for f, c in ((0.9, 0.95), (0.8, 0.9))
    ]
    result = over_seeds(runs, [42, 43])
    assert result["adapters"]["federated"]["macro_f1"] == pytest.approx(0.85)
    assert result["paired"]["federated_minus_central"]["macro_f1"]["values"] == pytest.approx([-0.05, -0.1])
    assert "  federated macro_f1: 0.85 ± " in render_seeds_text(result)
