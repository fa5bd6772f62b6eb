"""A small convolutional classifier in numpy: forward, backward, Adam, and its export to ONNX.

Why numpy: the project trains its other models without a deep-learning framework, PyTorch's PyPI wheel
pulls gigabytes of CUDA libraries, and JAX CPU is an 86 MB download (jaxlib 82 MB) for what is, at this
size, five 3x3 convolutions. Convolutions are matrix products over ``im2col`` columns (NHWC, so a 3x3
window is nine shifted views concatenated on the channel axis); the backward pass scatters the column
gradients back with the same nine shifts. ``tests/unit/test_image_model_cnn.py`` checks the gradients
against finite differences and the ONNX export against the numpy forward pass.

Architecture (``Cnn``): an optional space-to-depth stem, then ``blocks`` x [conv 3x3 (same padding) ->
batch norm -> ReLU -> max-pool 2x2], global average pool, dense, softmax. Batch norm makes a net this small
train in a few dozen epochs; at export it is folded into the convolution's weights and bias (inference uses
the running statistics), so the graph has no BatchNormalization node. Exported graph: input ``image``
float32 ``(N, 1, S, S)`` (NCHW), output ``probs`` float32 ``(N, C)``, as ``agent.inference.image`` serves it.

Why the space-to-depth stem (``space_to_depth=4``: each 4x4 patch of pixels becomes 16 channels of one
position, ONNX ``SpaceToDepth``, no weights): on an AVX2 CPU without VNNI, ONNX Runtime's INT8 convolution
beats the FP32 one only when it has enough input channels to multiply; a first convolution over one
channel at full resolution was 8x slower in INT8 than in FP32 (558 against 72 us) and made the whole INT8
model 1.5x slower. With the stem every convolution sees at least 16 input channels at a quarter of the
side, and the INT8 graph runs in about half the FP32 time (docs/results_neu.md has the measured designs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
_BN_EPS = 1e-5
_MOMENTUM = 0.1  # weight of the newest batch in the running batch-norm statistics
Params = dict[str, np.ndarray]


@dataclass
class Cnn:
    """Weights: ``w{i}`` ``(9 * C_in, C_out)`` rows in (ky, kx, c) order, batch-norm scale ``g{i}`` and shift
    ``b{i}``, dense ``wd``, ``bd``; ``stats``: the batch norms' running ``mean{i}``/``var{i}`` (not trained).
    ``space_to_depth``: block side of the stem (1: none; ``b``: the first convolution sees ``b * b`` channels
    at ``1/b`` of the side, channel ``by * b + bx`` holding pixel ``(by, bx)`` of each block, as in ONNX)."""

    channels: tuple[int, ...]
    n_classes: int
    params: Params = field(default_factory=dict)
    stats: Params = field(default_factory=dict)
    space_to_depth: int = 1

    @classmethod
    def init(cls, channels: Sequence[int], n_classes: int, seed: int, space_to_depth: int = 1) -> Cnn:
        """He-initialised weights from ``seed`` (same seed, same weights)."""
        if space_to_depth < 1:
            raise ValueError(f"space_to_depth must be >= 1, got {space_to_depth}")
        rng = np.random.default_rng(seed)
        params: Params = {}
        c_in = space_to_depth * space_to_depth
        for i, c_out in enumerate(channels):
            params[f"w{i}"] = (rng.standard_normal((9 * c_in, c_out)) * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
            params[f"g{i}"] = np.ones(c_out, dtype=np.float32)
            params[f"b{i}"] = np.zeros(c_out, dtype=np.float32)
            c_in = c_out
        params["wd"] = (rng.standard_normal((c_in, n_classes)) * np.sqrt(1.0 / c_in)).astype(np.float32)
        params["bd"] = np.zeros(n_classes, dtype=np.float32)
        stats = {
            f"{k}{i}": np.full(c, v, np.float32) for i, c in enumerate(channels) for k, v in (("mean", 0), ("var", 1))
        }
        return cls(tuple(channels), n_classes, params, stats, space_to_depth)

    @property
    def reduction(self) -> int:
        """How many times smaller the last feature map's side is than the input's (S must divide by it)."""
        return self.space_to_depth << len(self.channels)

    @property
    def parameter_count(self) -> int:
        return sum(int(p.size) for p in self.params.values())

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 ``(N, 1, S, S)`` -> logits ``(N, C)`` (inference: batch norm with the running statistics)."""
        return self._forward(x, None)

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, weight_decay: float = 0.0) -> tuple[float, Params]:
        """Mean cross-entropy of ``(N, 1, S, S)`` images with int labels ``y`` and its gradient per parameter.

        Training mode: batch norm uses the batch's statistics and updates the running ones in ``stats``.
        """
        cache: list[tuple[np.ndarray, ...]] = []
        z = self._forward(x, cache)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        n = len(y)
        loss = float(-np.log(np.maximum(p[np.arange(n), y], 1e-12)).mean())
        dz = p
        dz[np.arange(n), y] -= 1.0
        dz /= n
        grads: Params = {}
        (pooled,) = cache.pop()
        grads["wd"] = pooled.T @ dz
        grads["bd"] = dz.sum(axis=0)
        dpool = dz @ self.params["wd"].T
        (h,) = cache.pop()
        dh = np.broadcast_to(dpool[:, None, None, :] / (h.shape[1] * h.shape[2]), h.shape).astype(np.float32)
        for i in reversed(range(len(self.channels))):
            cols, xhat, inv_std, act, shape = cache.pop()
            dact = _maxpool_backward(act, dh)
            dy = (dact * (act > 0)).reshape(-1, act.shape[-1])
            grads[f"g{i}"] = (dy * xhat).sum(axis=0)
            grads[f"b{i}"] = dy.sum(axis=0)
            dxhat = dy * self.params[f"g{i}"]
            d2 = inv_std * (dxhat - dxhat.mean(axis=0) - xhat * (dxhat * xhat).mean(axis=0))
            grads[f"w{i}"] = cols.T @ d2
            if i > 0:
                dh = _col2im(d2 @ self.params[f"w{i}"].T, tuple(int(s) for s in shape))
        if weight_decay:
            for k in self.params:
                if k.startswith("w"):  # conv and dense weights; not the batch norms' scale and shift
                    loss += 0.5 * weight_decay * float((self.params[k] ** 2).sum())
                    grads[k] = grads[k] + weight_decay * self.params[k]
        return loss, {k: g.astype(np.float32, copy=False) for k, g in grads.items()}

    def _forward(self, x: np.ndarray, cache: list[tuple[np.ndarray, ...]] | None) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] % self.reduction or x.shape[3] % self.reduction:
            raise ValueError(f"input must be (N, 1, S, S) with S divisible by {self.reduction}, got {x.shape}")
        h = _space_to_depth(np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32), self.space_to_depth)
        for i in range(len(self.channels)):
            cols = _im2col(h)
            z = cols @ self.params[f"w{i}"]
            if cache is None:
                mean, var = self.stats[f"mean{i}"], self.stats[f"var{i}"]
            else:
                mean, var = z.mean(axis=0), z.var(axis=0)
                self.stats[f"mean{i}"] = (1 - _MOMENTUM) * self.stats[f"mean{i}"] + _MOMENTUM * mean
                self.stats[f"var{i}"] = (1 - _MOMENTUM) * self.stats[f"var{i}"] + _MOMENTUM * var
            inv_std = 1.0 / np.sqrt(var + _BN_EPS)
            xhat = (z - mean) * inv_std
            act = np.maximum(xhat * self.params[f"g{i}"] + self.params[f"b{i}"], 0).reshape(*h.shape[:3], -1)
            if cache is not None:
                cache.append((cols, xhat, inv_std, act, np.array(h.shape)))
            h = _maxpool(act)
        if cache is not None:
            cache.append((h,))
        pooled = h.mean(axis=(1, 2))
        if cache is not None:
            cache.append((pooled,))
        out: np.ndarray = pooled @ self.params["wd"] + self.params["bd"]
        return out

    def to_onnx(self, size: int, class_names: Sequence[str], doc: str = "") -> onnx.ModelProto:
        """The network as an ONNX graph: ``image`` float32 ``(batch, 1, size, size)`` -> ``probs`` ``(batch, C)``."""
        if size % self.reduction:
            raise ValueError(f"size must be divisible by {self.reduction}, got {size}")
        inits: list[TensorProto] = []
        nodes = []
        prev, c_in = "image", 1
        if self.space_to_depth > 1:
            b = self.space_to_depth
            nodes.append(helper.make_node("SpaceToDepth", [prev], ["stem"], name="space_to_depth", blocksize=b))
            prev, c_in = "stem", b * b
        for i, c_out in enumerate(self.channels):
            # Batch norm folded: y = g * (w.x - mean) / std + b = (w * g / std).x + (b - mean * g / std)
            scale = self.params[f"g{i}"].astype(np.float64) / np.sqrt(
                self.stats[f"var{i}"].astype(np.float64) + _BN_EPS
            )
            w = (self.params[f"w{i}"] * scale).reshape(3, 3, c_in, c_out).transpose(3, 2, 0, 1)
            bias = self.params[f"b{i}"] - self.stats[f"mean{i}"] * scale
            inits += [
                numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), f"conv{i}.weight"),
                numpy_helper.from_array(bias.astype(np.float32), f"conv{i}.bias"),
            ]
            nodes += [
                helper.make_node(
                    "Conv", [prev, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]
                ),
                helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"),
                helper.make_node(
                    "MaxPool", [f"relu{i}"], [f"pool{i}"], name=f"pool{i}", kernel_shape=[2, 2], strides=[2, 2]
                ),
            ]
            prev, c_in = f"pool{i}", c_out
        inits += [
            numpy_helper.from_array(self.params["wd"].astype(np.float32), "dense.weight"),
            numpy_helper.from_array(self.params["bd"].astype(np.float32), "dense.bias"),
        ]
        nodes += [
            helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
            helper.make_node("Gemm", ["flat", "dense.weight", "dense.bias"], ["logits"], name="dense"),
            helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
        ]
        graph = helper.make_graph(
            nodes,
            "surface_defect_cnn",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
            [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(class_names)])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pdm_tools")
        model.ir_version = 8  # readable by every onnxruntime >= 1.14 the runtime may run on
        model.doc_string = doc or f"classes: {', '.join(class_names)}"
        onnx.checker.check_model(model)
        return model


