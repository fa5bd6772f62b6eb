"""Commissioning baselines: each machine's own normal, learned from its first readings, then scored.

``CommissioningBaseline`` (one machine) and ``BaselineBank`` (one per key) in ``baseline``; the detector
math in ``detector``; ONNX export and INT8 quantization of a fitted detector in ``export``.
"""

from agent.commissioning.baseline import (
    BaselineBank,
    CommissioningBaseline,
    CommissioningConfig,
    Phase,
    StepScore,
)
from agent.commissioning.detector import Detector, DetectorConfig, fit_detector

__all__ = [
    "BaselineBank",
    "CommissioningBaseline",
    "CommissioningConfig",
    "Detector",
    "DetectorConfig",
    "Phase",
    "StepScore",
    "fit_detector",
]
