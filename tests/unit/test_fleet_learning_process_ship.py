"""The fleet's process autoencoder as a ``process-anomaly`` version (``process_ship``): the coordinator's
template, specialized with one machine's commissioning baseline, scores the agent's own process windows (cut
by the agent's windower, features by the agent's extraction) exactly as the fleet model scores that machine's
smoothed z vectors, with the machine's own threshold; INT8 when the gate passed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.commissioning.detector import DetectorConfig
from agent.features.extract import extract_matrix
from agent.features.windows import Windower
from agent.inference.manifest import Manifest
from agent.inference.model import OnnxAnomalyModel
from agent.metrics import Metrics
from agent.records import NS_PER_S, Reading, Source
from pdm_tools.fleet_learning.process import TRAIN_ROWS, AeTraining, init_autoencoder, smoothed_z, train_autoencoder
from pdm_tools.fleet_learning.process_ship import MODEL_ID, fleet_spec, specialize, write_template
from pdm_tools.fleet_learning.server_app import Outcome

FIELDS = ("temperature", "current", "pressure")
SOURCE = Source.of(machine="m1", sensor="process")


def _readings(n: int, level: tuple[float, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    load = np.cumsum(rng.normal(0.0, 0.05, n))
    return np.array(level) + np.outer(load, [1.0, -0.2, 0.5]) + rng.normal(0.0, 0.1, (n, 3))


def _template(tmp_path: Path, gate: dict[str, object]) -> Path:
    """A fleet autoencoder trained on two other machines (other operating points), as the coordinator ships it."""
    machines = [_readings(600, (30.0 * s, 2.0 * s, 60.0 * s), s) for s in (2, 3)]
    rows = np.concatenate([smoothed_z(m, None).train for m in machines])
    model, _ = train_autoencoder(init_autoencoder(3, (16, 4, 16), 0), rows, AeTraining(epochs=40), 0)
    counters = Outcome()
    counters.evaluation = {1: {"tp": 0, "fp": 1, "fn": 0, "tn": 399}}
    counters.provenance = {7: {"rows": 371, "data-sha256": "ab" * 32, "held-out": 200}}
    counters.participants = {1: [7]}
    settings = {"strategy": "fedavg", "rounds": 1, "local_epochs": 5, "model": "process autoencoder"}
    return write_template(tmp_path / "out", settings, counters, model, gate, 1.5, "2.0.0", fleet_spec(FIELDS))


def _windows_scored(version: Path, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, OnnxAnomalyModel]:
    """The agent's path: readings 1 s apart through its windower, its features, the loaded model's scores;
    and the index of each window's last reading."""
    model = OnnxAnomalyModel.load(version)
    windower = Windower(lambda source: model.spec, Metrics())
    windows, ends = [], []
    for i, row in enumerate(values):
        reading = Reading(SOURCE, 1_000 * NS_PER_S + i * NS_PER_S, dict(zip(FIELDS, map(float, row), strict=True)))
        cut = windower.add(reading)
        windows += cut
        ends += [i] * len(cut)
    return model.score(extract_matrix(model.spec, windows)), np.array(ends), model


def test_template_specialized_for_a_machine_scores_its_windows_as_the_fleet_model(tmp_path: Path) -> None:
    template = _template(tmp_path, {})
    manifest = Manifest.load(template)
    assert manifest.model_id == MODEL_ID and manifest.training["fleet_template"]["install_ships"] == "fp32"
    assert manifest.training["federation"]["clients"][0]["data-sha256"] == "ab" * 32
    values = _readings(700, (30.0, 2.0, 60.0), 1)  # an operating point no client had
    version = specialize(template, values, "m1", tmp_path / "agent")
    m = Manifest.load(version)
    assert m.file == "model.fp32.onnx" and m.training["machine"]["machine"] == "m1"
    assert m.threshold != manifest.threshold

    scores, ends, model = _windows_scored(version, values)
    # The fleet model on this machine's smoothed z vectors at the same steps (window ends).
    series = smoothed_z(values, None)
    k = DetectorConfig().smoothing_steps
    z = np.concatenate([series.train, series.test])[ends - k + 1]
    from pdm_tools.fleet_learning.process_ship import read_autoencoder

    fleet = read_autoencoder(template / manifest.file)
    np.testing.assert_allclose(scores, fleet.score(z), rtol=1e-3, atol=1e-6)
    # Its own threshold: factor x the largest commissioning RMS score, squared; no commissioning window above.
    largest = float(np.sqrt(fleet.score(series.train)).max())
    assert model.threshold == pytest.approx((DetectorConfig().threshold_factor * largest) ** 2, rel=1e-4)
    assert (scores[ends < TRAIN_ROWS] <= model.threshold).all()
    # A pressure drop of 3 long-run deviations on the later readings alarms; the explanation names pressure.
    broken = values.copy()
    broken[TRAIN_ROWS:, 2] -= 3 * series.scale[2]
    hot, hot_ends, _ = _windows_scored(version, broken)
    late = hot[hot_ends >= TRAIN_ROWS + k]
    assert (late > model.threshold).mean() > 0.9
    x = np.zeros((1, model.n_features), np.float32)
    x[0, [0, 6, 12]] = broken[-k:].mean(axis=0)
    shares = dict(zip(model.spec.feature_names(), model.explain(x)[0], strict=True))
    assert max(shares, key=lambda name: shares[name]) == "pressure_mean"


