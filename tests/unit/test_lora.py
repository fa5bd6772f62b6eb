"""LoRA in numpy (``agent.adaptation.lora``) and the adaptable base graph (``agent.adaptation.graph``).

Small generated fixtures only: tiny MLPs built directly or fitted on synthetic blobs in a few seconds.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.adaptation.graph import adapter_parameters, build_adaptable, merge
from agent.adaptation.lora import BaseMlp, LoraConfig, LoraWeights, loss_and_gradients, train_lora
from agent.adaptation.runtime import open_model
from pdm_tools.models import defect_mlp, export
from pdm_tools.models.autoencoder import Autoencoder, AutoencoderConfig, fit_autoencoder
from pdm_tools.models.defect_mlp import DefectMlp, MlpConfig, fit_mlp


def random_classifier(seed: int = 0, sizes: tuple[int, ...] = (5, 7, 6, 3)) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = tuple(rng.normal(0, 0.7, (a, b)).astype(np.float32) for a, b in itertools.pairwise(sizes))
    biases = tuple(rng.normal(0, 0.1, b).astype(np.float32) for b in sizes[1:])
    mlp = DefectMlp(
        mean=rng.normal(size=sizes[0]).astype(np.float32),
        scale=rng.uniform(0.5, 2.0, sizes[0]).astype(np.float32),
        weights=weights,
        biases=biases,
        class_names=tuple(f"c{i}" for i in range(sizes[-1])),
    )
    return defect_mlp.build_onnx(mlp)


def random_autoencoder(seed: int = 0, sizes: tuple[int, ...] = (6, 5, 3, 5, 6)) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    ae = Autoencoder(
        mean=rng.normal(size=sizes[0]).astype(np.float32),
        scale=rng.uniform(0.5, 2.0, sizes[0]).astype(np.float32),
        weights=tuple(rng.normal(0, 0.6, (a, b)).astype(np.float32) for a, b in itertools.pairwise(sizes)),
        biases=tuple(rng.normal(0, 0.1, b).astype(np.float32) for b in sizes[1:]),
    )
    return export.build_onnx(ae)


def with_random_b(weights: LoraWeights, seed: int, size: float = 0.3) -> LoraWeights:
    rng = np.random.default_rng(seed)
    factors = {k: (a, rng.normal(0, size, b.shape).astype(np.float32)) for k, (a, b) in weights.factors.items()}
    return LoraWeights(weights.rank, weights.alpha, factors)


def blobs(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(len(centres)), n)
    x = centres[y] + rng.normal(0, spread, (len(y), centres.shape[1]))
    return x.astype(np.float32), y


def test_b_starts_at_zero_so_the_adapted_model_is_the_base() -> None:
    base = BaseMlp.from_onnx(random_classifier())
    lora = LoraWeights.initial(base, base.layer_names, rank=2, alpha=4.0, seed=1)
    assert all(not b.any() and a.any() for a, b in lora.factors.values())
    x = np.random.default_rng(2).normal(size=(20, base.n_features))
    assert np.array_equal(base.output(x, lora), base.output(x))


@pytest.mark.parametrize("build", [random_classifier, random_autoencoder])
def test_lora_gradients_match_finite_differences(build) -> None:
    base = BaseMlp.from_onnx(build())
    lora = with_random_b(LoraWeights.initial(base, base.layer_names, rank=2, alpha=3.0, seed=3), seed=4)
    lora = LoraWeights(
        lora.rank, lora.alpha, {k: (a.astype(np.float64), b.astype(np.float64)) for k, (a, b) in lora.factors.items()}
    )
    rng = np.random.default_rng(5)
    z = rng.normal(size=(9, base.n_features))
    y = rng.integers(0, base.layers[-1].fan_out, 9) if base.kind == "classifier" else None
    weight = np.array([0.5, 2.0, 1.0]) if base.kind == "classifier" else None
    _, grads = loss_and_gradients(base, lora, z, y, weight)
    params = [p for name in lora.layers for p in lora.factors[name]]
    eps = 1e-6
    for p, g in zip(params, grads, strict=True):
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            up = loss_and_gradients(base, lora, z, y, weight, need_gradients=False)[0]
            p[idx] = old - eps
            down = loss_and_gradients(base, lora, z, y, weight, need_gradients=False)[0]
            p[idx] = old
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-8)


def test_training_on_a_shifted_machine_recovers_classifier_accuracy() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[2.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]])
    x, y = blobs(rng, centres, 150)
    mlp = fit_mlp(x, y, ("a", "b", "c"), seed=0, config=MlpConfig(hidden=(16, 8), alpha=1e-3, max_iter=400))
    base = BaseMlp.from_onnx(defect_mlp.build_onnx(mlp))
    # The machine: every class moved and rotated (a new sensor position, say).
    shifted = np.roll(centres, 1, axis=1) * 1.2 + np.array([0.0, 0, 0, 1.5, -1.5, 0])
    x_new, y_new = blobs(rng, shifted, 60)
    x_test, y_test = blobs(rng, shifted, 200)
    before = float(np.mean(base.predict(x_test) == y_test))
    lora, report = train_lora(base, x_new, y_new, seed=0, config=LoraConfig(rank=2, alpha=4.0), measure_memory=True)
    after = float(np.mean(base.predict(x_test, lora) == y_test))
    assert before < 0.7
    assert after > 0.9
    assert report.val_loss_after < report.val_loss_before
    assert report.peak_memory_bytes > 0


def test_training_is_deterministic_for_a_seed() -> None:
    base = BaseMlp.from_onnx(random_classifier())
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, base.n_features)), rng.integers(0, 3, 60)
    config = LoraConfig(rank=2, max_epochs=15)
    one, _ = train_lora(base, x, y, seed=7, config=config)
    two, _ = train_lora(base, x, y, seed=7, config=config, measure_memory=True)
    assert all(np.array_equal(one.factors[k][i], two.factors[k][i]) for k in one.factors for i in (0, 1))


def test_training_lowers_reconstruction_error_on_a_new_machines_normal_data() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(3, 8))
    fleet = rng.normal(size=(1200, 3)) @ mixing + 0.05 * rng.normal(size=(1200, 8))
    ae, _ = fit_autoencoder(fleet[:1000], fleet[1000:], seed=0, config=AutoencoderConfig(hidden=(8, 3, 8)))
    base = BaseMlp.from_onnx(export.build_onnx(ae))
    # The machine's normal: another correlation structure between the same sensors.
    own = rng.normal(size=(400, 3)) @ (mixing + 0.8 * rng.normal(size=(3, 8))) + 0.05 * rng.normal(size=(400, 8))
    lora, report = train_lora(base, own[:320], seed=0, x_val=own[320:], config=LoraConfig(rank=2))
    assert report.val_loss_after < 0.7 * report.val_loss_before
    assert np.mean(base.score(own[320:], lora)) < np.mean(base.score(own[320:]))


def _bits(outputs: list[np.ndarray]) -> list[bytes]:
    return [np.ascontiguousarray(o).tobytes() for o in outputs]


def _probe_rows(base: BaseMlp, rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, base.n_features)) * base.scale * 3 + base.mean
    x[0] = base.mean  # z = 0 exactly: every first-layer output is its bias
    x[1] = -0.0
    return x.astype(np.float32)


@pytest.mark.parametrize("build", [random_classifier, random_autoencoder])
def test_unadapted_path_of_the_adaptable_base_is_bit_for_bit_the_original(build) -> None:
    proto = build()
    base = BaseMlp.from_onnx(proto)
    original, adaptable = open_model(proto), open_model(build_adaptable(proto))
    rng = np.random.default_rng(0)
    for batch in (1, 2, 32, 257):
        x = _probe_rows(base, rng, max(batch, 2))[:batch]
        assert _bits(adaptable.run(None, {"features": x})) == _bits(original.run(None, {"features": x}))


def test_unadapted_path_is_bit_for_bit_on_an_int8_qdq_base(tmp_path: Path) -> None:
    from pdm_tools.quantization import static as q
    from pdm_tools.quantization.static import quantize_classifier

    proto = random_classifier(seed=3, sizes=(8, 16, 8, 3))
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    fp32.write_bytes(proto.SerializeToString())
    base = BaseMlp.from_onnx(proto)
    rng = np.random.default_rng(1)
    quantize_classifier(fp32, int8, _probe_rows(base, rng, 200), q.QuantizeConfig())
    qproto = onnx.load(str(int8))
    qbase = BaseMlp.from_onnx(qproto)
    assert qbase.quantized and qbase.layer_names == base.layer_names
    adaptable = build_adaptable(qproto)
    # The branch reads the float (dequantized) activation that the base MatMul multiplies.
    producers = {o: n for n in adaptable.graph.node for o in n.output}
    for node in adaptable.graph.node:
        if node.name.endswith(".matmul_a"):
            assert producers[node.input[0]].op_type in ("DequantizeLinear", "Div")
    original, shared = open_model(qproto), open_model(adaptable)
    for batch in (1, 32):
        x = _probe_rows(base, rng, 32)[:batch]
        assert _bits(shared.run(None, {"features": x})) == _bits(original.run(None, {"features": x}))


def test_graph_branch_and_merge_reproduce_the_numpy_adapter() -> None:
    proto = random_classifier()
    base = BaseMlp.from_onnx(proto)
    lora = with_random_b(LoraWeights.initial(base, ("layer0_matmul", "layer2_matmul"), 3, 6.0, seed=2), seed=3)
    x = np.random.default_rng(4).normal(size=(16, base.n_features)).astype(np.float32)
    adaptable = open_model(build_adaptable(proto, ["layer0_matmul", "layer2_matmul"]))
    feeds = {"features": x, **adapter_parameters(lora)}
    reference = base.predict_proba(x, lora)
    np.testing.assert_allclose(adaptable.run(["probabilities"], feeds)[0], reference, atol=1e-5)
    merged = open_model(merge(proto, lora))
    np.testing.assert_allclose(merged.run(["probabilities"], {"features": x})[0], reference, atol=1e-5)


def test_unknown_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="no adaptable MatMul"):
        build_adaptable(random_classifier(), ["layer9_matmul"])


def test_a_layer_with_a_negative_zero_bias_gets_the_explicit_exact_branch() -> None:
    proto = random_classifier(seed=5)
    bias = next(t for t in proto.graph.initializer if t.name == "layer1.bias")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[:3] = -0.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, "layer1.bias"))
    adaptable = build_adaptable(proto)
    ops = {node.name: node.op_type for node in adaptable.graph.node}
    assert ops["lora.layer0_matmul.gemm_b"] == "Gemm"  # fused: its bias has no -0.0
    assert ops["lora.layer1_matmul.negate"] == "Sub"  # explicit: y - (0 - t)
    base = BaseMlp.from_onnx(proto)
    x = _probe_rows(base, np.random.default_rng(3), 64)
    original, shared = open_model(proto), open_model(adaptable)
    assert _bits(shared.run(None, {"features": x})) == _bits(original.run(None, {"features": x}))
