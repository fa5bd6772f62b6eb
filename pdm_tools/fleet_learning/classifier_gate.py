"""The quantization gate for the fleet's defect classifier, as federated evaluation: the INT8 version ships only
if every client's held-out rows pass the gate's accuracy rules.

One INT8 graph for the whole fleet: the coordinator has no rows to calibrate on, so the calibration rows are
drawn from the fleet's standardization (``mean + scale * N(0, 1)``, ``CALIBRATION_ROWS`` rows, a seeded
generator: known to every party from the feature sums alone). The coordinator and every client build the
same INT8 graph from the same FP32 graph and rows (``pdm_tools.quantization.static.quantize_classifier``);
each client replies the graph's sha256, so a client that measured another graph is caught rather than
averaged in. After the last round every client runs both variants on its held-out rows and replies the
confusion counts of each and how many rows they label alike (counts only; a ``gate`` config record, since
it also carries the graph's sha256). The coordinator applies the
gate's classifier rules (``pdm_tools.quantization.gate.check``: accuracy and macro-F1 drop, agreement) to
each client and to the sum, and ships INT8 only if all pass. Latency is not judged here: it belongs to the
device and is measured by the shipping gate there (the verdict treats the latencies as equal).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, ConfigRecordValues, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from agent.inference.manifest import sha256_file
from pdm_tools.evaluation.classification import scores_from_confusion
from pdm_tools.fleet_learning.params import standardization, to_arrays
from pdm_tools.models.defect_mlp import DefectMlp, export_onnx
from pdm_tools.quantization import gate
from pdm_tools.quantization import static as q

VARIANTS = ("fp32", "int8")
CALIBRATION_ROWS = 512
INT8_FILE = "model.int8.onnx"
# A client's reply: counts, confusion matrices (flattened) and the INT8 graph's sha256.
Counts = dict[str, ConfigRecordValues]


def calibration_rows(model: DefectMlp, seed: int) -> np.ndarray:
    """The fleet's calibration rows: Gaussian about the fleet's mean with its scale (no client's row)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((CALIBRATION_ROWS, model.n_features))
    return (model.mean + model.scale * z).astype(np.float32)


def build_variants(model: DefectMlp, folder: Path, seed: int) -> dict[str, Path]:
    """``folder/model.fp32.onnx`` and ``folder/model.int8.onnx`` (static QDQ on ``calibration_rows``)."""
    fp32 = export_onnx(model, Path(folder) / "model.fp32.onnx")
    int8 = Path(folder) / INT8_FILE
    q.quantize_classifier(fp32, int8, calibration_rows(model, seed), q.QuantizeConfig())
    return {"fp32": fp32, "int8": int8}


def gate_counts(model: DefectMlp, x_held: np.ndarray, y_held: np.ndarray, seed: int) -> Counts:
    """What one client replies: per variant the confusion counts on its held-out rows (``{variant}-confusion``),
    ``agree`` (rows both variants label alike), ``rows``, ``int8-sha256``."""
    k = len(model.class_names)
    out: Counts = {}
    labels: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="pdm-fleet-gate-") as tmp:
        paths = build_variants(model, Path(tmp), seed)
        for name, path in paths.items():
            labels[name] = q.run_classifier(q.session(path), x_held).argmax(axis=1)
            confusion = np.zeros((k, k), np.int64)
            np.add.at(confusion, (np.asarray(y_held, np.int64), labels[name]), 1)
            out[f"{name}-confusion"] = confusion.ravel().tolist()
        out["int8-sha256"] = sha256_file(paths["int8"])
    out["agree"] = int((labels["fp32"] == labels["int8"]).sum())
    out["rows"] = len(y_held)
    return out