def test_specialized_version_ships_int8_when_the_gate_passed(tmp_path: Path) -> None:
    gate = {"int8_vs_fp32": {"accuracy_rules_passed": True}}
    template = _template(tmp_path, gate)
    values = _readings(700, (30.0, 2.0, 60.0), 1)
    fp32 = specialize(_template(tmp_path / "fp32", {}), values, "m1", tmp_path / "a")
    int8 = specialize(template, values, "m1", tmp_path / "b")
    m = Manifest.load(int8)
    assert m.file == "model.int8.onnx" and m.quantization["shipped"] == "int8"
    assert m.quantization["gate"] == gate
    # Each with its own threshold (from the machine's commissioning under its own graph): the same decisions,
    # on normal readings and with a pressure drop on the later ones.
    broken = values.copy()
    broken[TRAIN_ROWS:, 2] -= 3 * smoothed_z(values, None).scale[2]
    for readings in (values, broken):
        a, _, fa = _windows_scored(fp32, readings)
        b, _, fb = _windows_scored(int8, readings)
        assert ((a > fa.threshold) == (b > fb.threshold)).mean() > 0.98


def test_specialize_refuses_a_version_that_is_not_a_fleet_template(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[2] / "models" / "process_anomaly"
    with pytest.raises(ValueError, match="not a fleet process template"):
        specialize(shipped, _readings(500, (1.0, 1.0, 1.0), 0), "m1", tmp_path)


def _pump_rows(index: int, seconds: float, fault: str = "", fault_s: float | None = None) -> np.ndarray:
    """Vibration feature rows of simulated pump ``index`` (the serving path's windows and features); with
    ``fault`` from ``fault_s`` (default: the last 10 s) on."""
    import dataclasses

    from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile
    from pdm_tools.training.simdata import VIBRATION_SPEC, vibration_rows

    profile = dataclasses.replace(fleet_profile(index, 3), rpm=1500.0 * (0.6 + 0.4 * index))
    start = seconds - 10.0 if fault_s is None else fault_s
    faults = [Fault(profile.name, fault, start, severity=0.25, ramp_s=0.0)] if fault else []
    return vibration_rows(SimulatedMachine(profile, faults, 3), seconds, VIBRATION_SPEC).astype(np.float64)


def test_vibration_template_specialized_for_a_machine_scores_its_windows(tmp_path: Path) -> None:
    """The fleet vibration autoencoder (rows: one window's features, each machine standardized by its
    commissioning baseline, no smoothing) as a ``vibration-anomaly`` version: the shipped model's feature
    spec, the threshold factor from the held-out windows applied to the machine's own commissioning maximum."""
    from pdm_tools.fleet_learning.process_app import detector_for, sum_counts, vibration_spec
    from pdm_tools.fleet_learning.process_gate import RATIO_EDGES, heldout_factor, quantile_edge, ratio_histogram
    from pdm_tools.fleet_learning.process_ship import read_autoencoder

    det = detector_for("vibration")
    series = [smoothed_z(_pump_rows(i, 110.0), None, det) for i in (1, 2)]
    model, _ = train_autoencoder(
        init_autoencoder(16, (16, 4, 16), 0), np.concatenate([s.train for s in series]), AeTraining(epochs=40), 0
    )
    # What the clients' evaluate replies sum to, and the factor the coordinator derives from it.
    from flwr.app import MetricRecord, RecordDict

    counts = dict.fromkeys(("tp", "fp", "fn", "tn"), 0)
    replies = [RecordDict({"m": MetricRecord({**counts, "ratio-hist": ratio_histogram(model, [s])})}) for s in series]
    summed = sum_counts(replies, "num-examples")
    pooled, edges = list(summed["ratio-hist"]), list(summed["ratio-edges"])  # type: ignore[arg-type]
    assert len(pooled) == len(RATIO_EDGES) - 1 and sum(pooled) == sum(len(s.test) for s in series)
    assert edges == [quantile_edge(ratio_histogram(model, [s])) for s in series]
    heldout = heldout_factor(pooled, edges, det.threshold_factor)
    assert heldout["factor"] >= det.threshold_factor
    det = DetectorConfig(smoothing_steps=1, threshold_factor=heldout["factor"])
    counters = Outcome()
    counters.provenance = {7: {"rows": TRAIN_ROWS, "data-sha256": "cd" * 32, "held-out": 150}}
    counters.participants = {1: [7]}
    settings = {"strategy": "fedavg", "rounds": 1, "local_epochs": 5, "model": "vibration autoencoder"}
    template = write_template(
        tmp_path / "out", settings, counters, model, {}, 1.5, "2.0.0", vibration_spec(), det, heldout
    )
    assert template.name == "vibration-anomaly-2.0.0"
    shipped = Manifest.load(Path(__file__).resolve().parents[2] / "models" / "vibration_anomaly")
    assert Manifest.load(template).feature_spec_hash == shipped.feature_spec_hash

    values = _pump_rows(0, 110.0)  # a machine no client had (another speed)
    version = specialize(template, values, "m1", tmp_path / "agent")
    loaded = OnnxAnomalyModel.load(version)
    assert loaded.model_id == "vibration-anomaly" and loaded.n_features == 16
    own = smoothed_z(values, None, det)
    fleet = read_autoencoder(template / Manifest.load(template).file)
    scores = loaded.score(values.astype(np.float32))
    np.testing.assert_allclose(scores[: len(own.train)], fleet.score(own.train), rtol=1e-3, atol=1e-6)
    largest = float(fleet.score(own.train).max())
    assert loaded.threshold == pytest.approx(heldout["factor"] ** 2 * largest, rel=1e-4)
    assert (scores[TRAIN_ROWS:] > loaded.threshold).mean() < 0.05
    faulty = loaded.score(_pump_rows(0, 110.0, "bearing_outer")[-40:].astype(np.float32))
    assert (faulty > loaded.threshold).mean() > 0.9


def test_held_out_factor_is_not_raised_by_a_minority_of_faulty_machines() -> None:
    """Four pumps, one of them with an outer-race defect through its held-out windows: the median over the
    clients keeps the factor where the healthy machines' held-out windows put it, and the faulty machine's
    windows alarm at it; the pooled 99.9th percentile would have followed the fault."""
    from pdm_tools.fleet_learning.process_app import detector_for
    from pdm_tools.fleet_learning.process_gate import heldout_factor, quantile_edge, ratio_histogram

    det = detector_for("vibration")
    series = [smoothed_z(_pump_rows(i, 110.0), None, det) for i in range(3)]
    series.append(smoothed_z(_pump_rows(3, 110.0, "bearing_outer", fault_s=85.0), None, det))  # after window 420
    model, _ = train_autoencoder(
        init_autoencoder(16, (16, 4, 16), 0), np.concatenate([s.train for s in series]), AeTraining(epochs=40), 0
    )
    hists = [ratio_histogram(model, [s]) for s in series]
    pooled = np.sum(hists, axis=0).tolist()
    heldout = heldout_factor(pooled, [quantile_edge(h) for h in hists], det.threshold_factor)
    assert heldout["factor"] < 5.0, heldout
    assert quantile_edge(pooled) > 2 * heldout["factor"]  # the pooled rule would sit on the fault
    top = float(np.sqrt(model.score(series[3].train)).max())
    late = np.sqrt(model.score(series[3].test[30:])) / top  # windows wholly after the fault's start
    print(f"factor {heldout['factor']:.3g} (client edges {heldout['client_quantile_edges']}), pooled edge "
          f"{quantile_edge(pooled):.3g}; faulty machine's windows above {(late > heldout['factor']).mean():.3f}, "
          f"above the pooled rule's {(late > 1.5 * quantile_edge(pooled)).mean():.3f}")  # fmt: skip
    assert (late > heldout["factor"]).mean() > 0.9
