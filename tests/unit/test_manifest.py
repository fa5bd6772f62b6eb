"""Manifest loading refuses anything that does not match its ONNX file and today's feature code."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.features.spec import FeatureSpec
from agent.inference.manifest import MANIFEST_FILE, Manifest, ModelError, sha256_file

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [REPO / "models" / "vibration_anomaly", REPO / "models" / "process_anomaly"]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A writable copy of a shipped model directory."""
    dst = tmp_path / "model"
    shutil.copytree(SHIPPED[1], dst)
    return dst


def _edit(model_dir: Path, change: Any) -> None:
    path = model_dir / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("model_dir", SHIPPED, ids=lambda p: p.name)
def test_shipped_manifest_matches_its_onnx_file_and_feature_code(model_dir: Path) -> None:
    manifest = Manifest.load(model_dir)
    assert manifest.sha256 == sha256_file(model_dir / manifest.file)
    spec = FeatureSpec.from_dict(manifest.feature_spec)
    assert manifest.feature_spec_hash == spec.spec_hash()
    assert manifest.feature_names == spec.feature_names()
    assert manifest.inputs[0].shape == ("batch", len(manifest.feature_names))
    assert manifest.threshold > 0
    assert (model_dir / "MODEL_CARD.md").is_file()


def test_write_then_load_gives_an_equal_manifest(model_dir: Path) -> None:
    manifest = Manifest.load(model_dir)
    (model_dir / MANIFEST_FILE).unlink()
    manifest.write(model_dir)
    assert Manifest.load(model_dir) == manifest


def test_load_rejects_a_model_file_whose_sha256_differs(model_dir: Path) -> None:
    manifest = Manifest.load(model_dir)
    with (model_dir / manifest.file).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match=f"sha256 mismatch for '{manifest.file}'"):
        Manifest.load(model_dir)


def test_load_rejects_a_manifest_whose_sha256_was_edited(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d.update(sha256="0" * 64))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        Manifest.load(model_dir)


def test_load_rejects_a_wrong_feature_spec_hash(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d.update(feature_spec_hash="f" * 64))
    with pytest.raises(ModelError, match=r"feature_spec_hash mismatch.*retrain"):
        Manifest.load(model_dir)


def test_load_rejects_a_feature_spec_changed_after_training(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d["feature_spec"].update(hop_samples=10))
    with pytest.raises(ModelError, match="feature_spec_hash mismatch"):
        Manifest.load(model_dir)


def test_load_rejects_an_invalid_feature_spec(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d["feature_spec"].update(colour="blue"))
    with pytest.raises(ModelError, match=r"feature_spec is not a valid FeatureSpec.*colour"):
        Manifest.load(model_dir)


def test_load_rejects_feature_names_that_differ_from_the_spec(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d["feature_names"].reverse())
    with pytest.raises(ModelError, match="feature_names do not match the feature spec"):
        Manifest.load(model_dir)


def test_load_rejects_an_unknown_key_and_names_it(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d.update(colour="blue"))
    with pytest.raises(ModelError, match="unknown key 'colour'"):
        Manifest.load(model_dir)


def test_load_rejects_a_missing_key_and_names_it(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d.pop("threshold"))
    with pytest.raises(ModelError, match="missing key 'threshold'"):
        Manifest.load(model_dir)


def test_load_rejects_an_unknown_key_inside_inputs(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d["inputs"][0].update(layout="NC"))
    with pytest.raises(ModelError, match=r"unknown key 'layout' in inputs\[0\]"):
        Manifest.load(model_dir)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("threshold", "high", "key 'threshold' must be of type int or float, got str"),
        ("threshold", True, "key 'threshold' must be of type int or float, got bool"),
        ("threshold", -1.0, "threshold must be a finite number > 0"),
        ("schema_version", 2, "schema_version 2 is not supported"),
        ("task", "defect", "task 'defect' is not one of"),
        ("file", "../other/model.onnx", "must be a plain file name"),
        ("sha256", "abc", "sha256 must be 64 lowercase hex characters"),
        ("metrics", [], "key 'metrics' must be of type dict"),
    ],
)
def test_load_rejects_bad_values_with_a_specific_message(
    model_dir: Path, key: str, value: object, message: str
) -> None:
    _edit(model_dir, lambda d: d.update({key: value}))
    with pytest.raises(ModelError, match=message):
        Manifest.load(model_dir)


