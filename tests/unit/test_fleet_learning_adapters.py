"""Federated LoRA adapters: the factors as Flower arrays, a client's training step from given factors, and a
small federation in Flower's simulation where only the factors travel."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from agent.adaptation.lora import BaseMlp, LoraWeights, loss_and_gradients
from pdm_tools.datasets.cwru import CLASS_NAMES
from pdm_tools.fleet_learning.adapter_eval import evaluate_adapter_fleet, simulate_adapters
from pdm_tools.fleet_learning.adapters import (
    AdamMoments,
    AdapterFederation,
    adapter_from_arrays,
    adapter_to_arrays,
    layer_parameters,
    train_adapter,
)
from pdm_tools.fleet_learning.fleets import synthetic_fleet
from pdm_tools.models.defect_mlp import DefectMlp, MlpConfig, export_onnx, fit_mlp

LAYERS = ("layer0_matmul", "layer2_matmul")


def _base(tmp_path: Path) -> tuple[DefectMlp, BaseMlp]:
    """A classifier fitted on the slow machines of a synthetic fleet; the fast ones are the shifted type."""
    fleet = synthetic_fleet(6, 200, seed=4)
    x = np.concatenate([c.x for c in fleet.clients[:3]])
    y = np.concatenate([c.y for c in fleet.clients[:3]])
    model = fit_mlp(x, y, CLASS_NAMES, 0, MlpConfig(hidden=(16, 8), max_iter=200))
    return model, BaseMlp.from_onnx(export_onnx(model, tmp_path / "base.onnx", {"model_id": "t", "version": "1"}))


def _loss(base: BaseMlp, lora: LoraWeights, x: np.ndarray, y: np.ndarray) -> float:
    return loss_and_gradients(base, lora, base.standardize(x, lora), y, need_gradients=False)[0]


def test_adapter_survives_flower_arrays_and_other_arrays_are_refused(tmp_path: Path) -> None:
    _, base = _base(tmp_path)
    lora = LoraWeights.initial(base, LAYERS, rank=2, alpha=4.0, seed=1)
    record = adapter_to_arrays(lora)
    assert sorted(record) == ["layer0_matmul.A", "layer0_matmul.B", "layer2_matmul.A", "layer2_matmul.B"]
    back = adapter_from_arrays(record, base, 2, 4.0)
    assert back.layers == LAYERS
    assert all(np.array_equal(back.factors[n][i], lora.factors[n][i]) for n in LAYERS for i in (0, 1))
    with pytest.raises(ValueError, match=r"not \(8, 3\) and \(3, 16\)"):
        adapter_from_arrays(record, base, 3, 4.0)
    with pytest.raises(ValueError, match="are not A/B factors"):
        adapter_from_arrays(ArrayRecord({"w0": Array(np.zeros((8, 2), np.float32))}), base, 2, 4.0)
    # The adapter is a small share of what a full-model round would carry.
    assert lora.n_parameters < 0.5 * layer_parameters(base)


def test_training_from_given_factors_lowers_the_loss_and_keeps_the_base(tmp_path: Path) -> None:
    _, base = _base(tmp_path)
    shifted = synthetic_fleet(6, 200, seed=4).clients[5]
    start = LoraWeights.initial(base, LAYERS, rank=2, alpha=4.0, seed=1)
    weights_before = [layer.weight.copy() for layer in base.layers]
    trained, _ = train_adapter(base, start, shifted.x, shifted.y, epochs=30, seed=3)
    assert _loss(base, trained, shifted.x, shifted.y) < 0.8 * _loss(base, start, shifted.x, shifted.y)
    assert all(np.array_equal(w, layer.weight) for w, layer in zip(weights_before, base.layers, strict=True))
    again, _ = train_adapter(base, start, shifted.x, shifted.y, epochs=30, seed=3)
    assert all(np.array_equal(trained.factors[n][1], again.factors[n][1]) for n in LAYERS)
    # Continuing from the trained factors (a second round) starts where the first ended.
    more, _ = train_adapter(base, trained, shifted.x, shifted.y, epochs=1, seed=3)
    assert _loss(base, more, shifted.x, shifted.y) < _loss(base, start, shifted.x, shifted.y)


def test_adam_moments_carry_training_on_as_if_it_had_not_stopped(tmp_path: Path) -> None:
    """Two rounds of 5 epochs with the client's moments kept are one run of 10 (full-batch steps, so the
    rows' order does not matter); restarting Adam instead lands elsewhere."""
    _, base = _base(tmp_path)
    shifted = synthetic_fleet(6, 200, seed=4).clients[5]
    start = LoraWeights.initial(base, LAYERS, rank=2, alpha=4.0, seed=1)
    rows = len(shifted.y)
    once, _ = train_adapter(base, start, shifted.x, shifted.y, epochs=10, seed=3, batch_size=rows)
    moments = AdamMoments.zeros(start)
    half, _ = train_adapter(base, start, shifted.x, shifted.y, epochs=5, seed=3, batch_size=rows, moments=moments)
    assert moments.step == 5
    kept = AdamMoments.from_record(moments.to_record())  # as the ClientApp keeps them in its context
    twice, _ = train_adapter(base, half, shifted.x, shifted.y, epochs=5, seed=3, batch_size=rows, moments=kept)
    restarted, _ = train_adapter(base, half, shifted.x, shifted.y, epochs=5, seed=3, batch_size=rows)
    assert kept.step == 10
    for n in LAYERS:
        for i in (0, 1):
            np.testing.assert_allclose(twice.factors[n][i], once.factors[n][i], rtol=1e-4, atol=1e-6)
    assert max(np.abs(restarted.factors[n][1] - once.factors[n][1]).max() for n in LAYERS) > 1e-3


