"""The surface-defect training path without the dataset: gradients, export, split, synthetic images, the
one-command build (train -> ONNX -> INT8 -> gate -> manifest) and ``evaluate neu`` on generated files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from agent.images.codec import decode_image
from agent.images.preprocess import prepare
from agent.inference.image import OnnxImageClassifier
from pdm_tools.datasets.neu import CLASS_NAMES, DatasetError, load_images, stratified_split
from pdm_tools.evaluation import neu as evaluate_neu
from pdm_tools.evaluation.cli import add_arguments as evaluate_arguments
from pdm_tools.images import synth
from pdm_tools.images.cnn import Cnn
from pdm_tools.images.export import FP32_FILE, INT8_FILE
from pdm_tools.images.measure import bare_throughput
from pdm_tools.images.train import STEM_CONFIG, TrainConfig, train_surface_cnn
from pdm_tools.training.surface_defect import build_surface_defect

TINY = TrainConfig(size=32, channels=(4, 8), epochs=2, batch_size=16, seed=7)


@pytest.mark.parametrize("space_to_depth", [1, 2])
def test_backward_pass_matches_finite_differences_for_every_parameter(space_to_depth: int) -> None:
    net = Cnn.init((3, 4), 3, seed=0, space_to_depth=space_to_depth)
    rng = np.random.default_rng(1)
    for k in net.params:  # float64 and non-trivial batch-norm parameters, so differences are exact enough
        net.params[k] = net.params[k].astype(np.float64) + 0.1 * rng.standard_normal(net.params[k].shape)
    x, y = rng.standard_normal((3, 1, 8, 8)), np.array([0, 2, 1])
    _, grads = net.loss_and_grads(x, y, weight_decay=1e-2)
    for name, p in net.params.items():
        idx = tuple(int(rng.integers(0, s)) for s in p.shape)
        old = p[idx]
        p[idx] = old + 1e-5
        plus, _ = net.loss_and_grads(x, y, 1e-2)
        p[idx] = old - 1e-5
        minus, _ = net.loss_and_grads(x, y, 1e-2)
        p[idx] = old
        assert (plus - minus) / 2e-5 == pytest.approx(float(grads[name][idx]), rel=1e-3, abs=1e-6), name


@pytest.mark.parametrize("space_to_depth", [1, 4])
def test_the_export_folds_batch_norm_and_gives_the_numpy_inference_probabilities(
    tmp_path: Path, space_to_depth: int
) -> None:
    import onnxruntime as ort

    net = Cnn.init((4, 8), 3, seed=2, space_to_depth=space_to_depth)
    side = 4 * net.reduction  # a 4 x 4 last feature map: the pools and the stem's channel order both matter
    rng = np.random.default_rng(3)
    net.loss_and_grads(rng.standard_normal((8, 1, side, side)), rng.integers(0, 3, 8))  # moves the running stats
    x = rng.standard_normal((5, 1, side, side)).astype(np.float32)
    z = net.logits(x)
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    graph = net.to_onnx(side, ("a", "b", "c"))
    path = tmp_path / "m.onnx"
    path.write_bytes(graph.SerializeToString())
    (probs,) = ort.InferenceSession(str(path)).run(["probs"], {"image": x})
    assert np.allclose(probs, expected, atol=1e-5)
    assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)
    assert any(n.op_type == "SpaceToDepth" for n in graph.graph.node) == (space_to_depth > 1)


def test_the_stem_keeps_the_pixels_of_a_block_together_in_onnx_order() -> None:
    from pdm_tools.images.cnn import _space_to_depth

    img = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
    out = _space_to_depth(img, 4)
    assert out.shape == (2, 2, 2, 16)
    # channel by * 4 + bx of block (i, j) is pixel (4i + by, 4j + bx)
    assert out[1, 1, 0, 2 * 4 + 3] == img[1, 4 + 2, 0 + 3, 0]
    with pytest.raises(ValueError, match="divisible by 32"):
        Cnn.init((4,), 3, seed=0, space_to_depth=16).to_onnx(48, ("a", "b", "c"))
    with pytest.raises(ValueError, match="space_to_depth"):
        Cnn.init((4,), 3, seed=0, space_to_depth=0)


def test_the_stem_design_gives_every_convolution_16_or_more_input_channels() -> None:
    """Why: on an AVX2 CPU without VNNI, a one-channel convolution at full resolution made the INT8 graph
    1.5x slower than FP32 (docs/results_neu.md); the stem is what lets INT8 pay. No timing here: the shape."""
    config = STEM_CONFIG
    graph = Cnn.init(config.channels, 6, 0, config.space_to_depth).to_onnx(config.size, CLASS_NAMES)
    weights = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert convs and all(weights[n.input[1]][1] >= 16 for n in convs)


def test_the_split_is_stratified_disjoint_and_seeded() -> None:
    labels = np.repeat(np.arange(6), 250)
    parts = stratified_split(labels, (0.7, 0.15, 0.15), seed=42)
    assert [len(p) for p in parts] == [1050, 222, 228]
    assert len(np.unique(np.concatenate(parts))) == 1500
    for p in parts:
        counts = np.bincount(labels[p], minlength=6)
        assert counts.max() - counts.min() <= 1
    again = stratified_split(labels, (0.7, 0.15, 0.15), seed=42)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_generated_images_are_seeded_and_decode_through_the_agents_codec() -> None:
    for name in CLASS_NAMES:
        a, b = synth.generate(name, 5), synth.generate(name, 5)
        assert a.shape == (synth.SIZE, synth.SIZE) and a.dtype == np.uint8 and np.array_equal(a, b)
        assert not np.array_equal(a, synth.generate(name, 6))
        for fmt in ("png", "jpeg"):
            decoded = decode_image(synth.encode(a, fmt))
            assert decoded.gray.shape == a.shape and decoded.format == fmt
    with pytest.raises(ValueError, match="unknown class"):
        synth.generate("rust", 1)


def _neu_folder(root: Path, per_class: int) -> Path:
    folder = root / "images"
    folder.mkdir(parents=True)
    for name in CLASS_NAMES:
        for n in range(per_class):
            (folder / f"{name}_{n + 1}.png").write_bytes(synth.encode(synth.generate(name, n)))
    return root


def test_training_is_deterministic_with_a_seed(tmp_path: Path) -> None:
    images = load_images(_neu_folder(tmp_path, 6))
    a = train_surface_cnn(images, len(CLASS_NAMES), TINY)
    b = train_surface_cnn(images, len(CLASS_NAMES), TINY)
    assert all(np.array_equal(a.net.params[k], b.net.params[k]) for k in a.net.params)
    assert set(a.test.files).isdisjoint(a.train.files) and set(a.validation.files).isdisjoint(a.train.files)


def test_the_kept_epoch_is_exported_with_its_own_batch_norm_statistics(tmp_path: Path) -> None:
    """The network handed to the export must be the one validated at the kept epoch: its weights and the
    batch norms' running statistics of that epoch (later epochs' statistics once cost 9 points)."""
    images = load_images(_neu_folder(tmp_path, 6))
    config = TrainConfig(size=32, space_to_depth=4, channels=(4, 8), epochs=4, batch_size=8, learning_rate=0.05, seed=5)
    trained = train_surface_cnn(images, len(CLASS_NAMES), config)
    assert trained.best_epoch < config.epochs  # otherwise later statistics could not differ: not a test
    kept = trained.history[trained.best_epoch - 1]
    logits = trained.net.logits(np.stack([prepare(g, config.size) for g in trained.validation.grays]))
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(logits)), trained.validation.labels].mean())
    assert loss == pytest.approx(kept["val_loss"], rel=1e-6)


def test_one_command_builds_a_model_folder_the_agent_loads_and_evaluate_neu_scores_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _neu_folder(tmp_path / "neu", 6)
    out = tmp_path / "surface_defect"
    summary = build_surface_defect(data, out, TINY)
    assert (out / FP32_FILE).is_file() and (out / INT8_FILE).is_file() and (out / "MODEL_CARD.md").is_file()
    model = OnnxImageClassifier.load(out)
    manifest = model.manifest
    assert model.classes == CLASS_NAMES and model.input_size == TINY.size
    assert manifest.file == summary["file"]
    assert manifest.quantization["gate"]["chosen"] in ("fp32", "int8-static-minmax-channel")
    assert manifest.quantization["recipe"]["per_channel"] is True
    assert manifest.quantization["recipe"]["format"] == "QDQ"
    assert manifest.training["data"]["images"] == {"train": 24, "validation": 6, "test": 6}

    parser = argparse.ArgumentParser()
    evaluate_arguments(parser)
    args = parser.parse_args(["neu", "--data", str(data), "--model-dir", str(out), "--json"])
    assert evaluate_neu.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "macro_f1", "int8_accuracy", "fp32_p50_ms", "int8_p50_ms", "size_bytes", "images"):
        assert key in result
    assert result["images"] == 36 and len(result["confusion"]) == len(CLASS_NAMES)
    assert set(result["fp32_p50_ms"]) == {"batch1", "batch16"}

    rate = bare_throughput(out, [synth.generate("patches", i) for i in range(20)])
    assert rate["images"] == 20 and rate["images_per_s"] > 0


def test_evaluate_neu_without_images_says_so_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    evaluate_arguments(parser)
    args = parser.parse_args(["neu", "--data", str(tmp_path / "nothing")])
    assert evaluate_neu.main(args) == 2
    assert "no such directory" in capsys.readouterr().err


def test_a_file_that_is_not_a_labelled_image_is_named(tmp_path: Path) -> None:
    folder = _neu_folder(tmp_path, 1) / "images"
    (folder / "rust_1.png").write_bytes(synth.encode(synth.generate("patches", 0)))
    with pytest.raises(DatasetError, match=r"rust_1\.png"):
        load_images(tmp_path)
    (folder / "rust_1.png").unlink()
    (folder / "patches_9.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match=r"patches_9\.png"):
        load_images(tmp_path)


def test_train_surface_defect_without_images_is_a_usage_error_and_all_keeps_the_shipped_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pdm_tools.training import cli as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["--model", "surface-defect", "--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert train_cli.main(args) == 2
    assert "no NEU images" in capsys.readouterr().err
    args = parser.parse_args(["--model", "all", "--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert train_cli._train_image_model(args) == (
        0,
        f"no NEU images at {tmp_path / 'none'} (pass --data DIR); models/surface_defect is kept as shipped",
    )


def test_design_latency_quantizes_and_times_each_design_with_random_weights() -> None:
    from pdm_tools.images.designs import Design, measure_designs

    designs = [Design("plain", 1, (4, 8)), Design("stem", 4, (8,)), Design("stem at 64", 4, (8,), 64)]
    records = measure_designs(designs, size=32, runs=2, rounds=1)
    assert [r["design"] for r in records] == ["plain", "stem", "stem at 64"]
    assert [r["size"] for r in records] == [32, 32, 64]
    assert records[1]["parameters"] == Cnn.init((8,), 6, 0, 4).parameter_count
    for r in records:
        assert r["int8_bytes"] > 0
        for b in ("batch1", "batch16"):
            assert r[b]["fp32_p50_ms"] > 0 and r[b]["int8_p50_ms"] > 0
            assert r[b]["ratio"] == pytest.approx(r[b]["int8_p50_ms"] / r[b]["fp32_p50_ms"], abs=1e-3)


def test_the_gamma_augmentation_remaps_levels_monotonically_and_is_off_by_default() -> None:
    from pdm_tools.images.train import _gamma_lut, augment

    assert np.array_equal(_gamma_lut(1.0), np.arange(256, dtype=np.uint8))
    for gamma in (0.8, 1.25):
        lut = _gamma_lut(gamma)
        assert lut[0] == 0 and lut[255] == 255 and bool(np.all(np.diff(lut.astype(int)) >= 0))
    assert _gamma_lut(1.25)[128] < 128 < _gamma_lut(0.8)[128]  # gamma > 1 darkens the mid-tones
    assert TrainConfig().gamma_jitter == 0.0
    gray = synth.generate("patches", 0)
    plain = augment(gray, np.random.default_rng(3), 32)
    assert np.array_equal(plain, augment(gray, np.random.default_rng(3), 32, 0.0))
    lit = augment(gray, np.random.default_rng(3), 32, 0.5)
    assert lit.shape == plain.shape and not np.allclose(lit, plain)
    assert abs(float(lit.mean())) < 1e-4 and float(lit.std()) == pytest.approx(1.0, abs=1e-3)
