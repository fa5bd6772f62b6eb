"""The inspection stage of scoring: camera images classified in batches, one point each, defects alerted.

An image is its own window: the scoring worker hands the images of a batch here, in chunks, and gets back
the ``inspection`` points and one ``Verdict`` per image for the same alert engine as the windows. The
verdict's score is the highest probability of a defect class (``camera.defect_classes``, all classes when
empty) and its threshold ``camera.min_confidence``: a hot "window" is a defect image, and the alert type
(``camera.alert_type``) has its own rule (``alerts.types``: raise_n of raise_m images, clear_after ...).
The alert carries the classifier's verdict and the image's sha256 with the URL to fetch it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np

from agent.images.points import inspection_lines
from agent.inference.classifier import DefectPrediction
from agent.metrics import Metrics
from agent.records import ImageFrame, Score
from agent.runtime.batch import Verdict
from agent.runtime.worker import to_lines

logger = logging.getLogger(__name__)

DEFAULT_PENDING_BYTES = 64 * 1024 * 1024


class PendingImages:
    """The decoded pixels of the images queued for scoring, bounded in bytes (``camera.max_pending_bytes``).

    The scoring queue is bounded in items (``queues.windows_max``), and an item can be one 200 × 200 frame
    (40 kB) or one 4096 × 4096 frame (16 MB): without a byte bound a burst of large images could take
    gigabytes. The ingest worker ``take``s an image's bytes before queueing it (False: not scored, counted
    ``images.unscored{reason=backlog}``, still stored and referenced); the scoring worker ``give_back``s them
    once it has scored it. Both threads: one lock.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"PendingImages: max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def take(self, n: int) -> bool:
        with self._lock:
            if self._bytes + n > self.max_bytes:
                return False
            self._bytes += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self._bytes = max(0, self._bytes - n)


class ImageLinks:
    """Where alerts say the agent serves an image: ``camera.public_url`` when set, else the health endpoint's
    URL once it is bound (``health.port: 0`` picks a free port at start), else ``fallback``."""

    def __init__(self, public_url: str | None, fallback: str) -> None:
        self.public_url = public_url.rstrip("/") if public_url else None
        self.fallback = fallback.rstrip("/")
        self.server: _HasUrl | None = None
        """Set by the composition root once the health server exists; read on the scoring thread."""

    def __call__(self, sha256: str) -> str:
        base = self.public_url or (self.server.url if self.server is not None else self.fallback)
        return f"{base}/images/{sha256}"


class _HasUrl(Protocol):
    @property
    def url(self) -> str: ...


class ImageClassifier(Protocol):
    """What the stage needs of an image model (``agent.inference.image``, kind ``image-classifier``).

    ``prepare``: uint8 ``(H, W)`` frames → the float32 ``(N, 1, S, S)`` batch, with the preprocessing it was
    trained with; ``classify``: that batch → (class index ``(N,)``, probabilities ``(N, C)``). Scoring thread
    only; both raise ``ValueError`` on input they cannot take.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def classes(self) -> tuple[str, ...]: ...

    def prepare(self, grays: Sequence[np.ndarray]) -> np.ndarray: ...

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class InspectionStage:
    """See the module docstring. ``image_url``: sha256 → where the agent serves the image."""

    classifier: ImageClassifier | None
    alert_type: str
    min_confidence: float
    image_url: Callable[[str], str]
    defect_classes: tuple[str, ...] = ()
    pending: PendingImages = field(default_factory=lambda: PendingImages(DEFAULT_PENDING_BYTES))

    def __post_init__(self) -> None:
        if self.classifier is not None and self.defect_classes:
            unknown = sorted(set(self.defect_classes) - set(self.classifier.classes))
            if unknown:
                raise ValueError(
                    f"camera.defect_classes {unknown} are not classes of model {self.classifier.model_id} "
                    f"({', '.join(self.classifier.classes)})"
                )

    def inspect(self, frames: Sequence[ImageFrame], metrics: Metrics) -> tuple[list[Verdict], list[str]]:
        """Classify ``frames`` in one model run; their verdicts (in order) and ``inspection`` lines."""
        if not frames:
            return [], []
        clf = self.classifier
        if clf is None:
            metrics.inc("images.unscored", len(frames), reason="no_model")
            return [], []
        try:
            x = clf.prepare([f.gray for f in frames])
            _, probs = clf.classify(x)
        except ValueError as exc:
            metrics.inc("images.unscored", len(frames), reason="bad_input")
            logger.warning("%d image(s) not classified: %s", len(frames), exc)
            return [], []
        metrics.inc("images.scored", len(frames), model=clf.model_id)
        names = clf.classes
        defect_columns = [i for i, n in enumerate(names) if not self.defect_classes or n in self.defect_classes]
        verdicts: list[Verdict] = []
        lines: list[str] = []
        for frame, p in zip(frames, np.asarray(probs, dtype=np.float32), strict=True):
            top = int(p.argmax())
            defect_p = float(p[defect_columns].max()) if defect_columns else 0.0
            is_defect = defect_p >= self.min_confidence
            if is_defect:
                defect_class = names[defect_columns[int(p[defect_columns].argmax())]]
                metrics.inc("images.defects", 1, **{"class": defect_class})
            encode = partial(
                inspection_lines,
                model_id=clf.model_id,
                model_version=clf.version,
                class_name=names[top],
                probabilities={n: float(v) for n, v in zip(names, p, strict=True)},
                defect=is_defect,
            )
            lines.extend(to_lines(encode, frame, metrics))
            score = Score(
                source=frame.source,
                start_ns=frame.time_ns,
                end_ns=frame.time_ns,
                model_id=clf.model_id,
                model_version=clf.version,
                score=defect_p,
                threshold=self.min_confidence,
            )
            prediction = DefectPrediction(names[top], float(p[top]), names, p.copy())
            evidence = {
                "sha256": frame.sha256,
                "url": self.image_url(frame.sha256),
                "format": frame.format,
                "width": frame.width,
                "height": frame.height,
            }
            verdicts.append(Verdict(score, prediction, alert_type=self.alert_type, evidence=evidence))
        return verdicts, lines
