"""``python -m pdm_tools.evaluation.cwru_visibility``: the envelope-visibility verdict per bearing under several
demodulations, and the line scan, on generated CWRU-like recordings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pdm_tools.datasets.cwru import Recording
from pdm_tools.evaluation import cwru_visibility as vis
from tests.unit.test_cwru_evaluation import MULT, RATE, signal, write_dataset

RPM = 1772.0
N = 3 * 8192


def recording(name: str, kind: str, shape: str, seed: int, load: int = 0) -> Recording:
    """A recording labelled ``kind`` whose samples are ``signal(shape)``."""
    return Recording(
        file=f"{name}_{load}.npz",
        fault=name,
        kind=kind,
        load_hp=load,
        rpm=RPM,
        rate_hz=float(RATE),
        samples=signal(shape, RPM, N, seed),
        diameter_in=None if kind == "normal" else 0.007,
    )


def test_every_method_sees_a_ringing_defect_and_none_sees_a_label_without_one() -> None:
    recordings = [
        recording("Normal", "normal", "normal", 1),
        *(recording("IR007", "inner_race", "inner_race", 2 + load, load) for load in (0, 1)),
        recording("OR007", "outer_race", "outer_race", 4),
        # Labelled ball, but nothing in the signal: no demodulation may find a trace.
        recording("B007", "ball", "normal", 5),
    ]
    result = vis.visibility(recordings)
    assert set(result) == set(vis.METHODS)
    for method, r in result.items():
        rows = r["bearings"]
        assert set(rows) == {"IR007", "OR007", "B007"}
        for name in ("IR007", "OR007"):
            assert rows[name]["visible"] and rows[name]["lead_db"] > 0, (method, name, rows[name])
            assert rows[name]["margin_db"] == pytest.approx(
                rows[name]["median_db"] - rows[name]["healthy_max_db"], abs=0.02
            )
        assert not rows["B007"]["visible"], (method, rows["B007"])
        assert r["visible"] == 2
    assert result["cpw-grid"]["healthy_windows"] == 9  # three parts of 8192 samples, hop 2048
    assert result["v1"]["bearings"]["IR007"]["windows"] == 2 * 11


def test_whitening_keeps_the_phase_and_drops_the_amplitude() -> None:
    x = np.fft.rfft(signal("outer_race", RPM, 4096, 7))[None]
    w = vis.whiten(x)
    assert np.allclose(np.abs(w[0, 1:]), 1.0)
    assert np.allclose(np.angle(w[0, 1:]), np.angle(x[0, 1:]))
    assert np.allclose(vis.whiten(1e-3 * x), w)


def test_tsa_removes_the_shaft_harmonics_and_keeps_what_is_not_synchronous() -> None:
    t = np.arange(4096) / RATE
    shaft = RPM / 60
    synchronous = sum(np.sin(2 * np.pi * k * shaft * t + k) / k for k in range(1, 8))
    other = 0.3 * np.sin(2 * np.pi * MULT["bpfo"] * shaft * t)
    residual = vis.tsa_residual((synchronous + other)[None], float(RATE), RPM)[0]
    assert np.std(residual - other) < 0.05 * np.std(synchronous)
    assert np.std(residual) == pytest.approx(np.std(other), rel=0.2)


def test_scan_finds_the_defect_line_among_the_strongest() -> None:
    r = vis.scan_lines(signal("inner_race", RPM, N, 9), float(RATE), RPM, N)
    strongest = [m for m, _ in r["strongest"]]
    assert any(abs(m / MULT["bpfi"] - 1) < 0.01 for m in strongest), strongest
    assert r["at"]["bpfi"] > r["at"]["bpfo"] + 6


def test_main_prints_json_with_the_scan_and_refuses_unknown_methods(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_dataset(tmp_path / "cwru")
    assert vis.main(["--data", str(data), "--methods", "cpw-full,sk", "--scan", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["methods"]) == {"cpw-full", "sk"}
    assert "normal_0" in result["scan"] and "inner_race_1" in result["scan"]
    assert vis.main(["--data", str(data), "--methods", "cpw-full"]) == 0
    assert "visible" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        vis.main(["--data", str(data), "--methods", "magic"])
    assert vis.main(["--data", str(tmp_path / "nowhere")]) == 2