def _space_to_depth(h: np.ndarray, b: int) -> np.ndarray:
    """NHWC ``(N, H, W, C)`` -> ``(N, H/b, W/b, b*b*C)``, channel ``(by * b + bx) * C + c`` (ONNX's order)."""
    if b == 1:
        return h
    n, hh, ww, c = h.shape
    t = h.reshape(n, hh // b, b, ww // b, b, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(t.reshape(n, hh // b, ww // b, b * b * c))


def _im2col(h: np.ndarray) -> np.ndarray:
    """NHWC ``(N, H, W, C)`` -> ``(N*H*W, 9*C)`` columns of the 3x3 same-padded windows, (ky, kx, c) order."""
    n, hh, ww, c = h.shape
    p = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = np.concatenate([p[:, i : i + hh, j : j + ww, :] for i in range(3) for j in range(3)], axis=-1)
    return cols.reshape(n * hh * ww, 9 * c)


def _col2im(dcols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Adjoint of ``_im2col``: column gradients back to an NHWC gradient of ``shape``."""
    n, hh, ww, c = shape
    d = dcols.reshape(n, hh, ww, 9, c)
    dp = np.zeros((n, hh + 2, ww + 2, c), dtype=np.float32)
    for k in range(9):
        i, j = divmod(k, 3)
        dp[:, i : i + hh, j : j + ww, :] += d[:, :, :, k, :]
    return dp[:, 1:-1, 1:-1, :]


def _maxpool(a: np.ndarray) -> np.ndarray:
    n, hh, ww, c = a.shape
    out: np.ndarray = a.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    return out


def _maxpool_backward(a: np.ndarray, dout: np.ndarray) -> np.ndarray:
    """Gradient through a 2x2 max-pool: to the first maximum of each window (as ONNX Runtime picks it)."""
    n, hh, ww, c = a.shape
    w = a.reshape(n, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, hh // 2, ww // 2, c, 4)
    first = w.argmax(axis=-1)
    mask = np.zeros_like(w)
    np.put_along_axis(mask, first[..., None], 1.0, axis=-1)
    d = mask * dout[..., None]
    return d.reshape(n, hh // 2, ww // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(n, hh, ww, c)


@dataclass
class Adam:
    """Adam with decoupled state per parameter name; ``step`` updates the parameters in place."""

    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    t: int = 0
    m: Params = field(default_factory=dict)
    v: Params = field(default_factory=dict)

    def step(self, params: Params, grads: Params, lr: float | None = None) -> None:
        self.t += 1
        rate = self.lr if lr is None else lr
        for k, g in grads.items():
            m = self.m.setdefault(k, np.zeros_like(g))
            v = self.v.setdefault(k, np.zeros_like(g))
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            mhat = m / (1 - self.beta1**self.t)
            vhat = v / (1 - self.beta2**self.t)
            params[k] -= (rate * mhat / (np.sqrt(vhat) + self.eps)).astype(np.float32)
