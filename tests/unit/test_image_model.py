"""Image preprocessing and the ``image-classifier`` model kind: shapes, determinism, and refusals by reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.images.preprocess import ImageSpec, batch, prepare
from agent.inference.errors import ModelError
from agent.inference.image import OnnxImageClassifier
from agent.inference.kinds import model_class
from agent.inference.manifest import Manifest
from pdm_tools.common.modelcard import CARD_FILE
from pdm_tools.datasets.neu import CLASS_NAMES
from pdm_tools.images import synth
from pdm_tools.images.card import render_card
from pdm_tools.images.cnn import Cnn
from pdm_tools.images.export import write_model_dir

CLASSES = ("a", "b", "c")
SIZE = 16


def frame(seed: int, h: int = 40, w: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A tiny random network of the shipped contract (never shipped: weights from a seed)."""
    net = Cnn.init((4, 8), len(CLASSES), seed=3)
    write_model_dir(net.to_onnx(SIZE, CLASSES), tmp_path / "m", ImageSpec(SIZE), CLASSES)
    return tmp_path / "m"


# --- preprocessing -------------------------------------------------------------------------------------


def test_prepare_gives_a_standardised_square_of_the_asked_size_for_any_frame_size() -> None:
    for h, w in ((40, 50), (416, 416), (16, 16), (9, 300)):
        x = prepare(frame(h * w, h, w), SIZE)
        assert x.shape == (1, SIZE, SIZE) and x.dtype == np.float32
        assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3


def test_prepare_is_deterministic_and_ignores_brightness_and_contrast() -> None:
    g = frame(1)
    assert np.array_equal(prepare(g, SIZE), prepare(g.copy(), SIZE))
    # An exposure change (gain and offset) that stays inside 0..255 gives the same input.
    u = frame(2, SIZE, SIZE) // 2
    assert np.allclose(prepare(u * 2, SIZE), prepare(u + 10, SIZE), atol=1e-4)


def test_a_flat_frame_becomes_zeros_not_nan() -> None:
    x = prepare(np.full((20, 20), 77, dtype=np.uint8), SIZE)
    assert np.array_equal(x, np.zeros((1, SIZE, SIZE), dtype=np.float32))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4, 3), dtype=np.uint8), np.zeros((0, 4), dtype=np.uint8), [1]],
)
def test_prepare_refuses_anything_but_a_2d_uint8_frame(bad: object) -> None:
    with pytest.raises(ValueError, match="uint8 array of shape"):
        prepare(bad, SIZE)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 7, 2000, True])
def test_prepare_refuses_an_absurd_size(size: int) -> None:
    with pytest.raises(ValueError, match="size must be"):
        prepare(frame(0), size)


def test_batch_stacks_prepared_images_and_refuses_mixed_sizes_or_nothing() -> None:
    xs = [prepare(frame(i), SIZE) for i in range(3)]
    assert batch(xs).shape == (3, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="image 1 has shape"):
        batch([xs[0], prepare(frame(9), SIZE * 2)])
    with pytest.raises(ValueError, match="at least one"):
        batch([])


def test_image_spec_round_trips_and_its_hash_names_every_parameter() -> None:
    spec = ImageSpec(64)
    assert ImageSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.spec_hash() != ImageSpec(96).spec_hash()
    with pytest.raises(ValueError, match="unknown keys"):
        ImageSpec.from_dict({**spec.to_dict(), "mean": 0.5})
    with pytest.raises(ValueError, match="resample/normalize"):
        ImageSpec(64, resample="bilinear")


# --- the model kind ------------------------------------------------------------------------------------


def test_the_classifier_loads_and_classifies_a_batch_like_onnx_runtime(model_dir: Path) -> None:
    model = OnnxImageClassifier.load(model_dir)
    assert model.input_size == SIZE and model.classes == CLASSES
    x = model.prepare([frame(i, 30 + i, 40) for i in range(5)])
    index, probs = model.classify(x)
    assert index.shape == (5,) and index.dtype == np.int64
    assert probs.shape == (5, len(CLASSES)) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and np.array_equal(index, probs.argmax(axis=1))
    (direct,) = ort.InferenceSession(str(model_dir / "model.fp32.onnx")).run(["probs"], {"image": x})
    assert np.allclose(probs, direct, atol=1e-6)


def test_the_numpy_network_and_its_onnx_export_agree(model_dir: Path) -> None:
    net = Cnn.init((4, 8), len(CLASSES), seed=3)
    x = np.stack([prepare(frame(i), SIZE) for i in range(4)])
    z = net.logits(x)
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    _, probs = OnnxImageClassifier.load(model_dir).classify(x)
    assert np.allclose(probs, expected, atol=1e-5)


