"""Feature extraction: windows in, float32 feature rows out. Training and serving both call this.

The feature definitions are the modalities' (``agent.features.vibration``, ``agent.features.process``,
found by ``FeatureSpec.kind`` in ``agent.features.registry``); this module checks the windows against
the spec, runs the modality on the batch and converts to float32. Non-finite input or output raises
``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.features.registry import modality
from agent.features.spec import FeatureSpec
from agent.records import FeatureVector, Window


def extract(spec: FeatureSpec, window: Window) -> FeatureVector:
    """Features of one window: ``values`` float32, shape ``(spec.n_features,)``."""
    values = extract_matrix(spec, [window])[0]
    return FeatureVector(window=window, names=spec.feature_names(), values=values, spec_hash=spec.spec_hash())


def extract_matrix(spec: FeatureSpec, windows: Sequence[Window]) -> np.ndarray:
    """Features of many windows at once: float32, shape ``(len(windows), spec.n_features)``.

    Row ``i`` equals ``extract(spec, windows[i]).values``. Raises ``ValueError`` if the spec is for
    another feature code version, or a window does not match the spec (kind, channels, length, rate,
    band edges above its Nyquist frequency) or holds non-finite values.
    """
    spec.require_supported()
    if not windows:
        return np.empty((0, spec.n_features), dtype=np.float32)
    kind = modality(spec.kind)
    for i, window in enumerate(windows):
        problem = _problem(spec, window) or kind.check_window(spec, window)
        if problem is not None:
            raise ValueError(f"window {i} ({window.source}): {problem}")
    # Non-finite input shows as a non-finite row (``Modality.features``): checked on the output, once per
    # batch, and only then traced back to the window that holds it.
    with np.errstate(all="ignore"):
        out = kind.features(spec, windows)
        result = out.astype(np.float32)
    if not np.isfinite(result).all():
        bad = int(np.flatnonzero(~np.isfinite(result).all(axis=1))[0])
        window = windows[bad]
        if not (np.isfinite(window.data).all() and np.isfinite(window.times_s).all()):
            raise ValueError(f"window {bad} ({window.source}) holds non-finite values")
        raise ValueError(
            f"features of window {bad} ({windows[bad].source}) overflow float32: "
            f"{dict(zip(spec.feature_names(), out[bad].tolist(), strict=True))}"
        )
    return result


def _problem(spec: FeatureSpec, window: Window) -> str | None:
    """What makes ``window`` unfit for ``spec`` whatever its kind, or None."""
    if window.kind != spec.kind:
        return f"kind {window.kind!r} does not match the spec kind {spec.kind!r}"
    if tuple(window.channels) != spec.channels:
        return f"channels {list(window.channels)} do not match the spec {list(spec.channels)}"
    expected = (len(spec.channels), spec.window_samples)
    if window.data.shape != expected:
        return f"data shape {window.data.shape} does not match the spec {expected}"
    if window.times_s.shape != (spec.window_samples,):
        return f"times_s shape {window.times_s.shape} does not match ({spec.window_samples},)"
    return None
