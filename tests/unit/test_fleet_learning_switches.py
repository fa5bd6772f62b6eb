"""Robust aggregation, differential privacy and SecAgg+ for every fleet model, not only the classifier: the
process/vibration autoencoders and the LoRA adapters' factors (``server_app.run_rounds``).

Pure pieces (the table of autoencoder kinds, the legacy metrics' flattening, the options each command now
accepts or refuses, the zero-maximum guard of the held-out histogram) are tested directly. In Flower's
simulation runtime: SecAgg+ over the vibration autoencoder (with its held-out histograms and the
quantization gate after the last round) and over the adapter's factors, each equal to plain FedAvg within
SecAgg+'s quantization bound and with no client's weights on the wire; DP over the factors with its epsilon;
a poisoned client among six adapter clients, measured on the products ``A @ B`` under FedAvg (computed here),
trimmed mean and Krum (in Flower).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import Krum, MultiKrum

from agent.adaptation.lora import BaseMlp, LoraWeights
from pdm_tools.datasets.cwru import CLASS_NAMES
from pdm_tools.fleet_learning import cli as fleet_cli
from pdm_tools.fleet_learning import deploy
from pdm_tools.fleet_learning.adapter_eval import products, simulate_adapters
from pdm_tools.fleet_learning.adapter_ship import config_from_run as adapter_config_from_run
from pdm_tools.fleet_learning.adapters import ADAM_STEP_START, AdamMoments, AdapterFederation, train_adapter
from pdm_tools.fleet_learning.ae_kinds import AE_KINDS, ae_kind
from pdm_tools.fleet_learning.data import ClientData
from pdm_tools.fleet_learning.evaluate import poisoning_mod
from pdm_tools.fleet_learning.fleets import synthetic_fleet
from pdm_tools.fleet_learning.params import init_mlp
from pdm_tools.fleet_learning.process import AeTraining, init_autoencoder, train_autoencoder
from pdm_tools.fleet_learning.process_app import (
    ProcessClient,
    ProcessFederation,
    config_from_run,
    detector_for,
    vibration_spec,
)
from pdm_tools.fleet_learning.process_eval import simulate_process
from pdm_tools.fleet_learning.process_gate import ratio_histogram
from pdm_tools.fleet_learning.process_ship import fleet_spec, row_names
from pdm_tools.fleet_learning.secagg import flatten_metrics, secagg_error_bound, unflatten_metrics
from pdm_tools.fleet_learning.server_app import FederationConfig, make_strategy, privacy_budget
from pdm_tools.models.autoencoder import Autoencoder
from pdm_tools.models.defect_mlp import DefectMlp, MlpConfig, export_onnx, fit_mlp

LAYERS = ("layer0_matmul", "layer2_matmul")
FITRES = ("metrics", "num_examples", "parameters", "status")
CHANNELS = 4


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fleet_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_autoencoder_kind_is_one_table_entry() -> None:
    process, vibration = AE_KINDS["process"], AE_KINDS["vibration"]
    assert (process.model_id, vibration.model_id) == ("process-anomaly", "vibration-anomaly")
    assert detector_for("vibration").smoothing_steps == 1 and detector_for("process").smoothing_steps > 1
    spec = fleet_spec(("flow", "pressure"))
    assert row_names(spec) == ["flow", "pressure"] and process.gathers_means
    assert row_names(vibration_spec()) == list(vibration_spec().feature_names()) and not vibration.gathers_means
    assert vibration.heldout_threshold and not process.heldout_threshold
    assert process.feature_spec is None and vibration.feature_spec is not None
    with pytest.raises(ValueError, match="autoencoder kind 'acoustic': one of \\['process', 'vibration'\\]"):
        ae_kind("acoustic")


def test_legacy_metrics_round_trip_lists_and_scalars() -> None:
    metrics = {"tp": 3, "fp": 0, "threshold-rms-max": 1.25, "ratio-hist": [0, 4, 1], "confusion": [1, 2, 3, 4]}
    flat = flatten_metrics(metrics)
    assert all(not isinstance(v, list) for v in flat.values())
    assert dict(unflatten_metrics(flat)) == metrics


def test_held_out_histogram_refuses_a_zero_commissioning_maximum() -> None:
    model = init_autoencoder(CHANNELS, (4, 2, 4), seed=0)
    machine = ProcessClient("m", (np.zeros((500, CHANNELS)),), (None,))
    series = machine.series(detector_for("vibration"))
    # A constant machine standardizes to zeros; a model that reconstructs zeros exactly scores 0 everywhere.
    zero = dataclasses.replace(model, biases=tuple(np.zeros_like(b) for b in model.biases))
    with pytest.raises(ValueError, match=r"largest commissioning score is 0\.0 "):
        ratio_histogram(zero, series)
    nan = dataclasses.replace(model, biases=(np.full_like(model.biases[0], np.nan), *model.biases[1:]))
    with pytest.raises(ValueError, match="largest commissioning score is nan"):
        ratio_histogram(nan, series)


def test_commands_accept_the_new_combinations_and_refuse_what_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapters = AdapterFederation(layers=LAYERS, min_clients=5)
    for strategy in ("fedavg", "fedprox", "trimmed", "krum", "multikrum"):
        make_strategy(dataclasses.replace(adapters, strategy=strategy).aggregation())
    make_strategy(dataclasses.replace(adapters, dp_noise=1.0, dp_clip=0.5).aggregation())
    make_strategy(dataclasses.replace(adapters, secagg=True).aggregation())
    with pytest.raises(ValueError, match="--strategy krum: SecAgg\\+ shows the coordinator only the sum"):
        make_strategy(dataclasses.replace(adapters, secagg=True, strategy="krum").aggregation())
    with pytest.raises(ValueError, match="averaging only"):
        make_strategy(dataclasses.replace(adapters, strategy="trimmed", dp_noise=1.0, dp_clip=0.5).aggregation())
    settings = dataclasses.replace(adapters, strategy="trimmed", dp_noise=1.0, dp_clip=0.5).to_dict()
    assert settings["strategy"] == "trimmed" and settings["dp_clipping_norm"] == 0.5
    serve = ("serve", "--state", str(tmp_path / "s"), "--out", str(tmp_path / "o"))
    cases = [
        (("--model", "adapters", "--secagg", "--strategy", "trimmed"), "--strategy trimmed: SecAgg+"),
        (("--model", "adapters", "--strategy", "krum", "--dp-noise", "1", "--dp-clip", "1"), "averaging only"),
        (("--model", "adapters", "--quantize"), "no gate for the factors"),
        (("--model", "adapters", "--version", "1.0.0"), "not a model --version"),
        # allowed now, so the check goes on to what is missing
        (("--model", "adapters", "--secagg"), "--model adapters needs --base-model"),
        (("--model", "adapters", "--strategy", "krum", "--min-clients", "5"), "--model adapters needs --base-model"),
        (("--model", "adapters", "--dp-noise", "1", "--dp-clip", "1"), "--model adapters needs --base-model"),
        (("--model", "process", "--secagg", "--quantize"), "--model process needs --channels"),
    ]
    for argv, message in cases:
        assert fleet_cli.main(_args(*serve, *argv)) == 2
        assert message in capsys.readouterr().err
    evaluate = ("evaluate", "--dataset", "cwru", "--adapters", "--data", str(tmp_path))
    assert fleet_cli.main(_args(*evaluate, "--secagg", "--strategy", "krum")) == 2
    assert "--strategy krum: SecAgg+" in capsys.readouterr().err
    assert fleet_cli.main(_args(*evaluate, "--strategy", "krum", "--poisoned")) == 2
    assert "index.json not found" in capsys.readouterr().err  # the options passed; the data is missing
    assert fleet_cli.main(_args("evaluate", "--dataset", "skab", "--data", str(tmp_path / "no"), "--secagg")) == 2
    assert "is not a folder" in capsys.readouterr().err  # --secagg passed for the autoencoder


def test_serve_byzantine_reaches_krum_and_multikrum_and_an_impossible_count_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fleet serve --byzantine N``: the run config it submits gives every model's ServerApp Flower's Krum or
    MultiKrum with ``num_malicious_nodes = N`` (Multi-Krum averaging ``min-clients - N``); a count Krum cannot
    tolerate with ``--min-clients`` (``n > 2f + 2``) is refused before anything starts, and by the ServerApp's
    own config too (a run submitted with ``flwr run``)."""
    out = tmp_path / "o"
    serve = ("serve", "--state", str(tmp_path / "s"), "--out", str(out))

    def submitted(*argv: str) -> dict[str, object]:
        return fleet_cli.serve_run_config(_args(*serve, *argv), out, {})

    def classifier(run: dict[str, object]) -> object:
        return make_strategy(deploy.config_from_run({k: v for k, v in run.items() if k in deploy.RUN_CONFIG}))

    multi = classifier(submitted("--strategy", "multikrum", "--byzantine", "2", "--min-clients", "7"))
    assert type(multi) is MultiKrum and (multi.num_malicious_nodes, multi.num_nodes_to_select) == (2, 5)
    krum = classifier(submitted("--strategy", "krum", "--min-clients", "5"))  # the default: one attacker
    assert type(krum) is Krum and (krum.num_malicious_nodes, krum.num_nodes_to_select) == (1, 1)
    vibration = config_from_run(submitted("--model", "vibration", "--strategy", "krum", "--byzantine", "3",
                                          "--min-clients", "9"))  # fmt: skip
    assert make_strategy(vibration.federation).num_malicious_nodes == 3  # type: ignore[attr-defined]
    assert vibration.federation.to_dict()["krum_malicious"] == 3  # in the provenance
    model = init_mlp(np.zeros(4), np.ones(4), (8,), CLASS_NAMES, 0)
    base = BaseMlp.from_onnx(export_onnx(model, tmp_path / "base.onnx", {"model_id": "b", "version": "1"}))
    run = submitted("--model", "adapters", "--strategy", "multikrum", "--byzantine", "2", "--min-clients", "8")
    adapters = adapter_config_from_run(run, base)
    multi = make_strategy(adapters.aggregation())
    assert type(multi) is MultiKrum and (multi.num_malicious_nodes, multi.num_nodes_to_select) == (2, 6)
    assert adapters.to_dict()["krum_malicious"] == 2

    refused = [
        (("--strategy", "krum", "--byzantine", "2", "--min-clients", "6"),
         "--byzantine 2 with --strategy krum needs --min-clients >= 7 (Krum's guarantee: n > 2f + 2), got 6"),
        (("--strategy", "multikrum", "--min-clients", "4"),
         "--byzantine 1 with --strategy multikrum needs --min-clients >= 5"),
        (("--model", "adapters", "--strategy", "krum", "--min-clients", "3", "--byzantine", "1"),
         "--byzantine 1 with --strategy krum needs --min-clients >= 5"),
        (("--strategy", "krum", "--byzantine", "-1", "--min-clients", "5"),
         "--byzantine -1: the number of malicious clients to tolerate is >= 0"),
        (("--strategy", "trimmed", "--byzantine", "1"), "--byzantine sizes krum and multikrum, not --strategy trimmed"),
        # A robust rule with SecAgg+ is refused for that reason first.
        (("--strategy", "krum", "--byzantine", "2", "--min-clients", "3", "--secagg"), "--strategy krum: SecAgg+"),
    ]  # fmt: skip
    for argv, message in refused:
        assert fleet_cli.main(_args(*serve, *argv)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before the SuperLink started
    with pytest.raises(ValueError, match="--byzantine 3 with --strategy multikrum needs --min-clients >= 9"):
        adapter_config_from_run({**run, "byzantine": 3}, base)
    with pytest.raises(ValueError, match="--byzantine 2 with --strategy krum needs --min-clients >= 7"):
        deploy.config_from_run({"strategy": "krum", "byzantine": 2, "min-clients": 6})
    with pytest.raises(ValueError, match="--byzantine 2 with --strategy krum needs --min-clients >= 7"):
        config_from_run({**submitted("--model", "vibration", "--strategy", "krum"), "byzantine": 2})


def _ae_params(model: Autoencoder) -> np.ndarray:
    return np.concatenate([p.ravel() for p in model.weights + model.biases]).astype(np.float64)


def _machine(seed: int, level: float, rows: int = 700) -> np.ndarray:
    rng = np.random.default_rng(seed)
    load = np.cumsum(rng.normal(0.0, 0.05, rows))
    return level + np.outer(load - load.mean(), [1.0, -0.5, 0.8, 0.3]) + rng.normal(0.0, 0.1, (rows, CHANNELS))


@pytest.mark.integration
def test_secure_aggregation_of_the_vibration_autoencoder_with_its_histograms_and_gate() -> None:
    clients = [ProcessClient(f"m{i}", (_machine(i, 5.0 * (i + 1), 600 + 50 * i),), (None,)) for i in range(3)]
    training = AeTraining(epochs=5, learning_rate=1e-2)
    fed = ProcessFederation(
        FederationConfig(class_names=(), rounds=1, min_clients=3, secagg=True),
        CHANNELS,
        hidden=(8, 2, 8),
        training=training,
        quantize=True,
        signal="vibration",
    )
    outcome = simulate_process(clients, fed, keep_replies=True)
    assert outcome.model is not None and outcome.initial is not None
    det = detector_for("vibration")
    series = [c.series(det) for c in clients]
    rows = np.array([sum(len(s.train) for s in ss) for ss in series], np.float64)
    trained = [
        _ae_params(
            train_autoencoder(
                outcome.initial,
                np.concatenate([s.train for s in ss]),
                training,
                zlib.crc32(f"{c.name}/{fed.federation.seed}/1".encode()),
            )[0]
        )
        for c, ss in zip(clients, series, strict=True)
    ]
    fedavg = np.average(np.stack(trained), axis=0, weights=rows)
    error = np.abs(_ae_params(outcome.model) - fedavg).max()
    assert 0 < error <= secagg_error_bound(fed.federation.secagg_settings, rows.tolist())
    train_replies = [content for kind, content in outcome.counters.replies if kind == "train"]
    assert len(train_replies) == 4 * 3  # SecAgg+'s four stages, each client
    for content in train_replies:
        assert set(content.keys()) <= {"secaggplus_configs", *(f"fitres.{k}" for k in FITRES)}
        assert all(len(record) == 0 for record in content.array_records.values())
    # The evaluation's list metrics (the held-out histograms) crossed the legacy workflow intact.
    held_out = sum(len(s.test) for ss in series for s in ss)
    assert sum(outcome.heldout_hist) == held_out and len(outcome.heldout_edges) == 3
    assert outcome.counters.evaluation[1]["fp"] + outcome.counters.evaluation[1]["tn"] == held_out
    # The quantization gate ran after the SecAgg+ round, on every client.
    assert outcome.gate["clients"] == 3 and outcome.counters.secagg["max_weight"] == rows.max()


def _adapter_fleet() -> tuple[DefectMlp, list[ClientData]]:
    """A base fitted on three slow synthetic machines; six machines of a new type (two defects swapped) are
    the adapter's clients."""
    fleet = synthetic_fleet(10, 200, seed=4)
    x = np.concatenate([c.x for c in fleet.clients[:3]])
    y = np.concatenate([c.y for c in fleet.clients[:3]])
    model = fit_mlp(x, y, CLASS_NAMES, 0, MlpConfig(hidden=(16, 8), max_iter=200))
    swap = np.array([0, 2, 1, 3])
    clients = [dataclasses.replace(c, y=swap[c.y], y_held=swap[c.y_held]) for c in fleet.clients[4:]]
    return model, clients


def _local_round(
    base: BaseMlp,
    start: LoraWeights,
    clients: Sequence[ClientData],
    config: AdapterFederation,
    rnd: int = 1,
    moments: Sequence[AdamMoments] | None = None,
) -> list[LoraWeights]:
    """Each client's factors of round ``rnd``, trained here with the seed its ClientApp uses (continuing
    ``moments[i]``, updated in place, if given)."""
    return [
        train_adapter(
            base,
            start,
            c.x,
            c.y,
            config.local_epochs,
            zlib.crc32(f"{c.name}/{config.seed}/{rnd}".encode()),
            config.learning_rate,
            config.batch_size,
            config.weight_decay,
            None if moments is None else moments[i],
        )[0]
        for i, c in enumerate(clients)
    ]


def _factors(lora: LoraWeights) -> np.ndarray:
    return np.concatenate([p.ravel() for name in lora.layers for p in lora.factors[name]]).astype(np.float64)


def _mean_factors(start: LoraWeights, updates: Sequence[np.ndarray], rows: np.ndarray) -> LoraWeights:
    """FedAvg of the factor vectors (``_factors`` order) as an adapter shaped like ``start``."""
    flat, factors, at = np.average(np.stack(updates), axis=0, weights=rows), {}, 0
    for name in start.layers:
        a, b = start.factors[name]
        factors[name] = (
            flat[at : at + a.size].reshape(a.shape),
            flat[at + a.size : at + a.size + b.size].reshape(b.shape),
        )
        at += a.size + b.size
    return dataclasses.replace(start, factors=factors)


@pytest.fixture(scope="module")
def adapter_round() -> tuple[DefectMlp, list[ClientData], AdapterFederation]:
    model, clients = _adapter_fleet()
    return model, clients, AdapterFederation(layers=LAYERS, rounds=1, local_epochs=5, min_clients=len(clients))


def _plain_round(
    model: DefectMlp, clients: Sequence[ClientData], config: AdapterFederation
) -> tuple[LoraWeights, list[np.ndarray], np.ndarray]:
    """The round's start (``LoraWeights.initial`` of the base as the clients run it), each client's trained
    factors as one vector, and the row counts."""
    with tempfile.TemporaryDirectory() as tmp:
        base = BaseMlp.from_onnx(export_onnx(model, Path(tmp) / "b.onnx", {"model_id": "fleet-base", "version": "1"}))
    start = LoraWeights.initial(base, config.layers, config.rank, config.alpha, config.seed)
    local = [_factors(lora) for lora in _local_round(base, start, clients, config)]
    return start, local, np.array([len(c.y) for c in clients], np.float64)


@pytest.mark.integration
def test_adapter_factors_under_secagg_and_dp(
    adapter_round: tuple[DefectMlp, list[ClientData], AdapterFederation],
) -> None:
    model, clients, config = adapter_round
    start, local, rows = _plain_round(model, clients, config)
    fedavg = np.average(np.stack(local), axis=0, weights=rows)
    # SecAgg+: plain FedAvg of the factors within SecAgg+'s quantization bound, no client's factors on the wire.
    _, secure = simulate_adapters(model, clients, dataclasses.replace(config, secagg=True))
    assert secure.adapter is not None and secure.initial is not None
    assert np.array_equal(_factors(secure.initial), _factors(start))
    error = np.abs(_factors(secure.adapter) - fedavg).max()
    assert 0 < error <= secagg_error_bound(config.aggregation().secagg_settings, rows.tolist())
    train_replies = [content for kind, content in secure.counters.replies if kind == "train"]
    assert all(len(record) == 0 for content in train_replies for record in content.array_records.values())
    assert secure.counters.evaluation[1]["macro-f1"] > 0 and secure.counters.secagg["max_weight"] == rows.max()

    # DP: every update clipped to 0.05, Gaussian noise on the mean; the budget reported as for the classifier.
    noise, clip = 1.0, 0.05
    _, private = simulate_adapters(model, clients, dataclasses.replace(config, dp_noise=noise, dp_clip=clip))
    assert private.counters.privacy["epsilon"] == round(privacy_budget(noise, 1, 1e-5), 4)
    assert private.counters.privacy["clipping_norm"] == clip and private.adapter is not None
    # Unit weights, each update clipped to 0.05: the mean update is at most 0.05 long before the noise.
    update = _factors(private.adapter) - _factors(start)
    unclipped = np.linalg.norm(fedavg - _factors(start))
    assert unclipped > clip and np.linalg.norm(update) != pytest.approx(unclipped, rel=0.05)


@pytest.mark.integration
def test_adapter_clients_keep_their_optimizer_between_rounds(
    adapter_round: tuple[DefectMlp, list[ClientData], AdapterFederation],
) -> None:
    """Two FedAvg rounds in Flower's simulation are two rounds computed here with each client's Adam moments
    carried from round 1 to round 2 (the ClientApp keeps them in its node's context), not with Adam restarted
    (what ``keep_optimizer_state=False`` does)."""
    model, clients, config = adapter_round
    config = dataclasses.replace(config, rounds=2)
    base, outcome = simulate_adapters(model, clients, config)
    start = LoraWeights.initial(base, config.layers, config.rank, config.alpha, config.seed)
    rows = np.array([len(c.y) for c in clients], np.float64)

    def two_rounds(moments: Sequence[AdamMoments] | None) -> np.ndarray:
        first = [_factors(lora) for lora in _local_round(base, start, clients, config, 1, moments)]
        middle = _mean_factors(start, first, rows)
        second = [_factors(lora) for lora in _local_round(base, middle, clients, config, 2, moments)]
        return np.average(np.stack(second), axis=0, weights=rows)

    kept = two_rounds([AdamMoments.zeros(start) for _ in clients])
    restarted = two_rounds(None)
    assert outcome.adapter is not None
    federated = _factors(outcome.adapter)
    assert np.abs(federated - kept).max() < 1e-5 < np.abs(federated - restarted).max()
    _, plain = simulate_adapters(model, clients, dataclasses.replace(config, keep_optimizer_state=False))
    assert plain.adapter is not None and np.abs(_factors(plain.adapter) - restarted).max() < 1e-5
    # What each client's train reply says it continued from: 0 in round 1; in round 2 all of round 1's steps
    # when it keeps its optimizer, 0 again when it restarts.
    steps = sorted(config.local_epochs * -(-len(c.y) // config.batch_size) for c in clients)
    started = {
        rnd: sorted(m[ADAM_STEP_START] for m in by_node.values())
        for rnd, by_node in outcome.counters.train_metrics.items()
    }
    assert started == {1: [0] * len(clients), 2: steps}
    assert all(m[ADAM_STEP_START] == 0 for r in plain.counters.train_metrics.values() for m in r.values())


@pytest.mark.integration
def test_robust_aggregation_of_adapter_factors_rejects_a_poisoned_client(
    adapter_round: tuple[DefectMlp, list[ClientData], AdapterFederation],
) -> None:
    """One poisoned client (the most rows; its update reversed and 10x): how far each strategy's adapter
    products move from the clean FedAvg's, over how far the clean round moved them (from B = 0: products 0).
    FedAvg computed here from the clients' own training (what Flower's FedAvg does with those replies);
    trimmed mean and Krum in Flower's simulation."""
    model, clients, config = adapter_round
    start, local, rows = _plain_round(model, clients, config)
    poisoned_id = int(np.argmax(rows))
    clean = products(_mean_factors(start, local, rows))
    moved = np.linalg.norm(clean - products(start))
    s = _factors(start)
    bad = [u if i != poisoned_id else s - 10.0 * (u - s) for i, u in enumerate(local)]
    shift = {"fedavg": np.linalg.norm(products(_mean_factors(start, bad, rows)) - clean) / moved}
    for robust in ("trimmed", "krum"):
        run = dataclasses.replace(config, strategy=robust)
        _, out = simulate_adapters(model, clients, run, [poisoning_mod(frozenset({poisoned_id}))])
        assert out.adapter is not None
        shift[robust] = np.linalg.norm(products(out.adapter) - clean) / moved
    print({k: round(float(v), 3) for k, v in shift.items()})
    assert shift["fedavg"] > 1.0  # the poisoned client moves the FedAvg adapter further than training did
    assert shift["trimmed"] < 0.5 * shift["fedavg"] and shift["krum"] < 0.5 * shift["fedavg"]


@pytest.mark.integration
def test_process_autoencoder_under_dp_reports_its_budget() -> None:
    clients = [ProcessClient(f"m{i}", (_machine(i, 5.0 * (i + 1)),), (None,)) for i in range(3)]
    noise, clip = 1.0, 0.5
    fed = ProcessFederation(
        FederationConfig(class_names=(), rounds=2, min_clients=3, dp_noise=noise, dp_clip=clip),
        CHANNELS,
        hidden=(8, 2, 8),
        training=AeTraining(epochs=5, learning_rate=1e-2),
    )
    outcome = simulate_process(clients, fed)
    privacy = outcome.counters.privacy
    assert privacy["epsilon"] == round(privacy_budget(noise, 2, 1e-5), 4) and privacy["rounds"] == 2
    assert privacy["clipping_norm"] == clip and sorted(outcome.counters.evaluation) == [1, 2]
    assert outcome.model is not None and outcome.initial is not None
    # Two rounds of unit-weight updates, each clipped to 0.5, plus noise of std 1.0 * 0.5 / 3 per weight: the
    # model moved, and by less than the clipped updates and four noise standard deviations per weight allow.
    moved = np.linalg.norm(_ae_params(outcome.model) - _ae_params(outcome.initial))
    assert 0 < moved < 2 * clip + 2 * 4 * noise * clip / 3 * np.sqrt(len(_ae_params(outcome.model)))