@pytest.mark.integration
def test_federated_adapter_moves_only_factors_and_learns_the_shifted_machines(tmp_path: Path) -> None:
    model, _ = _base(tmp_path)
    fleet = synthetic_fleet(6, 200, seed=4)
    # The new type of machine shows two defects with each other's signature: the base confuses them.
    swap = np.array([0, 2, 1, 3])
    clients = [dataclasses.replace(c, y=swap[c.y], y_held=swap[c.y_held]) for c in fleet.clients[4:]]
    test = (np.concatenate([c.x_held for c in clients]), np.concatenate([c.y_held for c in clients]))
    reference = (fleet.clients[0].x_held, fleet.clients[0].y_held)
    config = AdapterFederation(layers=LAYERS, rounds=3, local_epochs=5, min_clients=2)
    result = evaluate_adapter_fleet(model, clients, test, reference, config)
    # Each round carries the factors (to and from each client, and to it for evaluation) and small configs:
    # less in all than the whole classifier's arrays alone would be in those six messages.
    factor_bytes, model_bytes = 4 * result["adapter_parameters"], 4 * result["base_parameters"]
    assert 6 * factor_bytes <= result["bytes_per_round"] < 6 * model_bytes
    assert result["federated"]["macro_f1"] > result["base"]["macro_f1"]
    assert set(result["local"]["own_client_macro_f1"]) == {c.name for c in clients}
    assert result["federated"]["federated_evaluation"]["macro-f1"] > 0


def test_fedprox_keeps_the_adapter_clients_near_the_rounds_start(tmp_path: Path) -> None:
    """``--strategy fedprox`` reaches the adapter's clients: with a strong proximal term one round moves the
    fleet's factors less than FedAvg's round from the same start (before 2026-12-04 the adapter clients
    ignored ``proximal-mu``)."""
    model, _ = _base(tmp_path)
    clients = list(synthetic_fleet(6, 200, seed=4).clients[4:])
    moved = {}
    for strategy in ("fedavg", "fedprox"):
        config = AdapterFederation(layers=LAYERS, rounds=1, min_clients=2, strategy=strategy, proximal_mu=20.0)
        _, outcome = simulate_adapters(model, clients, config)
        assert outcome.adapter is not None and outcome.initial is not None
        moved[strategy] = float(
            np.sqrt(
                sum(
                    np.sum((a - b) ** 2)
                    for name in LAYERS
                    for a, b in zip(outcome.adapter.factors[name], outcome.initial.factors[name], strict=True)
                )
            )
        )
    assert 0 < moved["fedprox"] < 0.5 * moved["fedavg"], moved