def verdict(counts: Mapping[str, Any], criteria: gate.Criteria) -> dict[str, Any]:
    """One client's (or the fleet's summed) counts as each variant's accuracy and macro-F1, INT8's deltas and
    agreement, and the gate's classifier rules on them."""
    out: dict[str, Any] = {}
    for name in VARIANTS:
        flat = np.asarray(counts[f"{name}-confusion"], np.int64)
        k = round(np.sqrt(len(flat)))
        s = scores_from_confusion(flat.reshape(k, k))
        out[name] = {"accuracy": round(s["accuracy"], 6), "macro_f1": round(s["macro_f1"], 6)}
    rows = int(counts["rows"])
    metrics = {
        "accuracy_delta_points": 100.0 * (out["int8"]["accuracy"] - out["fp32"]["accuracy"]),
        "macro_f1_delta_points": 100.0 * (out["int8"]["macro_f1"] - out["fp32"]["macro_f1"]),
        "agreement": int(counts["agree"]) / rows if rows else 1.0,
    }
    parent = gate.Measured("fp32", 32, 0, 1.0, 1.0)
    v = gate.check(gate.Measured("int8", 8, 0, 1.0, 1.0, metrics), parent, "classifier", criteria)
    out["int8_vs_fp32"] = {k: round(val, 4) for k, val in metrics.items()}
    out["rows"] = rows
    out["passed"] = v.passed
    out["reasons"] = list(v.reasons) if not v.passed else ["passes the gate's accuracy rules"]
    return out


def gate_report(
    replies: Mapping[int, Mapping[str, Any]], int8_sha256: str, criteria: gate.Criteria | None = None
) -> dict[str, Any]:
    """The gate over the clients' replies (by node id): each client's verdict, the fleet's (summed counts), and
    ``ship``: ``int8`` when every client and the fleet pass on the coordinator's own INT8 graph, else ``fp32``."""
    criteria = criteria or gate.Criteria()
    clients = {str(node): verdict(counts, criteria) for node, counts in sorted(replies.items())}
    other = sorted(str(n) for n, c in replies.items() if c.get("int8-sha256") != int8_sha256)
    for node in other:
        clients[node]["passed"] = False
        clients[node]["reasons"].append("measured another INT8 graph than the coordinator's")
    totals: dict[str, Any] = {"rows": 0, "agree": 0}
    for counts in replies.values():
        totals["rows"] += int(counts["rows"])
        totals["agree"] += int(counts["agree"])
        for name in VARIANTS:
            key = f"{name}-confusion"
            totals[key] = np.asarray(counts[key], np.int64) + totals.get(key, 0)
    fleet = verdict(totals, criteria) if replies else {"passed": False, "reasons": ["no client answered"]}
    failed = [n for n, v in clients.items() if not v["passed"]]
    ship = "int8" if replies and fleet["passed"] and not failed else "fp32"
    return {
        "ship": ship,
        "int8_sha256": int8_sha256,
        "clients": clients,
        "fleet": fleet,
        "failed_clients": failed,
        "criteria": criteria.to_dict(),
        "calibration": f"{CALIBRATION_ROWS} rows drawn from the fleet's standardization (mean + scale * N(0, 1))",
        "latency": "not judged here: measured on the shipping device",
    }


def federated_gate(grid: Grid, model: DefectMlp, seed: int, timeout_s: float) -> dict[str, Any]:
    """One more evaluate message with ``quantize`` set to every connected client; the gate over the replies
    (``gate_report``) against the coordinator's own INT8 graph of ``model``."""
    config = ConfigRecord(
        {"quantize": True, "seed": seed, "class-names": list(model.class_names), **standardization(model)}
    )
    content = RecordDict({"arrays": to_arrays(model), "config": config})
    messages = [Message(content, dst_node_id=node, message_type=MessageType.EVALUATE) for node in grid.get_node_ids()]
    replies = {
        r.metadata.src_node_id: dict(r.content.config_records["gate"])
        for r in grid.send_and_receive(messages, timeout=timeout_s)
        if not r.has_error() and "gate" in r.content.config_records
    }
    with tempfile.TemporaryDirectory(prefix="pdm-fleet-gate-") as tmp:
        int8_sha256 = sha256_file(build_variants(model, Path(tmp), seed)["int8"])
    return gate_report(replies, int8_sha256)
