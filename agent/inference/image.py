"""The camera image classifier at serving time (model kind ``image-classifier``): which surface defect a frame shows.

Its ``manifest.json`` is the one ``agent.inference.manifest.Manifest`` format with
``task: "image-classifier"``: ``class_names`` in output order, input ``image`` float32
``[batch, 1, S, S]``, output ``probs`` float32 ``[batch, C]`` (the softmax is inside the graph), and an
``agent.images.preprocess.ImageSpec`` as ``feature_spec`` (S and how a frame is prepared), under the same
trust rules as every other model (sha256 of the file, spec hash against today's preprocessing code).

The scoring worker prepares frames with ``prepare`` (the same code training used) and calls ``classify``
on a batch; both run on the scoring thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.images.preprocess import ImageSpec, batch
from agent.inference.errors import ModelError
from agent.inference.manifest import Manifest
from agent.inference.session import ServedModel

logger = logging.getLogger(__name__)

TASK = "image-classifier"
INPUT, OUTPUT = "image", "probs"
# Batch sizes run at load: the first run of a shape allocates and pre-packs; pay that before traffic.
_WARM_UP_BATCHES = (1, 16)


class OnnxImageClassifier(ServedModel):
    """One image classifier loaded from its directory, checked against its manifest and warmed up.

    Built by the composition root (or the model registry's watcher), then called from the scoring thread
    only. Construction raises ``ModelError``; ``prepare`` and ``classify`` raise ``ValueError`` on bad input.
    """

    def __init__(self, manifest: Manifest, model_dir: Path, threads: int = 1) -> None:
        if manifest.task != TASK:
            raise ModelError(
                f"{model_dir}: model {manifest.model_id!r} is a {manifest.task!r} model, not a {TASK!r}", reason="task"
            )
        spec = manifest.spec()
        assert isinstance(spec, ImageSpec)  # the manifest's task decides the spec's class
        super().__init__(manifest, model_dir, threads)
        self._spec = spec
        self._check_session()
        self._warm_up()
        logger.info(
            "loaded image classifier %s version %s (%s, %dx%d, %d classes)",
            manifest.model_id,
            manifest.version,
            manifest.file,
            spec.size,
            spec.size,
            len(manifest.class_names),
        )

    @classmethod
    def load(cls, model_dir: Path, threads: int = 1) -> OnnxImageClassifier:
        """Read and verify the manifest in ``model_dir`` and build the classifier."""
        return cls(Manifest.load(model_dir, TASK), model_dir, threads)

    @property
    def spec(self) -> ImageSpec:
        return self._spec

    @property
    def input_size(self) -> int:
        """S of the ``(N, 1, S, S)`` input."""
        return self._spec.size

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in the order of the ``probs`` columns."""
        return self._manifest.class_names

    def prepare(self, grays: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 ``(H, W)`` frames (any sizes) -> the float32 ``(N, 1, S, S)`` batch ``classify`` takes."""
        return batch([self._spec.prepare(g) for g in grays])

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prepared batch float32 ``(N, 1, S, S)`` -> (class index int64 ``(N,)``, probabilities float32 ``(N, C)``)."""
        s = self._spec.size
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise ValueError(
                f"images must be a float32 array of shape (N, 1, {s}, {s}), got "
                f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
            )
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.int64), np.empty((0, len(self.classes)), dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError("images contain NaN or infinity")
        (probs,) = self._session.run([OUTPUT], {INPUT: np.ascontiguousarray(x)})
        probs = np.asarray(probs, dtype=np.float32)
        return probs.argmax(axis=1).astype(np.int64), probs

    def _check_session(self) -> None:
        got_in = [(a.name, a.type, len(a.shape)) for a in self._session.get_inputs()]
        got_out = [(a.name, a.type, len(a.shape)) for a in self._session.get_outputs()]
        if got_in != [(INPUT, "tensor(float)", 4)] or got_out != [(OUTPUT, "tensor(float)", 2)]:
            raise ModelError(
                f"{self._path}: graph inputs {got_in} / outputs {got_out} are not "
                f"{INPUT!r} float (N, 1, S, S) / {OUTPUT!r} float (N, C)",
                reason="shape",
            )

    def _warm_up(self) -> None:
        s, c = self._spec.size, len(self.classes)
        for n in _WARM_UP_BATCHES:
            x = np.zeros((n, 1, s, s), dtype=np.float32)
            try:
                (probs,) = self._session.run([OUTPUT], {INPUT: x})
            except Exception as exc:  # ORT's own exception types: a graph that loads but cannot run
                raise ModelError(
                    f"image classifier {self._manifest.model_id}: warm-up failed: {exc}", reason="warmup"
                ) from exc
            if np.shape(probs) != (n, c) or not np.isfinite(probs).all():
                raise ModelError(
                    f"image classifier {self._manifest.model_id}: warm-up returned shape {np.shape(probs)}, "
                    f"expected ({n}, {c}) finite",
                    reason="warmup",
                )
