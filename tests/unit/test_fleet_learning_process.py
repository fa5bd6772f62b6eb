"""The fleet's process autoencoder on SKAB-like data (generated here; the dataset is not needed).

Pure pieces (the fleet split, the client folder, the wire format, training, per-machine thresholds, the
comparison) are tested directly; one small simulation in Flower's runtime checks what clients send and
that the federated evaluation the server collects equals the same model scored locally.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from agent.commissioning.detector import DetectorConfig
from pdm_tools.evaluation.skab import Confusion, SkabFile, load_skab
from pdm_tools.fleet_learning import cli as fleet_cli
from pdm_tools.fleet_learning.data import ClientDataError
from pdm_tools.fleet_learning.process import (
    TRAIN_ROWS,
    AeTraining,
    confusion,
    from_arrays,
    init_autoencoder,
    smoothed_z,
    to_arrays,
    train_autoencoder,
)
from pdm_tools.fleet_learning.process_app import (
    PROCESS_FILE,
    ProcessClient,
    ProcessFederation,
    ProcessOutcome,
    load_process_client,
)
from pdm_tools.fleet_learning.process_app import (
    config_from_run as process_config_from_run,
)
from pdm_tools.fleet_learning.process_eval import (
    compare_process,
    simulate_process,
    simulator_vibration_fleet,
    skab_fleet,
)
from pdm_tools.fleet_learning.process_gate import RATIO_EDGES, gate_counts, gate_report
from pdm_tools.fleet_learning.server_app import FederationConfig
from pdm_tools.models.autoencoder import Autoencoder

CHANNELS = 4
ROWS = 700
FAULT = slice(500, 600)  # test steps whose channel 2 leaves its usual relation to the others
DETECTOR = DetectorConfig(smoothing_steps=10)


def _machine(seed: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Readings of one machine run: four channels driven by one slow latent load (so they move together),
    at the machine's own operating level; channel 2 decouples from the others during ``FAULT``."""
    rng = np.random.default_rng(seed)
    load = np.cumsum(rng.normal(0.0, 0.05, ROWS))
    load -= load.mean()
    x = level + np.outer(load, [1.0, -0.5, 0.8, 0.3]) + rng.normal(0.0, 0.1, (ROWS, CHANNELS))
    labels = np.zeros(ROWS, dtype=bool)
    labels[FAULT] = True
    x[FAULT, 2] += 1.5
    return x, labels


def _write_skab(root: Path, groups: dict[str, int]) -> Path:
    """SKAB-format CSV files (';', datetime, signals, anomaly, changepoint), ``groups[name]`` files each,
    plus an anomaly-free file without labels (which the evaluation skips)."""
    seed = 0
    for group, n in groups.items():
        (root / group).mkdir(parents=True)
        for i in range(n):
            x, y = _machine(seed, level=10.0 * (seed + 1))
            seed += 1
            lines = ["datetime;a;b;c;d;anomaly;changepoint"]
            lines += [
                f"2020-01-01 00:{t // 60:02d}:{t % 60:02d};" + ";".join(f"{v:.5f}" for v in x[t]) + f";{int(y[t])};0"
                for t in range(ROWS)
            ]
            (root / group / f"{i}.csv").write_text("\n".join(lines) + "\n")
    (root / "anomaly-free").mkdir()
    (root / "anomaly-free" / "anomaly-free.csv").write_text("datetime;a\n2020-01-01 00:00:00;1.0\n")
    return root


@pytest.fixture(scope="module")
def skab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_skab(tmp_path_factory.mktemp("skab"), {"valve1": 3, "other": 2})


def _same(a: Autoencoder, b: Autoencoder) -> bool:
    return all(np.array_equal(p, q) for p, q in zip(a.weights + a.biases, b.weights + b.biases, strict=True))


def _files(n: int) -> list[SkabFile]:
    out = []
    for i in range(n):
        x, y = _machine(i, 5.0)
        out.append(SkabFile(f"{'valve1' if i % 3 else 'other'}/{i}.csv", ("a", "b", "c", "d"), x, y))
    return out


def test_clients_are_testbed_groups_and_extra_clients_split_the_largest_group() -> None:
    files = _files(9)  # other: 0, 3, 6; valve1: the other six
    by_group = skab_fleet(files)
    assert [(c.name, len(c.values)) for c in by_group] == [("other", 3), ("valve1", 6)]
    four = skab_fleet(files, 4)
    assert [(c.name, len(c.values)) for c in four] == [("other-0", 2), ("other-1", 1), ("valve1-0", 3), ("valve1-1", 3)]
    # Every file is held by exactly one client.
    held = sorted(float(v[0, 0]) for c in four for v in c.values)
    assert held == sorted(float(f.values[0, 0]) for f in files)
    for bad in (1, 10):
        with pytest.raises(ClientDataError, match=f"--clients {bad}: SKAB gives each testbed group"):
            skab_fleet(files, bad)


