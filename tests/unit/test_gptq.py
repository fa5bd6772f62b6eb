"""GPTQ and round-to-nearest block quantization in numpy: the grid, the error propagation, the invariants."""

from __future__ import annotations

import numpy as np
import pytest

from pdm_tools.quantization import BlockQuantized, gptq_quantize, hessian, output_error, rtn_quantize
from pdm_tools.quantization.gptq import block_grid, quantize_rows


def correlated_inputs(n: int, k: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """Rows X = Z @ M (random mixing M), columns scaled by up to ``spread``: the inputs GPTQ is made for."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)) @ rng.standard_normal((k, k))
    return x * rng.uniform(1.0 / spread, spread, k)


def naive_gptq(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, damp: float) -> np.ndarray:
    """Codes from the textbook optimal-brain-quantization recurrence: explicit H⁻¹, shrunk after every row."""
    w = w.astype(np.float64).copy()
    hinv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(len(h)))
    codes = np.empty_like(w)
    for i in range(len(w)):
        if i % block_size == 0:
            scale, zero = block_grid(w[i : i + block_size], bits)
        codes[i] = quantize_rows(w[i], scale, zero, bits)
        error = w[i] - (codes[i] - zero) * scale
        w[i + 1 :] -= np.outer(hinv[i + 1 :, i] / hinv[i, i], error)
        hinv -= np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes


def assert_same_quantization(a: BlockQuantized, b: BlockQuantized) -> None:
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.zero_points, b.zero_points)


def test_hessian_is_two_over_n_xtx_in_float64() -> None:
    x = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [3.0, 0.0, 2.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    expected = np.array([[11.0, 3.0, 7.0], [3.0, 6.0, 0.0], [7.0, 0.0, 6.0]]) * 2 / 4
    h = hessian(x)
    assert h.dtype == np.float64
    np.testing.assert_array_equal(h, expected)


def test_hessian_rejects_empty_or_non_matrix_inputs() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        hessian(np.empty((0, 3)))
    with pytest.raises(ValueError, match="non-empty"):
        hessian(np.ones(3))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_codes_are_the_nearest_grid_points_of_each_block(bits: int) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 5)) * rng.uniform(0.1, 5, 5)
    q = rtn_quantize(w, bits=bits, block_size=16)
    step = np.repeat(q.scales, 16, axis=0)[:48]
    assert q.codes.max() <= 2**bits - 1
    # Every weight inside its block's [min, max] (0 included) is within half a step of its dequantized value.
    assert np.all(np.abs(q.dequantize() - w) <= step / 2 * (1 + 1e-6))
    for b in range(3):
        block = w[16 * b : 16 * (b + 1)]
        lo, hi = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
        np.testing.assert_allclose(q.scales[b], (hi - lo) / (2**bits - 1), rtol=1e-6)
        np.testing.assert_array_equal(q.zero_points[b], np.round(-lo / q.scales[b].astype(np.float64)))


def test_dequantize_is_codes_minus_zero_point_times_scale_without_padding() -> None:
    codes = np.arange(32 * 2, dtype=np.uint8).reshape(32, 2) % 16
    q = BlockQuantized(
        codes=codes,
        scales=np.array([[0.5, 2.0], [0.25, 1.0]], dtype=np.float32),
        zero_points=np.array([[8, 3], [0, 15]], dtype=np.uint8),
        bits=4,
        block_size=16,
        k=20,
    )
    expected = np.concatenate([(codes[:16] - [8.0, 3.0]) * [0.5, 2.0], (codes[16:20] - [0.0, 15.0]) * [0.25, 1.0]])
    w = q.dequantize()
    assert w.dtype == np.float32 and w.shape == (20, 2)
    np.testing.assert_array_equal(w, expected)


def test_quantizing_a_dequantized_weight_gives_back_the_same_codes() -> None:
    rng = np.random.default_rng(2)
    q = rtn_quantize(rng.standard_normal((64, 6)), block_size=32)
    again = rtn_quantize(q.dequantize(), block_size=32)
    np.testing.assert_array_equal(again.dequantize(), q.dequantize())


def test_padding_rows_hold_the_zero_point_and_are_dropped_by_dequantize() -> None:
    rng = np.random.default_rng(3)
    q = rtn_quantize(rng.standard_normal((40, 3)), block_size=32)
    assert q.codes.shape == (64, 3) and q.n_blocks == 2 and q.k == 40
    np.testing.assert_array_equal(q.codes[40:], np.repeat(q.zero_points[1:], 24, axis=0))
    assert q.dequantize().shape == (40, 3)


@pytest.mark.parametrize(("k", "block_size"), [(64, 32), (70, 32), (50, 16), (64, 64)])
def test_gptq_with_identity_hessian_equals_round_to_nearest(k: int, block_size: int) -> None:
    w = np.random.default_rng(k).standard_normal((k, 9))
    gptq = gptq_quantize(w, np.eye(k), block_size=block_size, damp=1e-6)
    assert_same_quantization(gptq, rtn_quantize(w, block_size=block_size))


def test_gptq_act_order_with_diagonal_hessian_equals_round_to_nearest_in_original_order() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((70, 5))
    h = np.diag(rng.uniform(0.1, 10.0, 70))  # a real permutation, but nothing to propagate
    gptq = gptq_quantize(w, h, block_size=16, act_order=True)
    assert_same_quantization(gptq, rtn_quantize(w, block_size=16))


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_gptq_matches_the_textbook_recurrence(block_size: int) -> None:
    x = correlated_inputs(3000, 100, seed=5, spread=3.0)
    w = np.random.default_rng(6).standard_normal((100, 12))
    h = hessian(x)
    expected = naive_gptq(w, h, bits=4, block_size=block_size, damp=0.01)
    np.testing.assert_array_equal(gptq_quantize(w, h, block_size=block_size).codes[:100], expected)


def test_gptq_result_does_not_depend_on_the_lazy_batch() -> None:
    x = correlated_inputs(2000, 96, seed=7)
    w = np.random.default_rng(8).standard_normal((96, 16))
    h = hessian(x)
    results = [gptq_quantize(w, h, lazy_batch=batch) for batch in (1, 32, 40, 128)]
    for other in results[1:]:
        assert_same_quantization(results[0], other)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_clearly_below_round_to_nearest_on_correlated_inputs(act_order: bool) -> None:
    x = correlated_inputs(4000, 128, seed=9, spread=2.0)
    w = np.random.default_rng(10).standard_normal((128, 64))
    gptq = gptq_quantize(w, hessian(x), act_order=act_order)
    ratio = output_error(x, w, gptq) / output_error(x, w, rtn_quantize(w))
    assert ratio < 0.9


def test_act_order_beats_natural_order_when_input_scales_differ() -> None:
    x = correlated_inputs(3000, 100, seed=5, spread=3.0)
    w = np.random.default_rng(6).standard_normal((100, 24))
    h = hessian(x)
    natural = output_error(x, w, gptq_quantize(w, h))
    ordered = output_error(x, w, gptq_quantize(w, h, act_order=True))
    assert ordered < natural


def test_dead_inputs_get_zero_weights_and_no_nans() -> None:
    x = correlated_inputs(500, 32, seed=11)
    x[:, [3, 17]] = 0.0
    w = np.random.default_rng(12).standard_normal((32, 4))
    for act_order in (False, True):
        deq = gptq_quantize(w, hessian(x), block_size=16, act_order=act_order).dequantize()
        assert np.isfinite(deq).all()
        np.testing.assert_array_equal(deq[[3, 17]], 0.0)


def test_all_zero_block_quantizes_to_zero() -> None:
    w = np.zeros((32, 3))
    w[16:, 1] = [0.5] * 16
    np.testing.assert_array_equal(rtn_quantize(w, block_size=16).dequantize(), w)


@pytest.mark.parametrize("block_size", [0, 8, 24, 48, 100])
def test_block_size_must_be_a_power_of_two_of_at_least_16(block_size: int) -> None:
    w = np.ones((64, 2))
    with pytest.raises(ValueError, match="power of two >= 16"):
        rtn_quantize(w, block_size=block_size)
    with pytest.raises(ValueError, match="power of two >= 16"):
        gptq_quantize(w, np.eye(64), block_size=block_size)


@pytest.mark.parametrize("bits", [0, 1, 9])
def test_bits_outside_2_to_8_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match=r"bits must be in 2\.\.8"):
        rtn_quantize(np.ones((32, 2)), bits=bits)


def test_gptq_rejects_a_hessian_of_the_wrong_shape_and_a_singular_undampened_one() -> None:
    w = np.ones((32, 2))
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        gptq_quantize(w, np.eye(31))
    x = np.random.default_rng(13).standard_normal((10, 32))  # rank 10 < 32, no dead inputs
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, hessian(x), damp=0.0)


def test_block_quantized_checks_its_shapes() -> None:
    with pytest.raises(ValueError, match="codes must be uint8"):
        BlockQuantized(
            codes=np.zeros((20, 2), np.uint8),
            scales=np.ones((2, 2), np.float32),
            zero_points=np.zeros((2, 2), np.uint8),
            bits=4,
            block_size=16,
            k=20,
        )
