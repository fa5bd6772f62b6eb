"""Per-machine commissioning baseline: learn a machine's normal from its first readings, then score it.

``CommissioningBaseline`` is pure and single-threaded (one per machine, fed by the thread that owns the
machine's process readings, in time order). Lifecycle:

1. **commissioning**: ``update`` buffers each multivariate step and returns ``None`` until
   ``commissioning_steps`` steps (or ``commissioning_s`` seconds of them) have been collected;
2. the step that completes commissioning fits the detector (``agent.commissioning.detector``) on the
   buffered steps and sets the threshold from their scores, label-free; the buffer is then dropped;
3. **monitoring**: every later step gets a ``StepScore``, computed causally from the last
   ``smoothing_steps`` steps (the first ones reach back into the commissioning data).

``update`` raises ``ValueError`` for a step of the wrong shape, with NaN/inf, or not later than the
previous step; the baseline is unchanged then, so the caller can count the error and go on.
``BaselineBank`` keeps one baseline per key (a ``Source``, a machine name).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent.commissioning.detector import Detector, DetectorConfig, fit_detector

Phase = Literal["commissioning", "monitoring"]

_KEYS = ("commissioning_steps", "commissioning_s", "smoothing_steps", "threshold_factor", "max_autocorrelation")


@dataclass(frozen=True, slots=True)
class CommissioningConfig:
    """How long to learn and how to score.

    Commissioning ends after ``commissioning_steps`` steps, or, if ``commissioning_s`` is set, at the first
    step at least that many seconds after the first one (and never before ``smoothing_steps + 1`` steps).
    ``detector``: see ``DetectorConfig``.
    """

    commissioning_steps: int = 400
    commissioning_s: float | None = None
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        n = self.commissioning_steps
        minimum = self.detector.smoothing_steps + 1
        if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
            raise ValueError(f"commissioning_steps must be an integer >= smoothing_steps + 1 = {minimum}, got {n!r}")
        s = self.commissioning_s
        if s is not None and (isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0):
            raise ValueError(f"commissioning_s must be a finite number > 0 or null, got {s!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CommissioningConfig:
        """Strict: unknown keys raise ``ValueError`` naming them; missing keys take the defaults."""
        unknown = sorted(str(k) for k in d if k not in _KEYS)
        if unknown:
            raise ValueError(f"commissioning: unknown key(s) {unknown}; allowed: {list(_KEYS)}")
        det_keys = ("smoothing_steps", "threshold_factor", "max_autocorrelation")
        detector = DetectorConfig(**{k: d[k] for k in det_keys if k in d})
        kwargs: dict[str, Any] = {k: d[k] for k in ("commissioning_steps", "commissioning_s") if k in d}
        return cls(detector=detector, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "commissioning_steps": self.commissioning_steps,
            "commissioning_s": self.commissioning_s,
            **self.detector.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class StepScore:
    """The verdict on one monitored step: higher ``score`` is more anomalous."""

    time_ns: int
    score: float
    threshold: float
    is_anomalous: bool
    phase: Phase = "monitoring"


class CommissioningBaseline:
    """Learns one machine's normal from its first steps, then scores every step (see the module doc).

    Memory: while commissioning, the steps in one ``steps × C`` float64 array (400 steps of 3 channels:
    9.6 KB; it was one small array per step, ~120 bytes each, which with 1,000 machines near the end of
    their commissioning meant 400,000 objects and a fragmented heap); once monitoring, a
    ``smoothing_steps × C`` ring and the ``Detector``.
    Time on the development box: fitting 400 × 8 steps ~3 ms; a monitored step ~20 µs.
    """

    def __init__(self, config: CommissioningConfig | None = None) -> None:
        self._config = config or CommissioningConfig()
        self._k = self._config.detector.smoothing_steps
        self._train = np.empty((0, 0))  # rows [0, _n_train) are the commissioning steps so far
        self._n_train = 0
        self._first_ns: int | None = None
        self._last_ns: int | None = None
        self._n_channels: int | None = None
        self._recent: np.ndarray | None = None  # ring buffer (k, C) of the last k steps
        self._filled = 0
        self._detector: Detector | None = None
        self._steps_at_fit = 0

    @property
    def config(self) -> CommissioningConfig:
        return self._config

    @property
    def phase(self) -> Phase:
        return "commissioning" if self._detector is None else "monitoring"

    @property
    def detector(self) -> Detector | None:
        """The fitted detector, ``None`` while commissioning."""
        return self._detector

    @property
    def steps_seen(self) -> int:
        """Commissioning steps collected so far (frozen once monitoring)."""
        return self._n_train if self._detector is None else self._steps_at_fit

    def update(self, step: np.ndarray, time_ns: int) -> StepScore | None:
        """Feed one multivariate step float ``(C,)`` taken at ``time_ns``; ``None`` while commissioning."""
        x = np.array(step, dtype=np.float64)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"step must be a non-empty 1-D array of channel values, got shape {np.shape(step)}")
        if self._n_channels is not None and x.size != self._n_channels:
            raise ValueError(f"step has {x.size} channels, this baseline was started with {self._n_channels}")
        if not np.isfinite(x).all():
            raise ValueError("step contains NaN or infinity")
        if self._last_ns is not None and time_ns <= self._last_ns:
            raise ValueError(f"step at {time_ns} ns is not later than the previous one at {self._last_ns} ns")
        if self._recent is None:
            self._recent = np.empty((self._k, x.size))
        self._n_channels = x.size
        self._last_ns = time_ns
        self._recent[self._filled % self._k] = x
        self._filled += 1
        if self._detector is None:
            if self._first_ns is None:
                self._first_ns = time_ns
            self._append_step(x)
            if self._commissioning_done(time_ns):
                self._detector = fit_detector(self._train[: self._n_train], self._config.detector)
                self._steps_at_fit = self._n_train
                self._train, self._n_train = np.empty((0, 0)), 0
            return None
        det = self._detector
        # The mean over the window does not depend on the ring's rotation.
        score = float(np.max(np.abs((self._recent.mean(axis=0) - det.mean) / det.scale)))
        return StepScore(time_ns=time_ns, score=score, threshold=det.threshold, is_anomalous=score > det.threshold)

    def to_state(self) -> dict[str, Any]:
        """JSON-ready state from which ``from_state`` continues exactly where this baseline is: the steps
        collected so far while commissioning; the detector and the smoothing ring once monitoring."""
        # The ring as it is (slot order, its filled rows) with its cursor: the restored one sums the same
        # rows in the same order, so its scores are equal to the last bit.
        recent = None if self._recent is None else self._recent[: min(self._filled, self._k)].tolist()
        return {
            "phase": self.phase,
            "n_channels": self._n_channels,
            "first_ns": self._first_ns,
            "last_ns": self._last_ns,
            "train": pack_rows(self._train[: self._n_train]),
            "recent": recent,
            "filled": self._filled,
            "detector": None if self._detector is None else self._detector.to_dict(),
            "steps_at_fit": self._steps_at_fit,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: CommissioningConfig) -> CommissioningBaseline:
        """The baseline ``to_state`` described (under the same ``config``); ``ValueError`` naming what is wrong
        when the state is inconsistent (wrong shapes, non-finite values, a detector of another size)."""
        baseline = cls(config)
        try:
            n_channels = state["n_channels"]
            train = unpack_rows(state["train"])
            detector = None if state["detector"] is None else Detector.from_dict(state["detector"])
            recent = None if state["recent"] is None else np.asarray(state["recent"], dtype=np.float64)
            first_ns, last_ns = state["first_ns"], state["last_ns"]
            steps_at_fit = int(state["steps_at_fit"])
            filled = int(state["filled"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"baseline state is incomplete or malformed: {exc!r}") from None
        if n_channels is not None and (isinstance(n_channels, bool) or not isinstance(n_channels, int)):
            raise ValueError(f"n_channels must be an integer or null, got {n_channels!r}")
        if state.get("phase") != ("commissioning" if detector is None else "monitoring"):
            raise ValueError(f"phase {state.get('phase')!r} does not match the presence of a detector")
        width = n_channels or 0
        arrays = [*train, *([] if recent is None else list(recent))]
        if any(a.shape != (width,) or not np.isfinite(a).all() for a in arrays):
            raise ValueError(f"steps must be finite rows of {width} channels")
        if len(recent if recent is not None else ()) != min(filled, baseline._k):
            raise ValueError(f"{filled} steps seen need min(that, smoothing_steps) recent ones")
        if detector is not None:
            if detector.n_channels != width or detector.smoothing_steps != baseline._k:
                raise ValueError("the detector does not fit the channels or smoothing_steps of this baseline")
            if train or recent is None or len(recent) != baseline._k:
                raise ValueError("a monitoring baseline keeps no commissioning steps and smoothing_steps recent ones")
        if (width == 0) != (last_ns is None) or (recent is None) != (last_ns is None):
            raise ValueError("a baseline that has seen steps needs n_channels, last_ns and its recent steps")
        baseline._n_channels = n_channels
        baseline._first_ns = None if first_ns is None else int(first_ns)
        baseline._last_ns = None if last_ns is None else int(last_ns)
        baseline._train = np.array(train, dtype=np.float64).reshape(len(train), width)
        baseline._n_train = len(train)
        baseline._detector = detector
        baseline._steps_at_fit = steps_at_fit
        if recent is not None:
            baseline._recent = np.empty((baseline._k, width))
            baseline._recent[: len(recent)] = recent
            baseline._filled = filled
        return baseline

    def _append_step(self, x: np.ndarray) -> None:
        if self._n_train == len(self._train):  # full: grow (to the step count at once when the count decides)
            cfg = self._config
            wanted = cfg.commissioning_steps if cfg.commissioning_s is None else 2 * self._n_train
            grown = np.empty((max(wanted, self._n_train + 1, 16), x.size))
            if self._n_train:
                grown[: self._n_train] = self._train[: self._n_train]
            self._train = grown
        self._train[self._n_train] = x
        self._n_train += 1

    def _commissioning_done(self, time_ns: int) -> bool:
        cfg = self._config
        n = self._n_train
        if cfg.commissioning_s is None:
            return n >= cfg.commissioning_steps
        assert self._first_ns is not None
        return n >= self._k + 1 and (time_ns - self._first_ns) >= cfg.commissioning_s * 1e9


def pack_rows(rows: np.ndarray | Sequence[np.ndarray]) -> dict[str, Any] | list[list[float]]:
    """Commissioning steps for the state file: one base64 string of little-endian float64s.

    Not a JSON list of numbers: a baseline near the end of commissioning holds hundreds of steps, and with
    hundreds of machines the list form took 0.8 s to build on the scoring thread and 1.3 s to encode (with
    the interpreter lock held throughout) at every save (432 machines, 398 steps of 3 channels, 11 MB).
    """
    if not len(rows):
        return []
    little = np.dtype("<f8")
    if isinstance(rows, np.ndarray):
        data = np.ascontiguousarray(rows, dtype=little).tobytes()
    else:
        data = b"".join((x if x.dtype == little else x.astype(little)).tobytes() for x in rows)  # np.stack: 3x slower
    return {"rows": len(rows), "f8": base64.b64encode(data).decode("ascii")}


def unpack_rows(raw: Any) -> list[np.ndarray]:
    """``pack_rows`` reversed; also reads the list form of files written before it (``ValueError`` if neither)."""
    if isinstance(raw, list):
        return [np.asarray(x, dtype=np.float64) for x in raw]
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), int) or not isinstance(raw.get("f8"), str):
        raise ValueError(f"steps must be a list of rows or {{rows, f8}}, got {type(raw).__name__}")
    data = base64.b64decode(raw["f8"], validate=True)
    n = raw["rows"]
    if n <= 0 or len(data) % (8 * n):
        raise ValueError(f"{len(data)} bytes of steps do not make {n} rows of float64")
    matrix = np.frombuffer(data, dtype="<f8").reshape(n, -1).astype(np.float64)
    return list(matrix)


class BaselineBank:
    """One ``CommissioningBaseline`` per key (machine or ``Source``), created on the key's first step."""

    def __init__(self, config: CommissioningConfig | None = None) -> None:
        self._config = config or CommissioningConfig()
        self._baselines: dict[Hashable, CommissioningBaseline] = {}

    def update(self, key: Hashable, step: np.ndarray, time_ns: int) -> StepScore | None:
        baseline = self._baselines.get(key)
        if baseline is None:
            baseline = self._baselines[key] = CommissioningBaseline(self._config)
        return baseline.update(step, time_ns)

    def get(self, key: Hashable) -> CommissioningBaseline | None:
        return self._baselines.get(key)

    def reset(self, key: Hashable) -> None:
        """Forget ``key``'s baseline: its next steps commission it again. Only on an operator's command
        (after maintenance): a fitted baseline is never refitted on its own, least of all from steps it flags."""
        self._baselines.pop(key, None)

    def put(self, key: Hashable, baseline: CommissioningBaseline) -> None:
        """Continue ``baseline`` (restored from a previous run) for ``key``; it must have this bank's config."""
        if baseline.config != self._config:
            raise ValueError("the baseline was built with another commissioning config")
        self._baselines[key] = baseline

    def items(self) -> list[tuple[Hashable, CommissioningBaseline]]:
        return list(self._baselines.items())

    def __len__(self) -> int:
        return len(self._baselines)