def test_simulated_vibration_fleet_commissions_healthy_and_faults_late() -> None:
    clients = simulator_vibration_fleet(2, seed=3)
    assert [c.name for c in clients] == ["m01-bearing_inner", "m02-bearing_outer"]
    for client in clients:
        (values,), (labels,) = client.values, client.labels
        assert labels is not None and values.shape[0] == len(labels) > TRAIN_ROWS and np.isfinite(values).all()
        # The commissioning windows and some test windows after them are healthy; the run ends in the fault.
        assert not labels[: TRAIN_ROWS + 100].any() and labels[-1]
        assert labels[np.argmax(labels) :].all()
    # The machines run at different speeds: their healthy feature levels differ.
    levels = [c.values[0][:TRAIN_ROWS].mean(axis=0) for c in clients]
    assert not np.allclose(levels[0], levels[1], rtol=0.05)


def test_client_folder_round_trip_with_and_without_labels(tmp_path: Path) -> None:
    (x0, y0), (x1, y1) = _machine(0, 1.0), _machine(1, 2.0)
    client = ProcessClient("valve1", (x0, x1[:450]), (y0, y1[:450]))
    back = load_process_client(client.save(tmp_path / "a"))
    assert back.name == "valve1" and [v.shape for v in back.values] == [(ROWS, 4), (450, 4)]
    assert np.array_equal(back.values[1], x1[:450]) and back.labels[1] is not None
    assert np.array_equal(back.labels[1], y1[:450])
    unlabelled = load_process_client(ProcessClient("m", (x0,), (None,)).save(tmp_path / "b"))
    assert unlabelled.labels == (None,)


def test_bad_client_folders_are_named_errors(tmp_path: Path) -> None:
    with pytest.raises(ClientDataError, match="cannot read"):
        load_process_client(tmp_path)
    folder = tmp_path / "nan"
    x, y = _machine(0, 1.0)
    x[3, 1] = np.nan
    ProcessClient("m", (x,), (y,)).save(folder)
    with pytest.raises(ClientDataError, match="NaN or infinity"):
        load_process_client(folder)
    np.savez(tmp_path / PROCESS_FILE, values=np.zeros((10, 2)), lengths=np.array([4]), labels=np.zeros(0, bool))
    with pytest.raises(ClientDataError, match="lengths summing to 4"):
        load_process_client(tmp_path)


def test_autoencoder_survives_flower_arrays_and_other_arrays_are_refused() -> None:
    model = init_autoencoder(4, (6, 2, 6), seed=1)
    back = from_arrays(to_arrays(model), 4)
    assert _same(back, model)
    with pytest.raises(ValueError, match="not an autoencoder of 5 channels"):
        from_arrays(to_arrays(model), 5)
    with pytest.raises(ValueError, match="lack 'b0'"):
        from_arrays(ArrayRecord({"w0": Array(np.zeros((4, 4), np.float32))}), 4)


def test_machines_standardize_themselves_and_training_learns_their_joint_pattern() -> None:
    series = [smoothed_z(*_machine(i, 100.0 * i), DETECTOR) for i in range(3)]
    # Each machine's commissioning windows are centred on its own level, whatever that level is.
    for s in series:
        assert s.train.shape == (TRAIN_ROWS - 9, CHANNELS) and np.abs(s.train.mean(axis=0)).max() < 0.5
        assert len(s.test) == len(s.labels) == ROWS - TRAIN_ROWS
    rows = np.concatenate([s.train for s in series])
    start = init_autoencoder(CHANNELS, (8, 2, 8), seed=0)
    trained, mse = train_autoencoder(start, rows, AeTraining(epochs=40, learning_rate=1e-2), seed=3)
    assert mse < 0.5 * float(np.mean(start.score(rows)))
    again, _ = train_autoencoder(start, rows, AeTraining(epochs=40, learning_rate=1e-2), seed=3)
    assert _same(trained, again)
    # The decoupled channel is what the untrained model cannot tell from noise and the trained one flags.
    trained_counts = Confusion(**confusion(trained, series, DETECTOR.threshold_factor))
    untrained_counts = Confusion(**confusion(start, series, DETECTOR.threshold_factor))
    assert trained_counts.f1 > untrained_counts.f1 and trained_counts.tp > trained_counts.fp
    assert trained_counts.tp + trained_counts.fn == 3 * (FAULT.stop - FAULT.start)


