"""The model registry: which version runs, why a directory is refused, and how a new version is swapped in."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bootstrap import build_models
from agent.config import ConfigError, parse_config
from agent.features.spec import FeatureSpec
from agent.inference.manifest import MANIFEST_FILE, Manifest, ModelError, sha256_file
from agent.inference.registry import ModelRegistry, default_builders, version_key
from agent.inference.router import CurrentClassifier, ModelRouter
from agent.metrics import Metrics
from agent.records import Source

REPO = Path(__file__).resolve().parents[2]
VIBRATION = REPO / "models" / "vibration_anomaly"
PROCESS = REPO / "models" / "process_anomaly"
DEFECT = REPO / "models" / "defect_classifier"
VIB_ID = "vibration-anomaly"
SOURCE = Source.of(site="s1", line="l1", machine="m01", sensor="vibration")


def add_version(
    models: Path, name: str, version: str, src: Path = VIBRATION, change: Callable[[dict, Path], None] | None = None
) -> Path:
    """Copy a shipped model to ``models/name`` as ``version``; ``change(manifest, dir)`` edits it; sha256 redone."""
    dst = models / name
    shutil.copytree(src, dst)
    path = dst / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["version"] = version
    if change is not None:
        change(data, dst)
    data["sha256"] = sha256_file(dst / data["file"])
    path.write_text(json.dumps(data, indent=2))
    return dst


@pytest.fixture
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    add_version(d, "vibration_anomaly", "1.0.0")
    return d


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def registry(models: Path, metrics: Metrics, builders: dict[str, Any] | None = None) -> ModelRegistry:
    return ModelRegistry(models, metrics, builders or default_builders(1))


# ------------------------------------------------------------------------------------------ version choice


def test_versions_are_ordered_by_semantic_version_precedence() -> None:
    versions = ["1.10.0", "1.2.0", "1.2.0-rc.10", "1.2.0-rc.2", "1.2.0-alpha", "0.9.9", "2.0.0-beta"]
    assert sorted(versions, key=version_key) == [
        "0.9.9",
        "1.2.0-alpha",
        "1.2.0-rc.2",
        "1.2.0-rc.10",
        "1.2.0",
        "1.10.0",
        "2.0.0-beta",
    ]
    for bad in ("1.0", "v1.0.0", "01.0.0", "1.0.0-", ""):
        with pytest.raises(ValueError, match="not a semantic version"):
            version_key(bad)


def test_the_highest_version_is_loaded_whatever_the_directory_names(models: Path, metrics: Metrics) -> None:
    add_version(models, "a-newest", "1.10.0")
    add_version(models, "z-older", "1.9.0")
    add_version(models, "candidate", "1.10.0-rc.1")
    reg = registry(models, metrics)
    slot = reg.track(VIB_ID, "anomaly")
    assert slot.model.version == "1.10.0"
    assert reg.active() == {VIB_ID: ("1.10.0", models / "a-newest")}
    assert metrics.get("models.loaded", model=VIB_ID, version="1.10.0") == 1


def test_an_unknown_model_id_is_refused_with_what_was_found(models: Path, metrics: Metrics) -> None:
    with pytest.raises(ModelError, match=r"no model 'nope' in .*models \(found: vibration-anomaly\)"):
        registry(models, metrics).track("nope", "anomaly")


def test_at_start_a_bad_highest_version_is_refused_and_the_next_one_runs(models: Path, metrics: Metrics) -> None:
    bad = add_version(models, "vibration_anomaly-2.0.0", "2.0.0")
    (bad / "model.fp32.onnx").write_bytes(b"corrupted")
    slot = registry(models, metrics).track(VIB_ID, "anomaly")
    assert slot.model.version == "1.0.0"
    assert metrics.get("models.refused", reason="sha256") == 1


def test_with_no_usable_version_the_start_is_refused_with_each_reason(models: Path, metrics: Metrics) -> None:
    (models / "vibration_anomaly" / "model.fp32.onnx").write_bytes(b"corrupted")
    with pytest.raises(ModelError, match=r"no usable version of model 'vibration-anomaly'.*sha256 mismatch") as info:
        registry(models, metrics).track(VIB_ID, "anomaly")
    assert info.value.reason == "sha256"


def test_dot_directories_and_directories_without_manifest_are_ignored(models: Path, metrics: Metrics) -> None:
    add_version(models, ".incoming", "9.0.0")
    (models / "notes").mkdir()
    (models / "notes" / "README").write_text("not a model")
    reg = registry(models, metrics)
    assert reg.track(VIB_ID, "anomaly").model.version == "1.0.0"
    assert metrics.get("models.refused") == 0


# ------------------------------------------------------------------------------------------ refusals


def _corrupt_file(data: dict, d: Path) -> None:
    (d / data["file"]).write_bytes(b"\0" * 64)  # the manifest is rewritten with this file's sha256


def _graph_of_another_model(data: dict, d: Path) -> None:
    shutil.copy(PROCESS / "model.fp32.onnx", d / data["file"])


REFUSALS = [
    ("sha256", None, "sha256 mismatch for 'model.fp32.onnx'"),
    ("feature_spec", lambda data, d: data.update(feature_spec_hash="f" * 64), "feature_spec_hash mismatch"),
    ("onnx", _corrupt_file, "ONNX Runtime cannot load the model"),
    ("shape", lambda data, d: data["inputs"][0].update(shape=["batch", 3]), "inputs must be one float32 tensor"),
    ("shape", _graph_of_another_model, "graph input 'features' has shape"),
    ("task", None, "is a 'classifier' model here, the agent uses it as 'anomaly'"),
    ("version", lambda data, d: data.update(version="1.1"), "'1.1' is not a semantic version"),
    ("manifest", lambda data, d: data.update(threshold=-1), "threshold must be a finite number > 0"),
    ("geometry", None, "windows differently"),
]


@pytest.mark.parametrize(("reason", "change", "message"), REFUSALS, ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSALS)])
def test_a_bad_new_version_is_refused_with_its_reason_and_the_running_one_keeps_serving(
    models: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture, reason: str, change: Any, message: str
) -> None:
    reg = registry(models, metrics)
    slot = reg.track(VIB_ID, "anomaly")
    running = slot.model
    if reason == "sha256":
        bad = add_version(models, "bad", "1.1.0")
        with (bad / "model.fp32.onnx").open("ab") as fh:
            fh.write(b"\0")
    elif reason == "task":
        bad = add_version(models, "bad", "1.1.0", src=DEFECT, change=lambda data, d: data.update(model_id=VIB_ID))
    elif reason == "geometry":

        def longer_windows(data: dict, d: Path) -> None:
            data["feature_spec"].update(window_samples=8192, hop_samples=4096)
            data["feature_spec_hash"] = FeatureSpec.from_dict(data["feature_spec"]).spec_hash()

        bad = add_version(models, "bad", "1.1.0", change=longer_windows)
    else:
        bad = add_version(models, "bad", "1.1.0", change=change)
    with caplog.at_level(logging.ERROR, logger="agent.inference.registry"):
        reg.refresh()
    assert slot.model is running and reg.active()[VIB_ID] == ("1.0.0", models / "vibration_anomaly")
    assert metrics.get("models.refused", reason=reason) == 1 and metrics.get("models.refused") == 1
    error = reg.refused()[bad]
    assert error.reason == reason and message in str(error)
    assert f"model directory {bad} refused ({reason})" in caplog.text and message in caplog.text
    assert metrics.get("models.loaded", model=VIB_ID, version="1.0.0") == 1


def test_an_unchanged_bad_directory_is_not_tried_again_until_its_files_change(
    models: Path, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = registry(models, metrics)
    slot = reg.track(VIB_ID, "anomaly")
    bad = add_version(models, "vibration_anomaly-1.1.0", "1.1.0", change=lambda data, d: data.update(threshold=2.5))
    manifest_path = bad / MANIFEST_FILE
    good_manifest = manifest_path.read_text()
    data = json.loads(good_manifest)
    data["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(data))
    verified: list[Path] = []
    real_verify = Manifest.verify

    def counting_verify(self: Manifest, model_dir: Path) -> None:
        verified.append(Path(model_dir))
        real_verify(self, model_dir)

    monkeypatch.setattr(Manifest, "verify", counting_verify)
    for _ in range(5):
        reg.refresh()
    assert verified == [bad] and metrics.get("models.refused", reason="sha256") == 1
    assert slot.model.version == "1.0.0"
    manifest_path.write_text(good_manifest)  # the operator fixes it
    reg.refresh()
    assert slot.model.version == "1.1.0" and slot.model.threshold == 2.5
    assert bad not in reg.refused()
    assert metrics.get("models.loaded", model=VIB_ID, version="1.0.0") == 0
    assert metrics.get("models.loaded", model=VIB_ID, version="1.1.0") == 1


def test_a_duplicate_version_is_refused_and_the_running_directory_kept(models: Path, metrics: Metrics) -> None:
    reg = registry(models, metrics)
    slot = reg.track(VIB_ID, "anomaly")
    running = slot.model
    copy = add_version(models, "a-copy", "1.0.0")
    reg.refresh()
    assert slot.model is running
    assert reg.refused()[copy].reason == "duplicate" and "is also in" in str(reg.refused()[copy])


def test_a_lower_version_does_not_replace_the_running_one_but_takes_over_when_it_is_removed(
    models: Path, metrics: Metrics
) -> None:
    newer = add_version(models, "vibration_anomaly-1.1.0", "1.1.0")
    reg = registry(models, metrics)
    slot = reg.track(VIB_ID, "anomaly")
    assert slot.model.version == "1.1.0"
    add_version(models, "vibration_anomaly-0.9.0", "0.9.0")
    reg.refresh()
    assert slot.model.version == "1.1.0"
    shutil.rmtree(newer)  # roll back: remove the newer version
    reg.refresh()
    assert slot.model.version == "1.0.0"
    shutil.rmtree(models / "vibration_anomaly")
    shutil.rmtree(models / "vibration_anomaly-0.9.0")
    reg.refresh()  # nothing left on disk: the loaded model keeps running
    assert slot.model.version == "1.0.0"


def test_a_version_rewritten_in_place_is_reloaded(models: Path, metrics: Metrics) -> None:
    reg = registry(models, metrics)
    slot = reg.track(VIB_ID, "anomaly")
    path = models / "vibration_anomaly" / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(version="1.0.1", threshold=3.0)
    path.write_text(json.dumps(data))
    reg.refresh()
    assert (slot.model.version, slot.model.threshold) == ("1.0.1", 3.0)


# ------------------------------------------------------------------------------------------ swap semantics


class FakeModel:
    """Stands in for ``OnnxAnomalyModel``: its score is its version's major number."""

    def __init__(self, manifest: Manifest, built: threading.Event | None = None) -> None:
        self.model_id = manifest.model_id
        self.version = manifest.version
        self.threshold = 1.0
        self.spec = manifest.spec()
        if built is not None:
            built.wait()  # a slow load: the running version must keep serving meanwhile

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), float(self.version.split(".")[0]), dtype=np.float32)


