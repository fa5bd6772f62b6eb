"""The dashboards for Grafana's UI import (Dashboards > New > Import), made from the provisioned ones.

``dashboards/json/*.json`` reference the provisioned datasource by its uid ``pdm-influxdb``; a Grafana
without that provisioning (a hosted Grafana, an existing server) cannot map it. The import variants in
``dashboards/import/`` declare the datasource as an input (``__inputs``), which the import dialog asks for,
and reference it as ``${DS_PDM_INFLUXDB}``, as Grafana's own "Export for sharing externally" does.

    python -m pdm_tools.dev.dashboards        # rewrite dashboards/import/ after editing dashboards/json/

``tests/unit/test_dashboards_import.py`` checks the files are what this module makes of the provisioned ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = ROOT / "dashboards" / "json"
IMPORT_DIR = ROOT / "dashboards" / "import"
DATASOURCE_FILE = ROOT / "dashboards" / "provisioning" / "datasources" / "influxdb.yaml"
INPUT_NAME = "DS_PDM_INFLUXDB"


def provisioned_uid() -> str:
    (source,) = yaml.safe_load(DATASOURCE_FILE.read_text(encoding="utf-8"))["datasources"]
    return str(source["uid"])


def for_import(dashboard: dict[str, Any], uid: str) -> dict[str, Any]:
    """``dashboard`` with every reference to the datasource ``uid`` made an import input."""
    panel_types = set()

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("type") == "influxdb" and node.get("uid") == uid and set(node) == {"type", "uid"}:
                return {"type": "influxdb", "uid": "${" + INPUT_NAME + "}"}
            if "gridPos" in node and isinstance(node.get("type"), str):
                panel_types.add(node["type"])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    body = walk(dashboard)
    requires = [
        {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
        {"type": "datasource", "id": "influxdb", "name": "InfluxDB", "version": "1.0.0"},
        *({"type": "panel", "id": t, "name": t, "version": ""} for t in sorted(panel_types)),
    ]
    inputs = [
        {
            "name": INPUT_NAME,
            "label": "InfluxDB (pdm-agent, InfluxQL)",
            "description": "The InfluxDB the agent writes to, queried with InfluxQL",
            "type": "datasource",
            "pluginId": "influxdb",
            "pluginName": "InfluxDB",
        }
    ]
    return {"__inputs": inputs, "__requires": requires, **body}


def render(dashboard_file: Path, uid: str) -> str:
    """The import variant of ``dashboard_file`` as the text written to ``dashboards/import/``."""
    dashboard = json.loads(dashboard_file.read_text(encoding="utf-8"))
    return json.dumps(for_import(dashboard, uid), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    uid = provisioned_uid()
    IMPORT_DIR.mkdir(exist_ok=True)
    for source in sorted(SOURCE_DIR.glob("*.json")):
        (IMPORT_DIR / source.name).write_text(render(source, uid), encoding="utf-8")
        print(f"wrote {IMPORT_DIR / source.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
