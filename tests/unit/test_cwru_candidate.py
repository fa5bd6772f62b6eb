"""The candidate envelope-evidence features (``pdm_tools.evaluation.cwru_candidate``) on synthetic defects."""

from __future__ import annotations

import numpy as np
import pytest

from agent.features.bearing import BearingFeatureSpec
from pdm_tools.evaluation.cwru_candidate import candidate_names, envelope_evidence_rows
from tests.unit.test_cwru_evaluation import RATE, signal

SPEC = BearingFeatureSpec()
RPM = 1772.0
EVIDENCE = candidate_names(SPEC)[11:]  # after the 10 band shares and the kurtosis


def evidence(kind: str, scale: float = 1.0, seed: int = 7) -> dict[str, float]:
    x = scale * signal(kind, RPM, 3 * 4096, seed)
    rows = envelope_evidence_rows(x.reshape(3, 4096), RATE, RPM, SPEC)
    assert rows.shape == (3, len(EVIDENCE)) and np.isfinite(rows).all()
    return dict(zip(EVIDENCE, rows.mean(axis=0).tolist(), strict=True))


@pytest.mark.parametrize(("kind", "frequency"), [("inner_race", "bpfi"), ("outer_race", "bpfo")])
def test_the_defect_frequency_is_the_one_the_envelope_favours(kind: str, frequency: str) -> None:
    ev = evidence(kind)
    assert ev[f"rel_{frequency}"] > 0.1, ev  # above the other two defect frequencies
    assert ev[f"ev_{frequency}"] > evidence("normal")[f"ev_{frequency}"] + 0.2, ev


def test_the_inner_race_modulation_shows_as_shaft_sidebands() -> None:
    assert evidence("inner_race")["ev_bpfi_sidebands"] > evidence("outer_race")["ev_bpfi_sidebands"] + 0.1


def test_evidence_does_not_depend_on_the_signal_amplitude() -> None:
    """A larger defect (or a heavier load) that only scales the vibration leaves the evidence unchanged."""
    small, large = evidence("outer_race", 1.0), evidence("outer_race", 40.0)
    assert small == pytest.approx(large, abs=1e-6)