def test_a_swap_scores_every_window_exactly_once_by_the_old_then_the_new_version(
    models: Path, metrics: Metrics
) -> None:
    release = threading.Event()
    building = threading.Event()

    def build(manifest: Manifest, _path: Path) -> FakeModel:
        if manifest.version == "1.0.0":
            return FakeModel(manifest)
        building.set()
        return FakeModel(manifest, release)

    reg = registry(models, metrics, {"anomaly": build})
    router = ModelRouter([(("vibration*",), reg.track(VIB_ID, "anomaly"))])
    window_spec = router.spec_for(SOURCE)
    add_version(models, "vibration_anomaly-2.0.0", "2.0.0")

    scored: dict[int, str] = {}
    stop = threading.Event()

    def scoring_worker() -> None:
        # Like ScoringWorker: take the model once per window and use only that object for it.
        i = 0
        while not stop.is_set() or scored.get(i - 1) != "2.0.0":
            model = router.model_for(SOURCE)
            assert model is not None
            assert i not in scored
            scored[i] = f"{int(model.score(np.zeros((1, 16), np.float32))[0])}.0.0"
            i += 1

    worker = threading.Thread(target=scoring_worker)
    worker.start()
    reloader = threading.Thread(target=reg.refresh)
    reloader.start()
    assert building.wait(30)
    n_during_load = len(scored)
    release.set()
    reloader.join(30)
    stop.set()
    worker.join(30)

    versions = [scored[i] for i in range(len(scored))]
    assert len(versions) == len(scored) > n_during_load >= 0
    switch = versions.index("2.0.0")
    assert set(versions[:switch]) == {"1.0.0"} and set(versions[switch:]) == {"2.0.0"}  # old, then new, once each
    assert switch >= n_during_load  # everything scored while 2.0.0 was loading was scored by 1.0.0
    assert router.spec_for(SOURCE) is window_spec  # same geometry: the windower's buffers are not restarted
    assert metrics.get("models.swaps", model=VIB_ID) == 1


