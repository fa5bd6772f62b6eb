"""The UI-import variants of the dashboards (``dashboards/import``): what ``pdm_tools.dev.dashboards`` makes of
the provisioned ones, with the datasource as an input that Grafana's import dialog maps."""

from __future__ import annotations

import json
import re

import pytest

from pdm_tools.dev import dashboards

SOURCES = sorted(dashboards.SOURCE_DIR.glob("*.json"))


def test_there_is_one_import_variant_per_provisioned_dashboard() -> None:
    assert SOURCES and sorted(p.name for p in dashboards.IMPORT_DIR.glob("*.json")) == [p.name for p in SOURCES]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_the_import_variant_is_up_to_date(source) -> None:
    written = (dashboards.IMPORT_DIR / source.name).read_text(encoding="utf-8")
    assert written == dashboards.render(source, dashboards.provisioned_uid()), "run: python -m pdm_tools.dev.dashboards"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_every_datasource_reference_is_the_declared_input(source) -> None:
    text = (dashboards.IMPORT_DIR / source.name).read_text(encoding="utf-8")
    body = json.loads(text)
    declared = {i["name"] for i in body["__inputs"] if i["type"] == "datasource" and i["pluginId"] == "influxdb"}
    assert declared == {dashboards.INPUT_NAME}
    assert dashboards.provisioned_uid() not in text  # nothing left that only a provisioned Grafana has
    used = set(re.findall(r"\$\{(DS_[A-Z_]+)\}", text))
    assert used == declared
    source_refs = json.loads(source.read_text(encoding="utf-8"))
    assert text.count("${" + dashboards.INPUT_NAME + "}") == json.dumps(source_refs).count(
        f'"uid": "{dashboards.provisioned_uid()}"'
    )  # every reference replaced, none invented
