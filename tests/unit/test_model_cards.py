"""The shipped models' cards and figures (``models/*/MODEL_CARD.md``, ``models/*/figures/``) are what the
card writer makes from each model folder, so ``make models`` and ``model quantize --ship`` reproduce them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from agent.inference.manifest import Manifest
from pdm_tools.common.modelcard import CARD_FILE, FIGURES_DIR, write_model_card

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = ["vibration_anomaly", "process_anomaly", "defect_classifier"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("model", SHIPPED)
def test_every_figure_a_card_links_is_a_small_png_beside_it(model: str) -> None:
    card = (MODELS / model / CARD_FILE).read_text(encoding="utf-8")
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert linked and all(link.startswith(f"{FIGURES_DIR}/") for link in linked)
    assert sorted(linked) == sorted(f"{FIGURES_DIR}/{p.name}" for p in (MODELS / model / FIGURES_DIR).iterdir())
    for link in linked:
        data = (MODELS / model / link).read_bytes()
        width, height = png_size(data)
        assert 300 <= width <= 1000 and 300 <= height <= 1000 and len(data) < 100_000, (link, width, height)


@pytest.mark.parametrize("model", SHIPPED)
def test_card_and_figures_are_redrawn_from_the_model_folder_alone(model: str, tmp_path: Path) -> None:
    folder = tmp_path / model
    shutil.copytree(MODELS / model, folder, ignore=shutil.ignore_patterns(FIGURES_DIR, CARD_FILE, "candidates"))
    write_model_card(Manifest.load(folder), folder)
    assert (folder / CARD_FILE).read_text(encoding="utf-8") == (MODELS / model / CARD_FILE).read_text(encoding="utf-8")
    for figure in (MODELS / model / FIGURES_DIR).iterdir():  # same pictures (bytes may differ across matplotlib)
        assert png_size((folder / FIGURES_DIR / figure.name).read_bytes()) == png_size(figure.read_bytes())
