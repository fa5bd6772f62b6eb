"""The envelope-evidence feature set end to end: ``evaluate cwru --features envelope`` and a classifier built
on it that the agent's runtime serves (it computes the same features from windows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import cli
from agent.inference.classifier import OnnxDefectClassifier
from pdm_tools.evaluation import cwru
from pdm_tools.training.defect_train import train_defect_classifier
from tests.unit.test_cwru_evaluation import vibration_windows, write_dataset

ENVELOPE = cwru.FEATURE_SETS["envelope"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("datasets") / "cwru")


def test_evaluate_with_the_envelope_set_reports_its_spec_and_ablates_its_families(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["evaluate", "cwru", "--data", str(dataset), "--features", "envelope", "--no-quantize", "--ablation"]
    assert cli.main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["feature_spec"]["groups"] == ["band_shares", "envelope_evidence"]
    assert result["feature_spec_hash"] == ENVELOPE.spec_hash()
    assert {"cross_bearing", "cross_fault_size", "cross_load"} <= set(result)
    # The synthetic faults ring at their frequency: the evidence columns see every bearing.
    assert all(b["envelope_visible"] for b in result["cross_bearing"]["bearings"].values())
    ablation = result["ablation"]
    assert {"only_evidence_whitened", "without_evidence_relative", "without_band_shares"} <= set(ablation)
    assert not any("time" in k or "envelope_peaks" in k for k in ablation)  # groups of the other set
    assert ablation["only_evidence_relative"]["features"] == 6
    assert ablation["only_evidence_defect_lines"]["features"] == 8  # BPFI, BPFO, BSF, 2 BSF; not sidebands


def test_unknown_feature_set_is_refused_by_the_parser(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "cwru", "--data", str(dataset), "--features", "magic"])
    assert exc.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_classifier_on_the_envelope_set_is_served_from_windows(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "defect_classifier"
    manifest = train_defect_classifier(dataset, out, seed=3, spec=ENVELOPE, evaluate=False, latency_runs=5)
    assert manifest.feature_spec_hash == ENVELOPE.spec_hash()
    assert manifest.feature_names == ENVELOPE.feature_names()
    model = OnnxDefectClassifier.load(out)
    assert model.spec == ENVELOPE
    rpm = 1790.0  # another speed and rate than the training data's
    windows = vibration_windows(("outer_race", "inner_race"), rpm, 10240.0, seed=200)
    assert [p.class_name for p in model.classify(windows, rpm)] == ["outer_race", "inner_race"]
