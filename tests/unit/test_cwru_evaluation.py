"""``pdm-agent evaluate cwru`` and the defect classifier build, on a tiny generated CWRU-like dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import cli
from agent.features.bearing import SKF_6205, BearingFeatureSpec
from agent.inference.classifier import OnnxDefectClassifier
from agent.inference.errors import ModelError
from agent.inference.manifest import Manifest
from agent.records import Source, Window
from pdm_tools.datasets.cwru import NORMAL_TRAIN_HOP, featurize, load_cwru
from pdm_tools.evaluation import cwru
from pdm_tools.models.defect_mlp import MlpConfig, fit_mlp
from pdm_tools.training.defect_train import train_defect_classifier

RATE = 12000
MULT = dict(SKF_6205)
LOAD_RPM = {0: 1797.0, 1: 1772.0, 2: 1750.0}


def signal(kind: str, rpm: float, n: int, seed: int, rate: float = RATE) -> np.ndarray:
    """Shaft harmonics and noise, plus resonance-ringing impacts at the defect frequency of ``kind``."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    shaft = rpm / 60
    x = 0.05 * np.sin(2 * np.pi * shaft * t) + 0.05 * rng.standard_normal(n)
    if kind == "normal":
        return x
    defect = {"inner_race": MULT["bpfi"], "outer_race": MULT["bpfo"], "ball": 2 * MULT["bsf"]}[kind] * shaft
    ring_t = np.arange(int(0.003 * rate)) / rate
    ring = np.exp(-2 * np.pi * 3000 * 0.05 * ring_t) * np.sin(2 * np.pi * 3000 * ring_t)
    for t0 in np.arange(rng.uniform(0, 1 / defect), t[-1], 1 / defect):
        gain = 1.0
        if kind == "inner_race":  # the defect passes through the load zone once per revolution
            gain = 0.6 + 0.4 * np.cos(2 * np.pi * shaft * t0)
        elif kind == "ball":  # the ball's defect enters the load zone once per cage revolution
            gain = 0.6 + 0.4 * np.cos(2 * np.pi * MULT["ftf"] * shaft * t0)
        i = round(t0 * rate)
        x[i : i + len(ring)] += gain * ring[: n - i]
    return x


def vibration_windows(kinds: tuple[str, ...], rpm: float, rate: float, seed: int) -> list[Window]:
    """One 4096-sample window of ``signal`` per kind, as the agent's runtime hands them to a classifier."""
    return [
        Window(
            source=Source.of(machine="m01", sensor="vibration"),
            kind="vibration",
            start_ns=0,
            end_ns=1,
            channels=("value",),
            data=signal(kind, rpm, 4096, seed=seed + i, rate=rate)[None],
            times_s=np.arange(4096) / rate,
            rate_hz=rate,
        )
        for i, kind in enumerate(kinds)
    ]


def write_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    recordings = [("normal", 0, 3 * 8192)] + [
        (kind, load, 16384) for load in LOAD_RPM for kind in ("inner_race", "outer_race", "ball")
    ]
    for seed, (kind, load, n) in enumerate(recordings, start=1):
        name = f"{kind}_{load}.npz"
        rpm = LOAD_RPM[load]
        np.savez(
            folder / name, de=signal(kind, rpm, n, seed).astype(np.float32), fs=np.int32(RATE), rpm=np.float32(rpm)
        )
        diameter = None if kind == "normal" else (0.014 if load == 2 else 0.007)
        index.append({"file": name, "kind": kind, "diameter_in": diameter, "load_hp": load, "rpm": rpm, "fs_hz": RATE})
    (folder / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("datasets") / "cwru")


