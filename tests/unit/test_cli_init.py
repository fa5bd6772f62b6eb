"""``pdm-agent init DIR``: a folder that ``pdm-agent run -c DIR/agent.yaml`` can use as it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent import __version__
from agent.bootstrap import build_models
from agent.cli import main
from agent.cli.init import init_folder
from agent.config import json_schema, load_config
from agent.inference.manifest import Manifest
from agent.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]


def test_init_writes_a_config_whose_models_load_from_the_folder(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "site")]) == 0
    site = tmp_path / "site"
    config = load_config(site / "agent.yaml", environ={})
    paths = [e.path for e in config.inference.models] + [config.inference.defect.path]
    assert all(p is not None and p.parent == site / "models" for p in paths)
    assert config.spool.path.parent == site / "run"
    models = build_models(config, Metrics())
    assert [m.model_id for m in models.router.models] == ["vibration-anomaly", "process-anomaly"]
    assert models.classifier is not None and models.classifier.model_id == "bearing-defect-classifier"


def test_init_writes_manifests_schema_and_dashboards(tmp_path: Path) -> None:
    written, kept = init_folder(tmp_path)
    assert not kept
    for name in ("vibration_anomaly", "process_anomaly", "defect_classifier"):
        manifest = Manifest.load(tmp_path / "models" / name)  # verifies the ONNX file's sha256
        assert (tmp_path / "models" / name / manifest.file).is_file()
        card = (tmp_path / "models" / name / "MODEL_CARD.md").read_text(encoding="utf-8")
        figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
        assert figures and all((tmp_path / "models" / name / f).is_file() for f in figures)  # no broken picture
    assert json.loads((tmp_path / "agent.schema.json").read_text()) == json.loads(json.dumps(json_schema()))
    dashboards = sorted(p.name for p in (tmp_path / "dashboards" / "json").iterdir())
    assert dashboards == ["agent_operations.json", "fleet_overview.json", "machine_detail.json"]
    assert (tmp_path / "dashboards" / "provisioning" / "datasources" / "influxdb.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "dashboards" / "import").iterdir()) == dashboards  # for UI import
    models = [m for m in (REPO / "models").iterdir() if (m / "manifest.json").is_file()]
    per_model = [2 + len(list(m.glob("*.onnx"))) + len(list(m.glob("figures/*.png"))) for m in models]
    assert len(written) == 2 + 9 + sum(per_model)  # config and schema, dashboards, models with their figures


def test_init_keeps_what_exists_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text("# mine\n")
    written, kept = init_folder(tmp_path)
    assert kept == [tmp_path / "agent.yaml"] and (tmp_path / "agent.yaml").read_text() == "# mine\n"
    written, kept = init_folder(tmp_path, force=True)
    assert not kept and (tmp_path / "agent.yaml") in written
    assert (tmp_path / "agent.yaml").read_text().startswith("# yaml-language-server")


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"pdm-agent {__version__}"
