"""SKAB protocol: metric formulas, file handling and the ``pdm-agent evaluate skab`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent import cli
from pdm_tools.evaluation.skab import Confusion, load_skab

HEADER = (
    "datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;Voltage;Volume Flow RateRMS"
)


def test_metrics_on_a_hand_made_confusion() -> None:
    c = Confusion(tp=60, fp=10, fn=20, tn=90)
    assert c.f1 == pytest.approx(60 / (60 + (10 + 20) / 2))
    assert c.far == pytest.approx(100 * 10 / (10 + 90))
    assert c.mar == pytest.approx(100 * 20 / (20 + 60))


def test_confusion_counts_and_pooling() -> None:
    predicted = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    actual = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    c = Confusion.of(predicted, actual)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    pooled = c + Confusion(tp=1, fp=0, fn=0, tn=5)
    assert (pooled.tp, pooled.fp, pooled.fn, pooled.tn) == (3, 1, 1, 7)
    assert Confusion().f1 == 0.0 and Confusion().far == 0.0 and Confusion().mar == 0.0


def _write_skab(path: Path, seed: int, rows: int = 560, start: int = 470, labelled: bool = True) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 8)) * 0.1 + np.arange(1, 9)
    label = np.zeros(rows)
    label[start:] = 1.0
    x[start:, 7] -= 3.0  # flow drops
    lines = [HEADER + (";anomaly;changepoint" if labelled else "")]
    for i in range(rows):
        stamp = f"2020-03-09 10:{i // 60 % 60:02d}:{i % 60:02d}"
        cells = ";".join(f"{v:.5f}" for v in x[i])
        lines.append(f"{stamp};{cells}" + (f";{label[i]:.1f};0.0" if labelled else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def skab_dir(tmp_path: Path) -> Path:
    _write_skab(tmp_path / "valve1" / "0.csv", seed=0)
    _write_skab(tmp_path / "other" / "1.csv", seed=1, start=500)
    _write_skab(tmp_path / "anomaly-free" / "anomaly-free.csv", seed=2, labelled=False)
    return tmp_path


def test_files_without_labels_are_skipped_and_named(skab_dir: Path) -> None:
    files, skipped = load_skab(skab_dir)
    assert [f.name for f in files] == ["other/1.csv", "valve1/0.csv"]
    assert len(files[0].channels) == 8
    assert skipped == ["anomaly-free/anomaly-free.csv: no 'anomaly' column"]


def test_cli_prints_the_json_keys(skab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", "skab", "--data", str(skab_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"f1", "far", "mar", "files", "quantized"} <= result.keys()
    assert result["files"] == 2
    assert result["f1"] > 0.8 and result["far"] < 5.0
    assert {"fp32", "int8_range1", "int8_range8"} <= result["quantized"].keys()
    assert result["quantized"]["fp32"]["decision_agreement_with_numpy"] == 1.0


def test_cli_text_report_and_missing_folder(skab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", "skab", "--data", str(skab_dir), "--no-quantize"]) == 0
    out = capsys.readouterr().out
    assert "Conv-AE" in out and "commissioning baseline" in out
    assert cli.main(["evaluate", "skab", "--data", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_text_report_has_no_dict_reprs(skab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", "skab", "--data", str(skab_dir)]) == 0  # with the ONNX variants and latency
    out = capsys.readouterr().out
    assert "latency (" in out and "config: commissioning_steps=400" in out
    assert "{" not in out and "':" not in out, out


def test_plots_writes_a_score_figure_per_file_and_the_confusion_matrix(
    skab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures"
    assert cli.main(["evaluate", "skab", "--data", str(skab_dir), "--no-quantize", "--plots", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["skab_confusion.png", "skab_roc.png", "skab_scores_other_1.png", "skab_scores_valve1_0.png"]
    for path in out.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    assert "wrote 4 figures" in capsys.readouterr().err


def test_plots_with_quantization_adds_the_int8_against_fp32_scatter(
    skab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures"
    assert cli.main(["evaluate", "skab", "--data", str(skab_dir), "--plots", str(out)]) == 0
    scatter = out / "skab_int8_vs_fp32.png"
    assert scatter.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < scatter.stat().st_size < 300_000
    assert "wrote 5 figures" in capsys.readouterr().err


def test_plots_without_matplotlib_is_a_usage_error(
    skab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pdm_tools.common import plots

    def missing() -> None:
        raise plots.PlotsUnavailable("--plots needs matplotlib: pip install 'pdm-agent[tools]'")

    monkeypatch.setattr(plots, "_pyplot", missing)
    code = cli.main(["evaluate", "skab", "--data", str(skab_dir), "--no-quantize", "--plots", str(tmp_path / "f")])
    assert code == 2 and "pip install 'pdm-agent[tools]'" in capsys.readouterr().err
