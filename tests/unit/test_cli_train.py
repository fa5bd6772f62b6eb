"""``pdm-agent train``: never exits 0 having built nothing, and ``--json`` says what was built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main


def test_quick_with_the_defect_classifier_only_is_a_usage_error(tmp_path: Path, capsys) -> None:
    code = main(["train", "--quick", "--model", "defect-classifier", "--out", str(tmp_path)])
    assert code == 2
    assert "--quick builds the anomaly models only" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_json_lists_the_model_built(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--quick", "--model", "process-anomaly", "--json", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)  # the whole of stdout: one JSON object, no other lines
    assert [m["model"] for m in result["built"]] == ["process-anomaly"] and result["skipped"] == {}
    (built,) = result["built"]
    assert Path(built["file"]).is_file() and built["threshold"] > 0
    assert set(built["detection_rate"]) and all(0 <= r <= 1 for r in built["detection_rate"].values())
