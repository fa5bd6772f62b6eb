"""Block-wise weight-only quantization of a dense layer: round-to-nearest and GPTQ, in numpy.

Our layers compute ``Y = X @ W`` with ``W`` of shape ``(K, N)`` (K inputs, N outputs), which is the
transpose of the ``(out, in)`` weight of the GPTQ paper (Frantar et al. 2022): the paper's *column* ``k``
is our *row* ``k``. Quantization is asymmetric, per output column, in blocks of ``block_size`` rows
along K, because that is the layout of ONNX Runtime's ``MatMulNBits`` (see ``nbits.py``)::

    W[k, n] ≈ (codes[k, n] - zero_points[k // block_size, n]) * scales[k // block_size, n]

GPTQ quantizes one row at a time and spreads its rounding error over the rows not yet quantized, weighted
by the inverse Hessian ``H = 2/n · XᵀX`` of the layer's calibration inputs, so that ``X @ W_q`` stays close
to ``X @ W`` even where each weight on its own moves by up to half a quantization step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_BLOCK_SIZE = 16  # MatMulNBits' smallest block; blocks are powers of two
BITS_RANGE = (2, 8)


@dataclass(frozen=True)
class BlockQuantized:
    """Weight-only block quantization of a (K, N) weight used as Y = X @ W; blocks run along K per column.

    ``codes`` is uint8 ``(K_padded, N)`` with ``K_padded = n_blocks * block_size``; rows beyond ``k`` are
    padding and hold the block's zero point, so they dequantize to exactly 0. ``scales`` is float32
    ``(n_blocks, N)``, ``zero_points`` uint8 ``(n_blocks, N)``, codes and zero points in ``[0, 2**bits - 1]``.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    k: int

    def __post_init__(self) -> None:
        check_bits_and_block_size(self.bits, self.block_size)
        n_blocks = -(-self.k // self.block_size)
        if self.codes.dtype != np.uint8 or self.codes.ndim != 2 or self.codes.shape[0] != n_blocks * self.block_size:
            raise ValueError(
                f"codes must be uint8 (n_blocks * block_size = {n_blocks * self.block_size}, N), "
                f"got {self.codes.dtype} {self.codes.shape}"
            )
        n = self.codes.shape[1]
        if self.scales.dtype != np.float32 or self.scales.shape != (n_blocks, n):
            raise ValueError(f"scales must be float32 {(n_blocks, n)}, got {self.scales.dtype} {self.scales.shape}")
        if self.zero_points.dtype != np.uint8 or self.zero_points.shape != (n_blocks, n):
            raise ValueError(
                f"zero_points must be uint8 {(n_blocks, n)}, got {self.zero_points.dtype} {self.zero_points.shape}"
            )
        maxq = 2**self.bits - 1
        if self.codes.max(initial=0) > maxq or self.zero_points.max(initial=0) > maxq:
            raise ValueError(f"codes and zero points must be in [0, {maxq}] for {self.bits} bits")

    @property
    def n(self) -> int:
        """Number of output columns N."""
        return int(self.codes.shape[1])

    @property
    def n_blocks(self) -> int:
        """Blocks per column, ``ceil(k / block_size)``."""
        return int(self.scales.shape[0])

    def dequantize(self) -> np.ndarray:
        """The float32 ``(k, N)`` weight the codes stand for: ``(codes - zero_point) * scale`` per block."""
        codes = self.codes.reshape(self.n_blocks, self.block_size, self.n).astype(np.float32)
        zero = self.zero_points.astype(np.float32)[:, None, :]
        w = (codes - zero) * self.scales[:, None, :]
        return w.reshape(-1, self.n)[: self.k]


def check_bits_and_block_size(bits: int, block_size: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is in 2..8 and ``block_size`` a power of two >= 16 (MatMulNBits)."""
    if not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
        raise ValueError(f"bits must be in {BITS_RANGE[0]}..{BITS_RANGE[1]}, got {bits}")
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= {MIN_BLOCK_SIZE} (MatMulNBits), got {block_size}")


def hessian(x: np.ndarray) -> np.ndarray:
    """``2/n · XᵀX`` in float64 for calibration inputs ``x`` (n, K): the Hessian of the layer's squared error.

    >>> hessian(np.array([[1.0, 2.0], [3.0, 0.0]]))
    array([[10.,  2.],
           [ 2.,  4.]])
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"calibration inputs must be a non-empty (n, K) array, got shape {x.shape}")
    return 2.0 / len(x) * (x.T @ x)


def output_error(x: np.ndarray, w: np.ndarray, quantized: BlockQuantized) -> float:
    """``||X W - X W_q||_F``: how far the layer's outputs on ``x`` (n, K) move when ``w`` is quantized."""
    x64 = np.asarray(x, dtype=np.float64)
    return float(np.linalg.norm(x64 @ np.asarray(w, np.float64) - x64 @ quantized.dequantize().astype(np.float64)))


def rtn_quantize(w: np.ndarray, bits: int = 4, block_size: int = 32) -> BlockQuantized:
    """Round-to-nearest: each block's asymmetric min/max grid, each weight rounded on its own."""
    w64 = _check_weight(w)
    check_bits_and_block_size(bits, block_size)
    grids = _Grids.empty(w64.shape, bits, block_size)
    codes = np.empty_like(w64)
    for b in range(grids.n_blocks):
        rows = slice(b * block_size, (b + 1) * block_size)
        grids.fit(b, w64[rows])
        codes[rows] = grids.codes(b, w64[rows])
    return grids.assemble(codes)


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    damp: float = 0.01,
    act_order: bool = False,
    lazy_batch: int = 128,
) -> BlockQuantized:
    """GPTQ of ``w`` (K, N) given the Hessian ``h`` (K, K) of its inputs (see ``hessian``).

    Rows are quantized in order (or, with ``act_order``, in decreasing ``diag(H)``, the inputs with the
    most energy first) and each row's error is spread over the rows still to come through the upper Cholesky
    factor of ``H⁻¹``. ``damp · mean(diag(H))`` is added to the diagonal so that the inverse exists and the
    updates stay moderate; inputs that never fire (``H_kk == 0``) get ``H_kk = 1`` and a zero weight row.

    Without ``act_order`` a block's grid is fitted when its first row comes up, to the weights as updated
    by the errors of all earlier rows (as the reference implementation does). With ``act_order`` the rows of
    one block are no longer quantized together, so the grids are fitted to the original ``w`` beforehand
    ("static groups") and kept fixed; the blocks stay contiguous in the original row order, which is what
    MatMulNBits needs. ``lazy_batch`` rows are updated together before the rest of the matrix (the paper's
    lazy batch update); it is rounded up to a multiple of ``block_size`` so a block never straddles two
    batches and every grid sees all earlier updates: the result does not depend on it beyond float rounding.
    """
    w64 = _check_weight(w)
    check_bits_and_block_size(bits, block_size)
    k = len(w64)
    h64 = np.array(h, dtype=np.float64)
    if h64.shape != (k, k) or not np.isfinite(h64).all():
        raise ValueError(
            f"Hessian must be a finite ({k}, {k}) array for a weight of shape {w64.shape}, got {h64.shape}"
        )
    if damp < 0 or lazy_batch < 1:
        raise ValueError(f"damp must be >= 0 and lazy_batch >= 1, got damp={damp}, lazy_batch={lazy_batch}")

    dead = np.diag(h64) == 0
    h64[dead, dead] = 1.0
    w64[dead] = 0.0
    grids = _Grids.empty(w64.shape, bits, block_size)
    if act_order:
        for b in range(grids.n_blocks):
            grids.fit(b, w64[b * block_size : (b + 1) * block_size])
        perm = np.argsort(-np.diag(h64), kind="stable")
    else:
        perm = np.arange(k)
    u = inverse_hessian_factor(h64[np.ix_(perm, perm)], damp)
    codes = np.empty_like(w64)
    batch = -(-lazy_batch // block_size) * block_size
    work = w64[perm]
    for start in range(0, k, batch):
        stop = min(start + batch, k)
        errors = _quantize_batch(work, u, perm, range(start, stop), codes, grids, fit=not act_order)
        work[stop:] -= u[start:stop, stop:].T @ errors
    return grids.assemble(codes)


def inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp·mean(diag H)·I)⁻¹`` (``H⁻¹ = UᵀU``), float64.

    Row ``i`` of ``U`` divided by ``U[i, i]`` is how the error of row ``i`` moves the later rows once the
    earlier ones are fixed: the sequential form of the paper's update, computed once.
    """
    damped = h + damp * float(np.mean(np.diag(h))) * np.eye(len(h))
    try:
        lower_inv = np.linalg.inv(np.linalg.cholesky(damped))
        return np.linalg.cholesky(lower_inv.T @ lower_inv).T
    except np.linalg.LinAlgError as exc:
        raise ValueError(
            f"the dampened Hessian is not positive definite (damp={damp}); use more calibration rows or a larger damp"
        ) from exc


def _quantize_batch(
    work: np.ndarray,
    u: np.ndarray,
    perm: np.ndarray,
    batch: range,
    codes: np.ndarray,
    grids: _Grids,
    fit: bool,
) -> np.ndarray:
    """Quantize the ``batch`` positions of ``work`` (its rows are those of the weight in ``perm`` order).

    Fills ``codes`` (original row order) and, if ``fit``, the grid of each block that starts in the batch;
    updates the batch's later rows after each row and returns the scaled errors ``(len(batch), N)``, with
    which the caller updates the rows after the batch.
    """
    start, stop, size = batch.start, batch.stop, grids.block_size
    errors = np.empty((len(batch), work.shape[1]))
    for i in batch:
        row = int(perm[i])
        block = row // size
        if fit and i % size == 0:  # without act_order, perm is the identity and i == row
            grids.fit(block, work[i : i + size])
        codes[row] = grids.codes(block, work[i])
        errors[i - start] = (work[i] - grids.dequantize(block, codes[row])) / u[i, i]
        work[i + 1 : stop] -= np.outer(u[i, i + 1 : stop], errors[i - start])
    return errors


@dataclass(frozen=True)
class _Grids:
    """Per-block grids of one weight being quantized: float64 ``scales`` and ``zeros`` ``(n_blocks, N)``."""

    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    block_size: int

    @classmethod
    def empty(cls, shape: tuple[int, ...], bits: int, block_size: int) -> _Grids:
        """Grids for a ``shape`` (K, N) weight, to be filled by ``fit`` block by block."""
        n_blocks = -(-shape[0] // block_size)
        return cls(np.empty((n_blocks, shape[1])), np.empty((n_blocks, shape[1])), bits, block_size)

    @property
    def n_blocks(self) -> int:
        return len(self.scales)

    def fit(self, block: int, rows: np.ndarray) -> None:
        """Set the grid of ``block`` to the asymmetric min/max grid of ``rows`` (m, N)."""
        self.scales[block], self.zeros[block] = block_grid(rows, self.bits)

    def codes(self, block: int, values: np.ndarray) -> np.ndarray:
        """Codes (float64, integral) of ``values`` (rows of ``block``) on that block's grid."""
        return quantize_rows(values, self.scales[block], self.zeros[block], self.bits)

    def dequantize(self, block: int, codes: np.ndarray) -> np.ndarray:
        return (codes - self.zeros[block]) * self.scales[block]

    def assemble(self, codes: np.ndarray) -> BlockQuantized:
        """``BlockQuantized`` of float64 ``codes`` (k, N) on these grids, padding rows set to the zero point."""
        k = len(codes)
        padded = np.repeat(self.zeros, self.block_size, axis=0)
        padded[:k] = codes
        return BlockQuantized(
            codes=padded.astype(np.uint8),
            scales=self.scales.astype(np.float32),
            zero_points=self.zeros.astype(np.uint8),
            bits=self.bits,
            block_size=self.block_size,
            k=k,
        )