def test_the_watcher_thread_picks_up_a_new_version(models: Path, metrics: Metrics) -> None:
    reg = registry(models, metrics, {"anomaly": lambda m, p: FakeModel(m)})
    slot = reg.track(VIB_ID, "anomaly")
    reg.start(0.01)
    try:
        add_version(models, "vibration_anomaly-1.1.0", "1.1.0")
        swapped = threading.Event()
        for _ in range(3000):
            if slot.model.version == "1.1.0":
                swapped.set()
                break
            swapped.wait(0.01)
        assert swapped.is_set()
    finally:
        reg.stop()


def test_the_current_classifier_reports_the_version_that_answered(tmp_path: Path, metrics: Metrics) -> None:
    models = tmp_path / "models"
    models.mkdir()
    add_version(models, "defect_classifier", "1.0.0", src=DEFECT)
    reg = registry(models, metrics)
    clf = CurrentClassifier(reg.track("bearing-defect-classifier", "classifier"))
    assert (clf.model_id, clf.version, clf.class_names[0]) == ("bearing-defect-classifier", "1.0.0", "normal")
    assert clf.classify([], 1800.0) == []
    add_version(models, "defect_classifier-1.1.0", "1.1.0", src=DEFECT)
    reg.refresh()
    assert clf.version == "1.0.0"  # the last answer came from 1.0.0
    assert clf.classify([], 1800.0) == []
    assert clf.version == "1.1.0"


