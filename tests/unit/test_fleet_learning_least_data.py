"""Fleets where some clients hold little data (``fleet evaluate --least-data-clients``): which clients shrink,
by how much, that their held-out rows stay the same, and that the comparison reports them one by one."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from agent.features.bearing import BearingFeatureSpec
from pdm_tools.datasets.cwru import CLASS_NAMES, Recording
from pdm_tools.evaluation.skab import SkabFile
from pdm_tools.fleet_learning import cli as fleet_cli
from pdm_tools.fleet_learning.data import ClientDataError
from pdm_tools.fleet_learning.evaluate import compare
from pdm_tools.fleet_learning.fleets import cwru_fleet, least_data_choice
from pdm_tools.fleet_learning.params import LocalTraining, init_mlp, local_train
from pdm_tools.fleet_learning.process import init_autoencoder
from pdm_tools.fleet_learning.process_app import ProcessFederation, ProcessOutcome
from pdm_tools.fleet_learning.process_eval import compare_process, uneven_skab_fleet
from pdm_tools.fleet_learning.server_app import FederationConfig, Outcome
from pdm_tools.models.defect_mlp import MlpConfig

RATE = 12_000.0
SPEC = BearingFeatureSpec()


def _recordings(seconds: float = 4.0) -> list[Recording]:
    """A CWRU-like set: loads 0 and 1, one recording per fault kind and load (each kind its own tone, louder
    with the load), and one long healthy recording at load 0."""
    rng = np.random.default_rng(3)
    t = np.arange(int(seconds * RATE)) / RATE
    out = [Recording("Normal_0.npz", "normal", "normal", 0, 1797.0, RATE, rng.normal(0, 0.1, 3 * len(t)))]
    for load in (0, 1):
        for k, kind in enumerate(CLASS_NAMES[1:]):
            tone = (1.0 + load) * np.sin(2 * np.pi * (800.0 + 900.0 * k) * t)
            samples = tone + rng.normal(0, 0.1, len(t))
            out.append(Recording(f"{kind}_{load}.npz", kind, kind, load, 1797.0 - 20 * load, RATE, samples))
    return out


def test_least_data_clients_are_spread_over_loads_and_at_least_one_client_keeps_everything() -> None:
    assert least_data_choice([0, 1, 2], 1, 2) == ["load0-0", "load1-0"]
    assert least_data_choice([1, 2], 3, 3) == ["load1-2", "load2-2", "load1-1"]
    assert least_data_choice([0, 1], 1, 0) == []
    with pytest.raises(ClientDataError, match="--least-data-clients 3: must leave at least one of the 3"):
        least_data_choice([0, 1, 2], 1, 3)


def test_a_least_data_client_trains_on_a_fraction_and_is_scored_on_the_same_held_out_rows() -> None:
    recordings = _recordings()
    full = cwru_fleet(recordings, SPEC, 2)
    uneven = cwru_fleet(recordings, SPEC, 2, least_data=1, fraction=0.25)
    assert uneven.least_data == ("load0-0",) and full.least_data == ()
    small, big = uneven.clients
    assert small.name == "load0-0" and np.array_equal(big.x, full.clients[1].x)
    # The same held-out rows with little or all of its data: every model is scored on them alike.
    assert np.array_equal(small.x_held, full.clients[0].x_held)
    assert np.array_equal(small.y_held, full.clients[0].y_held)
    # Every class is still there, each with about a quarter of its rows, the earliest ones (a shorter record).
    full_counts = np.bincount(full.clients[0].y, minlength=4)
    small_counts = np.bincount(small.y, minlength=4)
    assert (small_counts >= 2).all() and small_counts.sum() < 0.4 * full_counts.sum()
    first = np.flatnonzero(full.clients[0].y == 1)[: small_counts[1]]
    assert np.array_equal(small.x[small.y == 1], full.clients[0].x[first])
    for bad in (0.0, 1.0):
        with pytest.raises(ClientDataError, match=f"--least-data-fraction {bad}"):
            cwru_fleet(recordings, SPEC, 2, least_data=1, fraction=bad)
    # A load left out has no clients to shrink: the choice is among the loads that train.
    left = cwru_fleet(recordings, SPEC, 2, leave_out_load=0, least_data=0)
    assert [c.name for c in left.clients] == ["load1-0"]
    with pytest.raises(ClientDataError, match="must leave at least one of the 1"):
        cwru_fleet(recordings, SPEC, 2, leave_out_load=0, least_data=1, fraction=0.5)


def test_comparison_reports_each_least_data_client_under_every_model() -> None:
    fleet = cwru_fleet(_recordings(), SPEC, 2, least_data=1, fraction=0.25)
    config = FederationConfig(class_names=CLASS_NAMES, rounds=1, hidden=(8,))
    # Stand-in for the federation's model: a few epochs on the big client's rows (no simulation needed).
    big = fleet.clients[1]
    start = init_mlp(big.x.mean(axis=0), big.x.std(axis=0) + 1e-6, (8,), CLASS_NAMES, seed=0)
    model, _ = local_train(start, big.x, big.y, LocalTraining(epochs=30, learning_rate=1e-2), seed=0)
    result = compare(fleet, config, Outcome(model=model, initial=start), MlpConfig(hidden=(8,), max_iter=50))
    least = result["least_data_clients"]
    entry = least["clients"]["load0-0"]
    assert entry["rows"] == len(fleet.clients[0].y) == result["client_rows"]["load0-0"]
    assert entry["held_out_rows"] == len(fleet.clients[0].y_held)
    assert entry["federated_macro_f1"] == result["federated"]["per_client_macro_f1"]["load0-0"]
    assert entry["central_macro_f1"] == result["central"]["per_client_macro_f1"]["load0-0"]
    assert entry["local_macro_f1"] == result["local"]["own_client_macro_f1"]["load0-0"]
    assert least["mean"]["federated_macro_f1"] == entry["federated_macro_f1"]
    text = fleet_cli.render_text({"dataset": "cwru", **result})
    assert "  least data: load0-0 (" in text


def _skab_files(n: int) -> list[SkabFile]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        x = rng.normal(5.0, 1.0, (500, 2))
        y = np.zeros(500, bool)
        y[450:] = True
        x[450:, 1] += 4.0
        out.append(SkabFile(f"{'valve1' if i % 3 else 'other'}/{i}.csv", ("a", "b"), x, y))
    return out


def test_skab_least_data_clients_keep_a_fraction_of_their_machine_runs() -> None:
    files = _skab_files(9)  # other: 3 files, valve1: 6
    clients, least = uneven_skab_fleet(files, 3, least_data=2, fraction=0.4)
    assert least == ["other", "valve1-1"]
    assert [(c.name, len(c.values)) for c in clients] == [("other", 1), ("valve1-0", 3), ("valve1-1", 1)]
    # A least-data client keeps its first runs; nothing moves to another client.
    assert np.array_equal(clients[0].values[0], files[0].values)
    with pytest.raises(ClientDataError, match="--least-data-clients 3: must leave at least one of the 3"):
        uneven_skab_fleet(files, 3, least_data=3, fraction=0.4)
    with pytest.raises(ClientDataError, match=r"--least-data-fraction 1\.5"):
        uneven_skab_fleet(files, 3, least_data=1, fraction=1.5)

    fed = ProcessFederation(FederationConfig(class_names=(), rounds=1), 2, hidden=(4, 2, 4))
    start = init_autoencoder(2, fed.hidden, 0)
    result = compare_process(clients, fed, ProcessOutcome(model=start, initial=start), least_data=least)
    entry = result["least_data_clients"]["clients"]["other"]
    assert entry["files"] == 1 and entry["rows"] == result["client_rows"]["other"]
    assert entry["federated"]["f1"] == result["federated"]["per_client_f1"]["other"]
    assert entry["local"]["f1"] == result["local"]["own_client_f1"]["other"]
    pooled = result["least_data_clients"]["pooled"]["local"]
    assert pooled["tp"] == sum(result["least_data_clients"]["clients"][n]["local"]["tp"] for n in least)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fleet_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_least_data_option_is_refused_where_it_means_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    for dataset in ("synthetic", "simulator", "simulator-vibration"):
        assert fleet_cli.main(_args("evaluate", "--dataset", dataset, "--least-data-clients", "1")) == 2
        assert "--least-data-clients is for cwru and skab" in capsys.readouterr().err
