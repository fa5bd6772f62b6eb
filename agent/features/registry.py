"""Modalities by ``FeatureSpec.kind``: a new kind of stream is one module beside ``vibration.py`` (a
``Modality`` and its buffer) plus one entry here (and its naming rules in ``agent.features.spec``)."""

from __future__ import annotations

from collections.abc import Mapping

from agent.features.base import Modality
from agent.features.process import ProcessModality
from agent.features.vibration import VibrationModality
from agent.plugins import registered

MODALITIES: Mapping[str, Modality] = {
    "vibration": VibrationModality(),
    "process": ProcessModality(),
}


def modality(kind: str) -> Modality:
    """The modality of ``kind``; ``ValueError`` naming the known kinds otherwise."""
    return registered(MODALITIES, kind, "feature kind")