# ------------------------------------------------------------------------------------------ config and wiring


@pytest.mark.parametrize(
    ("inference", "path", "reason"),
    [
        (
            {"models": [{"model_id": "m", "sensors": ["x"]}]},
            "inference.models[0].model_id",
            "needs inference.models_dir",
        ),
        ({"models": [{"sensors": ["x"]}]}, "inference.models[0].path", "is required (or model_id"),
        ({"models": [{"path": "a", "model_id": "m", "sensors": ["x"]}]}, "inference.models[0].model_id", "not both"),
        ({"defect": {"model_id": "d"}}, "inference.defect.model_id", "needs inference.models_dir"),
        ({"defect": {"model_id": "d", "path": "x"}}, "inference.defect.model_id", "not both"),
        ({"reload_interval_s": -1}, "inference.reload_interval_s", "must be >= 0"),
        ({"models_dir": "no/such/dir"}, "inference.models_dir", "is not a directory"),
    ],
)
def test_registry_config_is_refused_with_key_path_and_reason(
    tmp_path: Path, inference: dict, path: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"inference": inference}, base_dir=tmp_path, environ={})
    assert info.value.path == path
    assert reason in info.value.reason


def test_config_entries_by_model_id_and_by_path_are_wired_through_one_registry(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    add_version(models, "vibration_anomaly", "1.0.0")
    add_version(models, "vibration_anomaly-1.2.0", "1.2.0")
    add_version(models, "defect_classifier", "1.0.0", src=DEFECT)
    config = parse_config(
        {
            "inference": {
                "models_dir": "models",
                "reload_interval_s": 0,
                "models": [
                    {"model_id": VIB_ID, "sensors": ["vibration*"]},
                    {"path": str(PROCESS), "sensors": ["process"]},
                ],
                "defect": {"model_id": "bearing-defect-classifier"},
            }
        },
        base_dir=tmp_path,
        environ={},
    )
    metrics = Metrics()
    built = build_models(config, metrics)
    assert [(m.model_id, m.version) for m in built.router.models] == [(VIB_ID, "1.2.0"), ("process-anomaly", "1.0.0")]
    assert built.classifier is not None and built.classifier.version == "1.0.0"
    assert built.registry is not None and set(built.registry.active()) == {VIB_ID, "bearing-defect-classifier"}
    assert metrics.get("models.loaded", model="process-anomaly", version="1.0.0") == 1
