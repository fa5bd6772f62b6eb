"""``pdm-agent adapt``: the automatic mode's adapter shape by default, ``--layers``, ``--json``, and exit codes
that tell a usage error (2) from an adapter that cannot be made (1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "vibration_anomaly"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Normal feature rows of the shipped vibration model (its calibration data)."""
    with np.load(MODEL / "calibration.npz") as data:
        x = data["x"][:120]
    path = tmp_path_factory.mktemp("adapt") / "rows.npz"
    np.savez(path, x=x)
    return path


def _adapt(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["adapt", "--model", str(MODEL), "--machine", "m9", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_default_adapter_has_the_automatic_modes_shape(rows: Path, tmp_path: Path, capsys) -> None:
    code, out, err = _adapt(capsys, "--data", str(rows), "--out", str(tmp_path / "a"), "--json")
    assert code == 0, err
    result = json.loads(out)
    auto = parse_config({"adaptation": {"enabled": True, "auto": {"enabled": True}}}).adaptation.auto
    assert (result["rank"], result["alpha"]) == (auto.rank, auto.alpha) == (1, 2.0)
    assert result["layers"] == ["layer0_matmul", "layer3_matmul"]  # first and last, as config/agent.yaml's auto
    assert result["bytes"] < 0.1 * result["base_bytes"]
    assert result["held_out"]["rows"] > 0 and result["threshold"] > 0


def test_layers_all_adapts_every_dense_layer(rows: Path, tmp_path: Path, capsys) -> None:
    code, out, err = _adapt(capsys, "--data", str(rows), "--out", str(tmp_path / "a"), "--layers", "all", "--json")
    assert code == 0, err
    assert json.loads(out)["layers"] == ["layer0_matmul", "layer1_matmul", "layer2_matmul", "layer3_matmul"]


def test_the_text_summary_has_no_dict_reprs(rows: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = _adapt(capsys, "--data", str(rows), "--out", str(tmp_path / "a"))
    assert code == 0
    assert "{" not in out and "held-out (after)   : loss " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "give --data FILE.npz or --since DURATION"),
        (("--since", "2h", "--out", "x"), "--since reads InfluxDB: give --config"),
        (("--data", "x.npz"), "give --out, or --config"),
        (("--data", "x.npz", "--out", "x", "--layers", "layer9_matmul"), "unknown layer(s) layer9_matmul"),
    ],
)
def test_usage_errors_exit_2(argv: tuple[str, ...], message: str, capsys) -> None:
    code, _, err = _adapt(capsys, *argv)
    assert code == 2 and message in err


def test_a_data_file_of_the_wrong_shape_or_missing_exits_2(tmp_path: Path, capsys) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((50, 3), dtype=np.float32))
    code, _, err = _adapt(capsys, "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "a"))
    assert code == 2 and "x must have shape (n, 16)" in err
    code, _, err = _adapt(capsys, "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "a"))
    assert code == 2 and "cannot read it as .npz" in err


def test_too_few_windows_exit_1(rows: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _adapt(capsys, "--data", str(rows), "--limit", "10", "--out", str(tmp_path / "a"))
    assert code == 1 and "only 10 windows of machine m9; at least 20 are needed" in err


def test_a_rank_below_one_is_refused_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        _adapt(capsys, "--data", "x.npz", "--out", "x", "--rank", "0")
    assert exited.value.code == 2
