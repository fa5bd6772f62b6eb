"""Putting a fleet model version on an agent, and taking it back: two file moves the registry watches.

``install``: the version directory is verified (manifest, sha256, feature spec) before anything moves,
copied to ``models_dir/.incoming/`` (the registry ignores dot folders) and renamed into place in one step,
so the registry never sees half a copy; it then verifies it again, loads, warms up and hot-swaps it if it
is the highest version (``agent/inference/registry.py``). ``rollback``: the highest version of a model id
that verifies moves to ``models_dir/.rolled-back/``; the registry falls back to the highest that remains.
A version that arrives by other means and does not verify is refused by the registry, and the running
one keeps scoring.

``install_process``: a fleet process or vibration version (``fleet serve --model process|vibration
--version``, a template) is first specialized for the agent's machine (``process_ship.specialize``: its
commissioning baseline, read from the agent's local store as the fleet client reads it, folded into the
graph, and its own threshold) in a dot folder of ``models_dir``, then installed as above.

``install_adapter``: a fleet adapter (``fleet serve --model adapters``) verified against the agent's base
(the base's id, version and sha256, the adapter file's sha256, the layers' shapes), then one copy per machine
of the type, each staged in a dot folder of the adapter store and renamed into place
(``{adaptation.dir}/{model id}/{machine}/``), which ``AdapterStore`` picks up at its next scan.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from agent.adaptation.adapter import AdapterError, BaseIdentity, load_adapter, read_manifest, write_adapter
from agent.adaptation.lora import BaseMlp
from agent.inference.errors import ModelError
from agent.inference.manifest import MANIFEST_FILE, Manifest
from agent.inference.registry import version_key

INCOMING = ".incoming"
ROLLED_BACK = ".rolled-back"


def install(version_dir: Path, models_dir: Path) -> Path:
    """Copy a verified version directory into ``models_dir``; returns its new path. ``ModelError`` when it
    does not verify, ``FileExistsError`` when the directory name is taken."""
    version_dir, models_dir = Path(version_dir), Path(models_dir)
    manifest = Manifest.load(version_dir)
    target = models_dir / version_dir.name
    if target.exists():
        raise FileExistsError(f"{target} exists: model {manifest.model_id} {manifest.version} is installed")
    staging = models_dir / INCOMING / version_dir.name
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(version_dir, staging)
    Manifest.load(staging)  # the copy, too
    staging.rename(target)
    return target


def is_process_template(version_dir: Path) -> bool:
    """Whether ``version_dir`` is a fleet process template (its manifest has ``training.fleet_template``)."""
    from pdm_tools.fleet_learning.process_ship import TEMPLATE

    try:
        data = json.loads((Path(version_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False  # ``install`` says what is wrong with it
    return isinstance(data, dict) and TEMPLATE in (data.get("training") or {})


def install_process(template_dir: Path, models_dir: Path, agent_config: Path, machine: str, since: str) -> Path:
    """Specialize the fleet process (or vibration) template for ``machine`` (its readings of the last ``since``
    in the local store of ``agent_config``, in the template's channel order; vibration: the feature vectors the
    agent stored for it), then ``install`` it; returns its path."""
    from pdm_tools.fleet_learning.process_app import store_client
    from pdm_tools.fleet_learning.process_ship import specialize

    spec = Manifest.load(template_dir).feature_spec
    client = store_client(agent_config, machine, since, list(spec["channels"]), signal=str(spec["kind"]))
    models_dir = Path(models_dir)
    (models_dir / INCOMING).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=models_dir / INCOMING) as tmp:
        return install(specialize(Path(template_dir), client.values[0], machine, Path(tmp)), models_dir)


def rollback(models_dir: Path, model_id: str) -> tuple[str, Path]:
    """Move the highest verifying version of ``model_id`` out of the registry's sight; returns its version and
    where it went. ``LookupError`` when fewer than two versions verify (nothing to fall back to)."""
    models_dir = Path(models_dir)
    versions = []
    for path in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (path / MANIFEST_FILE).is_file():
            continue
        try:
            manifest = Manifest.load(path)
        except ModelError:
            continue
        if manifest.model_id == model_id:
            versions.append((version_key(manifest.version), manifest.version, path))
    if len(versions) < 2:
        raise LookupError(f"{models_dir}: {len(versions)} verifying version(s) of {model_id}; nothing to roll back to")
    _, version, path = max(versions)
    away = models_dir / ROLLED_BACK / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}"
    away.parent.mkdir(parents=True, exist_ok=True)
    path.rename(away)
    return version, away


def install_adapter(adapter_dir: Path, base_dir: Path, adapters_root: Path, machines: Sequence[str]) -> list[Path]:
    """Give each of ``machines`` the fleet adapter in ``adapter_dir``, verified against the base version in
    ``base_dir`` first; returns the machines' adapter folders. ``AdapterError`` when it does not fit the base
    or its file is not the manifest's, ``FileExistsError`` when a machine has an adapter already."""
    adapter_dir, adapters_root = Path(adapter_dir), Path(adapters_root)
    if not machines:
        raise ValueError("no machines to give the adapter to")
    bad = [m for m in machines if not m or m.startswith(".") or "/" in m]
    if bad:
        raise ValueError(f"machines {bad} are not folder names the adapter store reads")
    identity = BaseIdentity.from_model_dir(base_dir)
    file = Manifest.load(base_dir).file
    manifest, weights = load_adapter(adapter_dir, identity, BaseMlp.from_onnx(Path(base_dir) / file))
    folder = adapters_root / identity.model_id
    targets = [folder / machine for machine in machines]
    taken = [str(t) for t in targets if t.exists()]
    if taken:
        raise FileExistsError(f"{', '.join(taken)}: these machines have an adapter; remove it first")
    for machine, target in zip(machines, targets, strict=True):
        staging = folder / f".incoming-{machine}"
        shutil.rmtree(staging, ignore_errors=True)
        write_adapter(staging, weights, dataclasses.replace(manifest, machine=machine))
        copied = read_manifest(staging)
        if copied.sha256 != manifest.sha256:
            raise AdapterError(f"{staging}: the copy's adapter file differs from {adapter_dir}'s")
        staging.rename(target)
    return targets
