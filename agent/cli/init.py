"""``pdm-agent init DIR``: a working folder for a new installation.

Writes, from the files the wheel carries (``agent/assets``):

- ``DIR/agent.yaml``: the commented example config, every key with its default and meaning;
- ``DIR/agent.schema.json``: its JSON Schema, which the config's first line points editors to;
- ``DIR/models/{name}/``: the shipped models, each with its ``manifest.json`` (sha256 of the ONNX file,
  feature spec hash) and ``MODEL_CARD.md``;
- ``DIR/dashboards/``: the Grafana datasource, provider and dashboards.

In the repository the example config lives in ``config/`` beside ``models/`` (paths ``../models/...``);
here the models sit beside the config, so those relative paths are rewritten to ``models/...`` and the
spool goes to ``DIR/run/``. Existing files are kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from agent.config import json_schema

CONFIG_NAME = "agent.yaml"
SCHEMA_NAME = "agent.schema.json"
_REPO_RELATIVE = (("../models/", "models/"), ("../run/", "run/"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "init",
        help="write a commented config, the shipped models and the dashboards into a folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", type=Path, help="the folder to fill (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        written, kept = init_folder(args.dir, force=args.force)
    except OSError as exc:
        print(f"pdm-agent init: {exc}", file=sys.stderr)
        return 1
    for path in kept:
        print(f"kept {path} (exists; --force overwrites)")
    print(f"wrote {len(written)} files to {args.dir}")
    print(f"next: edit {args.dir / CONFIG_NAME} (broker, InfluxDB), then: pdm-agent run -c {args.dir / CONFIG_NAME}")
    return 0


def init_folder(target: Path, force: bool = False) -> tuple[list[Path], list[Path]]:
    """Copy the assets into ``target``; returns the files written and the existing files kept."""
    assets = resources.files("agent") / "assets"
    written: list[Path] = []
    kept: list[Path] = []

    def put(path: Path, data: bytes) -> None:
        if path.exists() and not force:
            kept.append(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)

    config = (assets / CONFIG_NAME).read_text(encoding="utf-8")
    for repo_prefix, local_prefix in _REPO_RELATIVE:
        config = config.replace(repo_prefix, local_prefix)
    put(target / CONFIG_NAME, config.encode("utf-8"))
    put(target / SCHEMA_NAME, (json.dumps(json_schema(), indent=2) + "\n").encode("utf-8"))
    for model in _children(assets / "models"):
        for name in ("manifest.json", "MODEL_CARD.md"):
            put(target / "models" / model.name / name, (model / name).read_bytes())
        for file in _children(model):
            if file.name.endswith(".onnx"):
                put(target / "models" / model.name / file.name, file.read_bytes())
            elif file.name == "figures" and file.is_dir():  # the pictures its card links
                for figure, relative in _walk(file):
                    put(target / "models" / model.name / "figures" / relative, figure.read_bytes())
    for file, relative in _walk(assets / "dashboards"):
        put(target / "dashboards" / relative, file.read_bytes())
    return written, kept


def _children(folder: Traversable) -> list[Traversable]:
    return sorted((c for c in folder.iterdir() if not c.name.startswith((".", "__"))), key=lambda c: c.name)


def _walk(folder: Traversable, relative: Path = Path()) -> list[tuple[Traversable, Path]]:
    """Every file under ``folder`` with its path relative to it."""
    out: list[tuple[Traversable, Path]] = []
    for child in _children(folder):
        if child.is_dir():
            out.extend(_walk(child, relative / child.name))
        elif child.is_file():
            out.append((child, relative / child.name))
    return out
