"""The README's InfluxDB schema table says what ``agent/schema.py`` defines: every measurement, each with its
tags and fields, and no measurement the agent does not write."""

from __future__ import annotations

import re
from pathlib import Path

from agent import schema

README = Path(__file__).resolve().parents[2] / "README.md"


def _table() -> dict[str, tuple[str, str]]:
    """measurement -> (extra tags cell, fields cell) of the README's schema table."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### InfluxDB schema") :]
    section = section[: section.index("\n## ")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([a-z_]+)`", cells[0]) if len(cells) == 4 else None
        if name:
            rows[name.group(1)] = (cells[1], cells[2])
    return rows


def _named(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


def test_every_measurement_has_a_row_and_every_row_a_measurement() -> None:
    assert set(_table()) == set(schema.MEASUREMENTS)


def test_each_row_names_the_tags_and_fields_of_its_measurement() -> None:
    table = _table()
    for measurement, (tags, fields) in schema.MEASUREMENTS.items():
        tags_cell, fields_cell = table[measurement]
        assert set(tags) <= _named(tags_cell), (measurement, tags_cell)
        named_fields = _named(fields_cell)
        for field in fields:
            if field == "*":
                continue  # named by the data: described in words
            if field.endswith("*"):
                assert any(n.startswith(field[:-1]) for n in named_fields), (measurement, field)
            else:
                assert field in named_fields, (measurement, field)