def test_an_empty_batch_gives_empty_answers(model_dir: Path) -> None:
    index, probs = OnnxImageClassifier.load(model_dir).classify(np.zeros((0, 1, SIZE, SIZE), dtype=np.float32))
    assert index.shape == (0,) and probs.shape == (0, len(CLASSES))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((2, 1, SIZE + 1, SIZE), dtype=np.float32), "shape"),
        (np.zeros((2, 1, SIZE, SIZE), dtype=np.float64), "float32"),
        (np.full((1, 1, SIZE, SIZE), np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_classify_refuses_a_batch_that_is_not_the_models_input(model_dir: Path, x: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OnnxImageClassifier.load(model_dir).classify(x)


def _edit_manifest(model_dir: Path, **changes: object) -> None:
    path = model_dir / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_changed_model_file_is_refused_by_its_sha256(model_dir: Path) -> None:
    with (model_dir / "model.fp32.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="sha256 mismatch") as err:
        OnnxImageClassifier.load(model_dir)
    assert err.value.reason == "sha256"


def test_a_model_prepared_by_another_preprocessing_version_is_refused(model_dir: Path) -> None:
    spec = {**ImageSpec(SIZE).to_dict(), "version": 99}
    _edit_manifest(model_dir, feature_spec=spec, feature_spec_hash="0" * 64)
    with pytest.raises(ModelError, match="not computed by this agent") as err:
        OnnxImageClassifier.load(model_dir)
    assert err.value.reason == "feature_spec"


def test_a_manifest_whose_input_size_differs_from_its_spec_is_refused(model_dir: Path) -> None:
    _edit_manifest(model_dir, inputs=[{"name": "image", "shape": ["batch", 1, 32, 32], "dtype": "float32"}])
    with pytest.raises(ModelError, match=r"feature_spec\.size") as err:
        OnnxImageClassifier.load(model_dir)
    assert err.value.reason == "shape"


def test_an_image_model_is_refused_as_another_kind_and_another_kind_as_an_image_model(model_dir: Path) -> None:
    with pytest.raises(ModelError, match="used here as 'anomaly'"):
        Manifest.load(model_dir, "anomaly")
    manifest = Manifest.load(model_dir)
    with pytest.raises(ModelError, match="not a 'image-classifier'"):
        OnnxImageClassifier(Manifest.load(Path("models/defect_classifier")), Path("models/defect_classifier"))
    assert manifest.task == "image-classifier"


# --- the shipped model ---------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "surface_defect"


def test_the_shipped_image_model_loads_as_its_registered_kind_and_is_well_under_a_megabyte() -> None:
    model = model_class("image-classifier").load(SHIPPED)
    assert isinstance(model, OnnxImageClassifier)
    assert model.classes == CLASS_NAMES
    # The bound is on the INT8 file (well under 1 MB); the FP32 parent stays under 1 MB too.
    assert (SHIPPED / "model.int8.onnx").stat().st_size < 512 * 1024
    assert (SHIPPED / "model.fp32.onnx").stat().st_size < 1024 * 1024
    assert model.manifest.quantization["recipe"]["per_channel"] is True
    assert model.manifest.quantization["shipped_file"] == model.manifest.file


def test_the_shipped_card_is_what_the_card_writer_makes_from_the_manifest() -> None:
    manifest = Manifest.load(SHIPPED)
    assert (SHIPPED / CARD_FILE).read_text(encoding="utf-8") == render_card(manifest)


@pytest.mark.parametrize("name", ["patches", "scratches"])
def test_the_shipped_model_recognises_the_generated_classes_the_demo_publishes(name: str) -> None:
    model = OnnxImageClassifier.load(SHIPPED)
    index, _ = model.classify(model.prepare([synth.generate(name, seed) for seed in range(20)]))
    assert [model.classes[i] for i in index] == [name] * 20


def test_the_model_registry_serves_an_image_model_and_swaps_in_a_new_version(tmp_path: Path) -> None:
    from agent.inference.registry import ModelRegistry
    from agent.metrics import Metrics

    models = tmp_path / "models"
    net = Cnn.init((4, 8), len(CLASSES), seed=3)
    write_model_dir(net.to_onnx(SIZE, CLASSES), models / "v1", ImageSpec(SIZE), CLASSES, model_id="cam")
    registry = ModelRegistry(models, Metrics())
    slot = registry.track("cam", "image-classifier")
    assert isinstance(slot.model, OnnxImageClassifier) and slot.model.version == "1.0.0"
    # A new version with another input size: images are not windowed, so it is swapped in without a restart.
    net2 = Cnn.init((4, 8), len(CLASSES), seed=4)
    write_model_dir(
        net2.to_onnx(2 * SIZE, CLASSES), models / "v2", ImageSpec(2 * SIZE), CLASSES, model_id="cam", version="1.1.0"
    )
    registry.refresh()
    assert slot.model.version == "1.1.0" and slot.model.input_size == 2 * SIZE
    index, _ = slot.model.classify(slot.model.prepare([frame(1)]))
    assert index.shape == (1,)
