"""From a finished federation to a model version the agents' registry accepts.

The fleet model is exported with the shipped classifier's own graph (``defect_mlp.export_onnx``), and its
manifest and model card carry the federation's provenance: strategy, rounds, settings, and per client the
row counts and the sha256 of its rows file (never the rows). The folder is one version directory of
``agent/inference/registry.py``: copied into an agent's ``models_dir`` (staged under ``.incoming/`` and
renamed), it is verified (sha256, feature spec, shapes, warm-up) and hot-swapped in if it is the highest
version; a version that does not verify is refused and the running one keeps scoring; removing the
directory rolls back to the highest remaining version.

With the quantization gate (``fleet serve --quantize``, ``classifier_gate``) the version ships the INT8
graph when every client's held-out rows passed the gate's accuracy rules (the FP32 graph stays beside it),
else its FP32 graph; ``quantization`` holds the gate's report either way.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.features.bearing import BearingFeatureSpec
from agent.inference.classifier import TASK, ClassifierManifest, OnnxDefectClassifier
from agent.inference.manifest import SCHEMA_VERSION, TensorInfo, sha256_file
from pdm_tools.common.graph_names import INPUT_NAME, LABEL, PROBABILITIES
from pdm_tools.common.modelcard import write_model_card
from pdm_tools.fleet_learning.classifier_gate import INT8_FILE, build_variants
from pdm_tools.fleet_learning.server_app import FederationConfig, Outcome
from pdm_tools.models.defect_mlp import DefectMlp, export_onnx
from pdm_tools.training.defect_train import MODEL_ID
from pdm_tools.training.train import FP32_FILE


def write_version(
    out_dir: Path, config: FederationConfig, outcome: Outcome, version: str, spec: BearingFeatureSpec | None = None
) -> Path:
    """Write the fleet model as the version directory ``out_dir/<model id>-<version>``; returns it after
    loading it the way an agent will (a version that would be refused fails here, not on the agents)."""
    model = outcome.model
    if model is None:
        raise ValueError("the federation has no model to ship")
    spec = spec or BearingFeatureSpec()
    if model.n_features != spec.n_features:
        raise ValueError(f"the fleet model has {model.n_features} inputs, the feature spec {spec.n_features}")
    folder = Path(out_dir) / f"{MODEL_ID}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / FP32_FILE
    export_onnx(model, onnx_path, {"model_id": MODEL_ID, "version": version, "feature_spec_hash": spec.spec_hash()})
    quantization: dict[str, Any] = {"shipped": "fp32", "note": "fleet version: the quantization gate has not run on it"}
    if outcome.gate:
        quantization = {"shipped": "fp32", "gate": outcome.gate}
    if outcome.gate.get("ship") == "int8":
        onnx_path = _int8(model, folder, config.seed, str(outcome.gate["int8_sha256"]))
        quantization["shipped"] = "int8"
    last = max(outcome.evaluation, default=0)
    manifest = ClassifierManifest(
        schema_version=SCHEMA_VERSION,
        model_id=MODEL_ID,
        version=version,
        task=TASK,
        file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        inputs=(TensorInfo(INPUT_NAME, ("batch", spec.n_features), "float32"),),
        outputs=(
            TensorInfo(PROBABILITIES, ("batch", len(model.class_names)), "float32"),
            TensorInfo(LABEL, ("batch",), "int64"),
        ),
        feature_spec=spec.to_dict(),
        feature_spec_hash=spec.spec_hash(),
        feature_names=spec.feature_names(),
        class_names=model.class_names,
        metrics={
            "federated_evaluation": {
                "rule": "the fleet model on every client's held-out rows, confusion counts summed over clients",
                **{str(k): v for k, v in sorted(outcome.evaluation.items())},
            },
            **({"final": outcome.evaluation[last]} if last else {}),
        },
        quantization=quantization,
        created_by="pdm_tools.fleet_learning (Flower federation)",
        training={"federation": provenance(config.to_dict(), outcome)},
    )
    manifest.write(folder)
    card = write_model_card(manifest, folder)
    with card.open("a", encoding="utf-8") as out:
        out.write(card_section(manifest.training["federation"]))
    loaded = OnnxDefectClassifier.load(folder)
    x = np.zeros((1, spec.n_features), np.float32) + model.mean
    # INT8 within the gate's tolerance (it agreed with FP32 on the clients' rows), FP32 to float precision.
    atol = 0.1 if quantization["shipped"] == "int8" else 1e-5
    if not np.allclose(loaded.predict_proba(x), model.predict_proba(x), atol=atol):
        raise RuntimeError(f"{onnx_path}: the exported graph does not reproduce the fleet model")
    return folder


def _int8(model: DefectMlp, folder: Path, seed: int, gated_sha256: str) -> Path:
    """The INT8 graph the clients measured, rebuilt into ``folder``; ``RuntimeError`` if it is not that graph."""
    with tempfile.TemporaryDirectory(prefix="pdm-fleet-int8-") as tmp:
        built = build_variants(model, Path(tmp), seed)["int8"]
        if sha256_file(built) != gated_sha256:
            raise RuntimeError("the INT8 graph rebuilt for shipping is not the one the clients' gate measured")
        return Path(shutil.copy2(built, folder / INT8_FILE))


def card_section(federation: dict[str, Any]) -> str:
    """The model card's account of the federation (from the manifest's ``training.federation``)."""
    lines = [
        "",
        "## Fleet learning",
        "",
        f"Trained by a Flower federation: strategy `{federation['strategy']}`, "
        f"{federation['rounds_completed']} of {federation['rounds']} rounds, {federation['local_epochs']} local "
        f"epochs per round, {len(federation['clients'])} clients. No client sent data: only parameters, "
        "feature sums and counts. Per client (rows file by sha256):",
        "",
        "| node | training rows | held-out rows | rounds trained | rounds Krum kept | data sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for c in federation["clients"]:
        # ``rounds Krum kept``: with Krum / Multi-Krum, the rounds whose aggregate used this client's update.
        lines.append(
            f"| {c['node']} | {c['rows']} | {c.get('held-out', '')} | {c['rounds_trained']} | "
            f"{c.get('rounds_kept', '–')} | {c.get('data-sha256', '')[:16]} |"
        )
    return "\n".join(lines) + "\n"


def client_entries(outcome: Outcome) -> list[dict[str, Any]]:
    """Per client of the federation: what it reported before round 1 (rows, data sha256; never data), the rounds
    its update arrived in and, with Krum or Multi-Krum, the rounds the aggregate kept it (``rounds_kept``: a
    client that is never kept is one the fleet's updates disagree with, a broken pipeline or an attacker)."""
    entries = []
    for node, facts in sorted(outcome.provenance.items()):
        entry = {"node": str(node), **facts, "rounds_trained": sum(node in p for p in outcome.participants.values())}
        if outcome.kept:
            entry["rounds_kept"] = sum(node in kept for kept in outcome.kept.values())
        entries.append(entry)
    return entries


def provenance(settings: Mapping[str, Any], outcome: Outcome) -> dict[str, Any]:
    """What produced the model: the ``settings`` (``FederationConfig.to_dict()`` or the process federation's),
    the rounds and who took part with how much data (by hash)."""
    return {
        **settings,
        "rounds_completed": len(outcome.evaluation),
        "clients": client_entries(outcome),
        "bytes_per_round": {str(k): v for k, v in sorted(outcome.bytes_per_round.items())},
        **({"privacy": outcome.privacy} if outcome.privacy else {}),
    }
