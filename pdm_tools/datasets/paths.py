"""Where the public datasets are: ``--data``, else ``$PDM_DATASETS/<name>``, else ``../shared/datasets/<name>``."""

from __future__ import annotations

import os
from pathlib import Path


def dataset_dir(name: str) -> Path:
    """``$PDM_DATASETS/<name>``, else ``../shared/datasets/<name>`` from the working directory or the repo."""
    root = os.environ.get("PDM_DATASETS")
    if root:
        return Path(root) / name
    here = Path("../shared/datasets") / name
    repo = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / name
    return here if here.is_dir() or not repo.is_dir() else repo