def block_grid(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric grid of one block ``rows`` (m, N): per-column (scale, zero point), both float64.

    The range always includes 0 so that zero is exactly representable and the zero point is a valid code; an
    all-zero column gets the range [-1, 1] (any grid maps it to 0). The scale is rounded to float32 first
    because that is the scale that will be stored, so the codes are the nearest ones on the stored grid.
    """
    maxq = 2**bits - 1
    lo = np.minimum(rows.min(axis=0), 0.0)
    hi = np.maximum(rows.max(axis=0), 0.0)
    flat = (lo == 0) & (hi == 0)
    lo, hi = np.where(flat, -1.0, lo), np.where(flat, 1.0, hi)
    scale = ((hi - lo) / maxq).astype(np.float32).astype(np.float64)
    scale = np.where(scale > 0, scale, 1.0)  # a range below float32's smallest step
    zero = np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero


def quantize_rows(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Codes (float64, integral) of ``rows`` on the grid ``(scale, zero)``: round, shift, clip to the range."""
    return np.clip(np.round(rows / scale) + zero, 0, 2**bits - 1)


def _check_weight(w: np.ndarray) -> np.ndarray:
    """A float64 copy of ``w``, which must be a finite, non-empty 2-D array."""
    w64 = np.array(w, dtype=np.float64)
    if w64.ndim != 2 or w64.size == 0 or not np.isfinite(w64).all():
        raise ValueError(f"weight must be a finite, non-empty (K, N) array, got shape {w64.shape}")
    return w64