def test_load_rejects_an_input_shape_that_does_not_match_the_features(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d["inputs"][0].update(shape=["batch", 3]))
    with pytest.raises(ModelError, match="inputs must be one float32 tensor of shape"):
        Manifest.load(model_dir)


def test_load_reports_a_missing_model_file(model_dir: Path) -> None:
    manifest = Manifest.load(model_dir)
    (model_dir / manifest.file).unlink()
    with pytest.raises(ModelError, match="does not exist"):
        Manifest.load(model_dir)


def test_load_reports_a_missing_or_broken_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read manifest"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_load_rejects_a_feature_spec_of_another_feature_code_version(model_dir: Path) -> None:
    def bump(d: dict[str, Any]) -> None:
        d["feature_spec"]["version"] = 99
        d["feature_spec_hash"] = FeatureSpec.from_dict(d["feature_spec"]).spec_hash()

    _edit(model_dir, bump)
    with pytest.raises(ModelError, match="feature_spec version 99 is not computed by this agent"):
        Manifest.load(model_dir)


# The defect classifier's manifest is the same format with task "classifier" and its own keys.
CLASSIFIER = REPO / "models" / "defect_classifier"


@pytest.fixture
def classifier_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "classifier"
    shutil.copytree(CLASSIFIER, dst)
    return dst


@pytest.mark.parametrize("model_dir", [*SHIPPED, CLASSIFIER], ids=lambda p: p.name)
def test_shipped_manifests_are_written_back_byte_for_byte(model_dir: Path) -> None:
    manifest = Manifest.load(model_dir)
    text = json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n"
    assert text == (model_dir / MANIFEST_FILE).read_text()


def test_a_classifier_manifest_has_class_names_and_no_threshold() -> None:
    manifest = Manifest.load(CLASSIFIER, task="classifier")
    assert manifest.task == "classifier" and manifest.threshold is None
    assert manifest.class_names == ("normal", "inner_race", "outer_race", "ball")
    assert "threshold" not in manifest.to_dict() and "class_names" not in Manifest.load(SHIPPED[0]).to_dict()


def test_load_refuses_a_model_of_another_task_than_asked(classifier_dir: Path) -> None:
    with pytest.raises(ModelError, match="is a 'classifier' model, used here as 'anomaly'") as info:
        Manifest.load(classifier_dir, task="anomaly")
    assert info.value.reason == "task"


@pytest.mark.parametrize(
    ("change", "message", "reason"),
    [
        (lambda d: d.update(threshold=1.0), "unknown key 'threshold' (a key of task 'anomaly' manifests)", "manifest"),
        (lambda d: d.pop("class_names"), "missing key 'class_names'", "manifest"),
        (lambda d: d.update(class_names=["only"]), "class_names must be two or more distinct strings", "manifest"),
        (lambda d: d["outputs"].pop(), "inputs/outputs must be", "shape"),
        (lambda d: d["feature_spec"].update(harmonics=2), "feature_spec_hash mismatch", "feature_spec"),
        (lambda d: d["feature_spec"].update(harmonics=99), "not a valid BearingFeatureSpec", "feature_spec"),
    ],
)
def test_load_refuses_a_bad_classifier_manifest_with_its_reason(
    classifier_dir: Path, change: Any, message: str, reason: str
) -> None:
    _edit(classifier_dir, change)
    with pytest.raises(ModelError, match=re.escape(message)) as info:
        Manifest.load(classifier_dir)
    assert info.value.reason == reason


def test_sha256_and_feature_spec_refusals_carry_their_reason(model_dir: Path) -> None:
    _edit(model_dir, lambda d: d.update(sha256="0" * 64))
    with pytest.raises(ModelError) as info:
        Manifest.load(model_dir)
    assert info.value.reason == "sha256"