def test_unlabelled_machines_count_alarms_as_false_positives() -> None:
    x, _ = _machine(0, 1.0)
    s = smoothed_z(x, None, DETECTOR)
    counts = confusion(init_autoencoder(CHANNELS, (4,), 0), [s], 2.4)
    assert counts["tp"] == counts["fn"] == 0 and counts["fp"] + counts["tn"] == ROWS - TRAIN_ROWS


def test_comparison_scores_every_model_the_same_way() -> None:
    clients = skab_fleet(_files(6), 3)
    fed = ProcessFederation(FederationConfig(class_names=(), rounds=2), CHANNELS, hidden=(8, 2, 8))
    start = init_autoencoder(CHANNELS, fed.hidden, fed.federation.seed)
    outcome = ProcessOutcome(model=start, initial=start)
    result = compare_process(clients, fed, outcome, DETECTOR)
    names = [c.name for c in clients]
    assert set(result["federated"]["per_client_f1"]) == set(result["local"]["own_client_f1"]) == set(names)
    assert result["client_with_fewest_rows"]["client"] == min(names, key=lambda n: result["client_rows"][n])
    files = sum(len(c.values) for c in clients)
    for name in ("federated", "central", "local"):
        r = result[name]
        assert r["tp"] + r["fn"] == files * (FAULT.stop - FAULT.start)
        assert r["tp"] + r["fp"] + r["fn"] + r["tn"] == files * (ROWS - TRAIN_ROWS)
    # The untrained start scored as "federated" is worse than the trained central model.
    assert result["central"]["f1"] > result["federated"]["f1"]


def test_gate_counts_and_report_of_one_client() -> None:
    series = [smoothed_z(*_machine(i, 10.0 * i), DETECTOR) for i in range(2)]
    start = init_autoencoder(CHANNELS, (8, 2, 8), seed=0)
    model, _ = train_autoencoder(start, np.concatenate([s.train for s in series]), AeTraining(20, 1e-2), seed=1)
    counts = gate_counts(model, series, DETECTOR.threshold_factor)
    assert set(counts) == GATE_KEYS
    n = {k: v for k, v in counts.items() if isinstance(v, int)}
    # FP32 ONNX decides as the numpy model does (up to float32 rounding at the threshold).
    numpy_counts = confusion(model, series, DETECTOR.threshold_factor)
    assert abs(n["fp32-tp"] - numpy_counts["tp"]) <= 2 and abs(n["fp32-fp"] - numpy_counts["fp"]) <= 2
    anomalous = 2 * (FAULT.stop - FAULT.start)
    assert sum(counts["fp32-hist-pos"]) == n["fp32-tp"] + n["fp32-fn"] == anomalous  # type: ignore[arg-type]
    report = gate_report(counts)
    assert set(report["int8_vs_fp32"]) >= {"auc_delta", "detection_delta_points", "accuracy_rules_passed"}
    assert report["fp32"]["detection_rate"] == round(100 * n["fp32-tp"] / anomalous, 2)