def test_evaluate_cwru_json_has_cross_load_random_split_and_quantized(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["evaluate", "cwru", "--data", str(dataset), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"cross_load", "cross_load_faults_only", "random_split", "quantized"} <= set(result)
    rotations = result["cross_load"]["rotations"]
    assert sorted(rotations) == ["test_load_0", "test_load_1", "test_load_2"]
    for r in rotations.values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
        assert np.array(r["confusion"]).shape == (4, 4)
        assert np.array(r["confusion"])[0].sum() == 3  # the healthy part standing for this load
    assert result["cross_load"]["mean_macro_f1"] >= 0.9  # the synthetic faults are easy
    assert np.array(result["cross_load_faults_only"]["rotations"]["test_load_1"]["confusion"]).shape == (3, 3)
    assert {"accuracy", "macro_f1", "published"} <= set(result["random_split"])
    assert sorted(result["cross_fault_size"]["folds"]) == ["test_diameter_0.007in", "test_diameter_0.014in"]
    assert list(result).index("cross_bearing") < list(result).index("cross_load")  # leakage-free protocols first
    bearings = result["cross_bearing"]["bearings"]
    assert sorted(bearings) == [f"{k}_{d}in" for k in ("ball", "inner_race", "outer_race") for d in (0.007, 0.014)]
    assert bearings["outer_race_0.007in"]["loads"] == [0, 1] and bearings["ball_0.014in"]["loads"] == [2]
    # Every fault window once (7 per 16384-sample recording), every healthy window once (3 parts x 3).
    assert result["cross_bearing"]["test_windows"] == 9 * 7 + 9
    assert all(b["envelope_visible"] for b in bearings.values())  # the synthetic faults ring at their frequency
    quantized = result["quantized"]
    assert set(quantized["cross_load"]["rotations"]) == set(rotations)
    assert {"accuracy", "macro_f1", "label_agreement"} <= set(quantized["random_split"])


def test_cross_bearing_never_trains_on_a_window_of_the_bearing_it_tests(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fold's training rows hold no row of the held-out bearing (at any load) and all other bearings."""
    recordings = load_cwru(dataset)
    spec = BearingFeatureSpec()
    _, faults, normal_by_load = cwru._arrange(recordings)
    rows = {r.file: featurize(spec, r, r.samples, spec.hop_samples) for r in faults}
    normal_train = {k: featurize(spec, r, s, NORMAL_TRAIN_HOP) for k, (r, s) in normal_by_load.items()}
    normal_test = {k: featurize(spec, r, s, spec.hop_samples) for k, (r, s) in normal_by_load.items()}
    trained_on: list[np.ndarray] = []

    def recording_fit(x: np.ndarray, y: np.ndarray, names: Any, seed: int, config: Any = None) -> Any:
        trained_on.append(x)
        return fit_mlp(x, y, names, seed, MlpConfig(hidden=(4,), max_iter=5))

    monkeypatch.setattr(cwru, "fit_mlp", recording_fit)
    result = cwru._cross_bearing(cwru.Featurized(spec, faults, rows, normal_train, normal_test, 0, MlpConfig()))
    assert len(trained_on) == len(result["bearings"]) == 6
    for x_train, name in zip(trained_on, result["bearings"], strict=True):
        train = {row.tobytes() for row in x_train}
        for r in faults:
            held_out = cwru.bearing_id(r) == name
            assert all((row.tobytes() in train) != held_out for row in rows[r.file]), (name, r.file)


def test_evaluate_cwru_accepts_the_datasets_root_and_prints_tables(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["evaluate", "cwru", "--data", str(dataset.parent), "--no-quantize"]) == 0
    out = capsys.readouterr().out
    assert "Cross-load, four classes" in out and "Random split" in out
    assert out.index("Cross-bearing") < out.index("Cross-size") < out.index("Cross-load")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_writes_the_leave_out_confusion_matrices_and_the_int8_scatter(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures"
    assert cli.main(["evaluate", "cwru", "--data", str(dataset), "--json", "--plots", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "cwru_confusion_cross_bearing.png",
        "cwru_confusion_cross_load.png",
        "cwru_confusion_cross_size.png",
        "cwru_int8_vs_fp32.png",
    ]
    for path in out.iterdir():
        width, height = png_size(path)
        assert 300 <= width <= 1200 and 300 <= height <= 1200, (path.name, width, height)
        assert 5_000 < path.stat().st_size < 300_000, path.name
    captured = capsys.readouterr()
    assert "wrote 4 figures" in captured.err
    assert json.loads(captured.out)["quantized"]  # the figures do not replace the JSON on stdout


def test_plots_checks_matplotlib_before_the_evaluation(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pdm_tools.common import plots

    def missing() -> None:
        raise plots.PlotsUnavailable("--plots needs matplotlib: pip install 'pdm-agent[tools]'")

    def not_reached(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        raise AssertionError("the evaluation ran without matplotlib for its figures")

    monkeypatch.setattr(plots, "_pyplot", missing)
    monkeypatch.setattr(cwru, "evaluate", not_reached)
    assert cli.main(["evaluate", "cwru", "--data", str(dataset), "--plots", str(tmp_path / "f")]) == 2
    assert "pip install 'pdm-agent[tools]'" in capsys.readouterr().err


def test_evaluate_cwru_says_clearly_when_the_data_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDM_DATASETS", str(tmp_path / "nowhere"))
    assert cli.main(["evaluate", "cwru"]) == 2
    err = capsys.readouterr().err
    assert "index.json not found" in err and "PDM_DATASETS" in err


def test_built_classifier_loads_verifies_and_classifies_windows_at_another_rate(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "defect_classifier"
    manifest = train_defect_classifier(dataset, out, seed=3, ship="int8", evaluate=False, latency_runs=5)
    assert manifest.class_names == ("normal", "inner_race", "outer_race", "ball")
    assert (out / "MODEL_CARD.md").is_file() and manifest.file == "model.int8.onnx"
    model = OnnxDefectClassifier.load(out)
    rpm = 1790.0
    predictions = model.classify(vibration_windows(("outer_race", "inner_race"), rpm, 10240.0, seed=100), rpm)
    assert [p.class_name for p in predictions] == ["outer_race", "inner_race"]
    assert predictions[0].as_dict()["defect"] == "outer_race"
    assert sum(predictions[0].as_dict()["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)

    data = json.loads((out / "manifest.json").read_text())
    data["feature_spec"]["harmonics"] = 2
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="feature_spec_hash mismatch"):
        Manifest.load(out, task="classifier")


def test_built_classifier_card_gives_the_new_bearing_figures(dataset: Path, tmp_path: Path) -> None:
    manifest = train_defect_classifier(dataset, tmp_path / "model", seed=3, evaluate=True, latency_runs=2)
    bearing = manifest.metrics["cross_bearing"]
    assert bearing["bearings"] == 6 and 0 <= bearing["macro_f1"] <= 1
    card = (tmp_path / "model" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Leaving one damaged bearing out (all its loads; 6 bearings)" in card
    assert "## Figures" not in card  # recordings too short to hold rows out: nothing to draw them from