def test_gate_report_fails_an_int8_model_that_misses_what_fp32_detects() -> None:
    edges = len(RATIO_EDGES) - 1
    hist = [0] * edges
    fp32_pos, int8_pos = list(hist), list(hist)
    fp32_pos[-1], int8_pos[-1], int8_pos[0] = 100, 90, 10  # INT8 scores 10 anomalous steps as quiet
    neg = list(hist)
    neg[1] = 900
    totals = {
        **{f"fp32-{k}": v for k, v in zip(("tp", "fp", "fn", "tn"), (100, 0, 0, 900), strict=True)},
        **{f"int8-{k}": v for k, v in zip(("tp", "fp", "fn", "tn"), (90, 0, 10, 900), strict=True)},
        "fp32-hist-pos": fp32_pos,
        "fp32-hist-neg": neg,
        "int8-hist-pos": int8_pos,
        "int8-hist-neg": neg,
        "int8-agree": 990,
        "steps": 1000,
    }
    report = gate_report(totals)
    assert report["fp32"]["auc"] == 1.0 and report["int8"]["detection_rate"] == 90.0
    d = report["int8_vs_fp32"]
    assert not d["accuracy_rules_passed"] and d["detection_delta_points"] == -10.0
    assert any("detection at the operating false-alarm rate drops 10.00 points" in r for r in d["reasons"])
    assert any("AUC drops" in r for r in d["reasons"])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fleet_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_fleet_evaluate_skab_refuses_what_cannot_run(
    skab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(load_skab(skab_dir)[0]) == 5
    cases = [
        (("--data", str(tmp_path / "missing")), "is not a folder"),
        (("--data", str(skab_dir), "--clients", "9"), "--clients 9: SKAB gives"),
        (("--data", str(skab_dir), "--poisoned"), "--poisoned and --leave-out-load are for cwru"),
        (("--data", str(skab_dir), "--strategy", "krum", "--dp-noise", "1", "--dp-clip", "1"), "averaging only"),
    ]
    for argv, message in cases:
        assert fleet_cli.main(_args("evaluate", "--dataset", "skab", *argv)) == 2
        assert message in capsys.readouterr().err


def test_fleet_serve_and_client_refuse_a_process_run_they_cannot_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve = ("fleet", "serve", "--state", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--model", "process")
    assert fleet_cli.main(_args(*serve[1:])) == 2
    assert "--model process needs --channels" in capsys.readouterr().err
    assert fleet_cli.main(_args(*serve[1:], "--channels", "8", "--version", "1.0.0")) == 2
    assert "--model process --version needs --fields naming the 8 channels" in capsys.readouterr().err
    client = ("client", "--superlink", "127.0.0.1:1", "--agent-config", str(tmp_path / "agent.yaml"))
    assert fleet_cli.main(_args(*client)) == 2
    assert "--agent-config needs --machine" in capsys.readouterr().err
    assert fleet_cli.main(_args(*client, "--machine", "m1")) == 2
    assert "agent.yaml" in capsys.readouterr().err  # no such config file: named, before joining
    ProcessClient("m", (_machine(0, 1.0)[0],), (None,)).save(tmp_path / "bad")
    (tmp_path / "bad" / PROCESS_FILE).write_bytes(b"not a zip")
    assert fleet_cli.main(_args("client", "--superlink", "127.0.0.1:1", "--data", str(tmp_path / "bad"))) == 2
    assert "process.npz: cannot read" in capsys.readouterr().err


# What each kind of reply may hold: record name -> the keys allowed in it.
ALLOWED = {
    "train": {
        "arrays": {"w0", "b0", "w1", "b1", "w2", "b2", "w3", "b3"},
        "metrics": {"num-examples", "unit-weight", "train-mse"},
    },
    # one number per client besides the counts: its largest machine threshold (the template version's threshold)
    "evaluate": {"metrics": {"num-examples", "unit-weight", "tp", "fp", "fn", "tn", "threshold-rms-max"}},
}
GATE_KEYS = {f"{v}-{k}" for v in ("fp32", "int8") for k in ("tp", "fp", "fn", "tn", "hist-pos", "hist-neg")} | {
    "int8-agree",
    "steps",
}


def _rows_in(content: RecordDict, known: Sequence[np.ndarray]) -> list[str]:
    """Names of the arrays in ``content`` that hold a row equal to one of the ``known`` rows (readings or z
    vectors, ``(n, CHANNELS)``); only arrays whose rows are ``CHANNELS`` wide can."""
    found = []
    for record in content.array_records.values():
        for key, array in record.items():
            a = np.asarray(array.numpy(), np.float64)
            flat = a.reshape(-1, a.shape[-1])
            if flat.shape[1] == CHANNELS and any(np.isclose(flat[:, None], k[None]).all(axis=2).any() for k in known):
                found.append(key)
    return found


def test_leak_check_sees_a_reading_in_the_arrays() -> None:
    readings = _machine(0, 1.0)[0]
    weights = to_arrays(init_autoencoder(CHANNELS, (8, 2, 8), seed=0))
    assert _rows_in(RecordDict({"arrays": weights}), (readings,)) == []
    leaky = np.asarray(weights["w3"].numpy()).copy()
    leaky[5] = readings[123]
    weights["w3"] = Array(leaky.astype(np.float64))
    assert _rows_in(RecordDict({"arrays": weights}), (readings,)) == ["w3"]


@pytest.mark.integration
def test_federation_sends_only_weights_and_counts_and_its_evaluation_matches(skab_dir: Path) -> None:
    files, _ = load_skab(skab_dir)
    clients = skab_fleet(files, 3)
    fed = ProcessFederation(
        FederationConfig(class_names=(), rounds=3, min_clients=3),
        CHANNELS,
        hidden=(8, 2, 8),
        training=AeTraining(epochs=5, learning_rate=1e-2),
        quantize=True,
    )
    outcome = simulate_process(clients, fed, keep_replies=True)
    readings = np.concatenate([v for c in clients for v in c.values])
    z_rows = np.concatenate([np.concatenate([s.train, s.test]) for c in clients for s in c.series()])
    kinds = set()
    gate_replies = 0
    for kind, content in outcome.counters.replies:
        kinds.add(kind)
        keys = {name: set(r.keys()) for name, r in content.items()}
        if kind == "evaluate" and "fp32-tp" in keys["metrics"]:  # the quantization gate's evaluation
            gate_replies += 1
            keys["metrics"] -= GATE_KEYS
        assert keys == {name: allowed for name, allowed in ALLOWED[kind].items() if name in content}
        assert _rows_in(content, (readings, z_rows)) == []
    assert kinds == {"train", "evaluate"}
    assert sorted(outcome.counters.participants) == [1, 2, 3]
    assert all(len(p) == 3 for p in outcome.counters.participants.values())
    result = compare_process(clients, fed, outcome)
    # The server's federated evaluation (counts summed from the clients) equals the model scored here.
    fe = result["federated"]["federated_evaluation"]
    assert {k: fe[k] for k in ("tp", "fp", "fn", "tn")} == {k: result["federated"][k] for k in ("tp", "fp", "fn", "tn")}
    assert result["bytes_per_round"] > 0 and outcome.model is not None
    # The gate's metrics came back from every client and add up to every test step of every machine.
    gate = result["quantization_gate"]
    assert gate_replies == gate["clients"] == 3
    steps = sum(len(v) - TRAIN_ROWS for c in clients for v in c.values)
    for variant in ("fp32", "int8"):
        assert sum(gate[variant][k] for k in ("tp", "fp", "fn", "tn")) == steps
    assert 0 <= gate["int8_vs_fp32"]["decision_agreement"] <= 1
    assert outcome.initial is not None and not _same(outcome.model, outcome.initial)


def _moved(model: Autoencoder, start: Autoencoder) -> float:
    pairs = zip(model.weights + model.biases, start.weights + start.biases, strict=True)
    return float(np.sqrt(sum(np.sum((p - q) ** 2) for p, q in pairs)))


@pytest.mark.integration
def test_fedprox_keeps_the_process_clients_near_the_rounds_start(skab_dir: Path) -> None:
    """``--strategy fedprox`` reaches the autoencoder's clients: with a strong proximal term one round moves
    the fleet model less than FedAvg's round from the same start (before 2026-12-04 the process and vibration
    clients ignored ``proximal-mu``, and fedprox ran FedAvg under its name)."""
    clients = skab_fleet(load_skab(skab_dir)[0], 2)
    moved = {}
    for strategy in ("fedavg", "fedprox"):
        federation = FederationConfig(class_names=(), rounds=1, min_clients=2, strategy=strategy, proximal_mu=20.0)
        fed = ProcessFederation(federation, CHANNELS, hidden=(8, 2, 8), training=AeTraining(5, 1e-2), quantize=False)
        outcome = simulate_process(clients, fed)
        assert outcome.model is not None and outcome.initial is not None
        moved[strategy] = _moved(outcome.model, outcome.initial)
    assert 0 < moved["fedprox"] < 0.5 * moved["fedavg"], moved


def test_the_autoencoders_default_to_fedprox_and_the_others_to_fedavg(tmp_path: Path) -> None:
    def strategy(*argv: str) -> str:
        return str(fleet_cli.with_default_strategy(_args(*argv)).strategy)

    serve = ("serve", "--state", str(tmp_path / "s"), "--out", str(tmp_path / "o"))
    assert strategy(*serve, "--model", "process", "--channels", "3") == "fedprox"
    assert strategy(*serve, "--model", "vibration") == "fedprox"
    assert strategy(*serve) == strategy(*serve, "--model", "adapters") == "fedavg"
    assert strategy("evaluate", "--dataset", "skab") == strategy("evaluate", "--dataset", "simulator-vibration")
    assert strategy("evaluate", "--dataset", "skab") == "fedprox"
    assert strategy("evaluate", "--dataset", "cwru") == strategy("evaluate", "--dataset", "cwru", "--adapters")
    assert strategy("evaluate", "--dataset", "cwru") == "fedavg"
    assert strategy(*serve, "--model", "process", "--strategy", "trimmed") == "trimmed"  # named: kept
    # A run submitted to the process ServerApp without a strategy gets the same default as fleet serve.
    assert process_config_from_run({"channels": 3}).federation.strategy == "fedprox"
    assert process_config_from_run({"channels": 3, "strategy": "fedavg"}).federation.strategy == "fedavg"
