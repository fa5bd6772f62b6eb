"""The fleet's process autoencoder as a version of ``process-anomaly``, the agent's process anomaly model.

Two contracts meet here. The agent's process model (``agent.inference.model.OnnxAnomalyModel``) takes a
window's feature row (``agent.features.process``: per channel ``mean, std, slope, min, max, last`` of the
window's readings, in raw units), standardizes it inside the graph with one mean/scale and scores it
against one threshold from the manifest. The fleet autoencoder (``process.py``) takes a machine's smoothed z
vector: the causal mean of the last ``smoothing_steps`` readings, standardized with *that machine's*
commissioning baseline (``agent.commissioning.detector.fit_detector``), and each machine has its own
threshold (``threshold_factor`` x its largest commissioning score). The agent's commissioning scorer keeps
its baselines to itself (model ``commissioning-baseline``, no ONNX); nothing feeds them to an ONNX model.

So the shipped graph folds the machine's standardization in. With a process feature spec whose window is
``smoothing_steps`` readings, the window's ``{channel}_mean`` columns are exactly the smoothed readings, and
``(mean - baseline mean) / baseline scale`` is the smoothed z vector the fleet trained on (the mean is
linear). The graph: ``Gather`` of the ``_mean`` columns, the explicit Sub/Div standardization with the
machine's baseline, the autoencoder, the score (mean squared error over the channels: the square of the
fleet's RMS score, so the threshold is the square of the RMS threshold and every decision is the same). The
per-channel squared error is also mapped onto the feature row (``squared_error``: the ``_mean`` columns, the
other columns 0), so the agent's alert explanation names the channel.

A machine's baseline lives on its agent, and one graph has one standardization, so the version is made in
two steps:

``write_template`` (coordinator, ``fleet serve --model process --version V``): ``process-anomaly-V/``, the
    fleet autoencoder with the identity standardization (a graph on z vectors wrapped in the agent's input),
    the federation's provenance (strategy, rounds, per client the windows it trained on and the sha256 of its
    readings), the quantization gate's report and what it decided, and ``training.fleet_template``. It loads
    in the agent's registry (checked here), but it is not for scoring raw readings: its threshold is the
    largest machine threshold any client reported in the last round, on the z scale.
``specialize`` (each agent, ``fleet install V --agent-config ... --machine M``): the agent's machine's
    commissioning baseline is fitted on its first ``TRAIN_ROWS`` readings in the local store (the fleet
    client's own rule), folded into the graph, and its threshold is ``threshold_factor`` x its largest
    commissioning score under the shipped graph (INT8 or FP32): the label-free rule the federation's
    evaluation and the quantization gate measured on every client, not the old model's threshold. INT8 when
    the gate passed: built from the same recipe the gate ran on each client (calibration on the machine's own
    commissioning windows plus copies stretched 8x about their mean). The result is an ordinary version
    directory (``distribute.install`` puts it in place; the registry verifies its sha256 and hot-swaps it).

One agent, one machine per process route: the agent's routes map sensors to one model, so every machine an
agent scores with this model shares the installed machine's baseline. Agents with several machines of
different operating points need one route (and model id) per machine; not done.

The fleet's vibration autoencoder ships the same way as a version of ``vibration-anomaly`` (the spec's kind
names the model): its rows are the window's features themselves (the agent's vibration feature row, not
smoothed: ``smoothing_steps`` 1), so the graph standardizes the whole row with the machine's baseline and
needs no ``Gather``; the template's ``detector`` carries the fleet's threshold factor, derived by the
coordinator from the clients' held-out windows (``process_gate.heldout_factor``), which ``specialize`` applies
to the machine's own commissioning maximum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.commissioning.detector import DetectorConfig
from agent.features.spec import PROCESS_STATS, FeatureSpec
from agent.inference.manifest import SCHEMA_VERSION, Manifest, TensorInfo, sha256_file
from agent.inference.model import EXPLAIN_VALUE, TASK, OnnxAnomalyModel
from pdm_tools.common.graph_names import INPUT_NAME, OUTPUT_NAME
from pdm_tools.fleet_learning.ae_kinds import AE_KINDS, ae_kind
from pdm_tools.fleet_learning.process import TRAIN_ROWS, Series, smoothed_z
from pdm_tools.fleet_learning.process_gate import CALIBRATION_STRETCH
from pdm_tools.fleet_learning.server_app import Outcome
from pdm_tools.fleet_learning.ship import card_section, provenance
from pdm_tools.models.autoencoder import Autoencoder
from pdm_tools.models.export import build_onnx
from pdm_tools.quantization import static as q
from pdm_tools.training.train import FP32_FILE, INT8_FILE

MODEL_ID = AE_KINDS["process"].model_id
MODEL_IDS = {name: kind.model_id for name, kind in AE_KINDS.items()}  # by the feature spec's kind
TEMPLATE = "fleet_template"
CARD_FILE = "MODEL_CARD.md"
_CHANNEL_INPUT = "channel_means"
_CHANNEL_ERROR = "channel_squared_error"


def fleet_spec(fields: Sequence[str], hop: int = 5, detector: DetectorConfig | None = None) -> FeatureSpec:
    """The version's feature spec: process windows of ``smoothing_steps`` readings (their ``_mean`` columns
    are the smoothed readings), hop ``hop``, the fleet's channels in its order."""
    k = (detector or DetectorConfig()).smoothing_steps
    return FeatureSpec(kind="process", window_samples=k, hop_samples=hop, channels=tuple(fields))


def mean_columns(spec: FeatureSpec) -> list[int]:
    """Indices of the ``{channel}_mean`` columns in the spec's feature row."""
    names = spec.feature_names()
    return [names.index(f"{c}_{PROCESS_STATS[0]}") for c in spec.channels]


def wrap_features(proto: onnx.ModelProto, spec: FeatureSpec) -> onnx.ModelProto:
    """The channel graph ``proto`` (input ``features`` ``[batch, C]``: smoothed readings) behind the agent's
    process feature row: ``Gather`` of the ``_mean`` columns, and ``squared_error`` ``[batch, F]`` (the
    channels' squared errors on their ``_mean`` columns, 0 elsewhere) for the alert explanation."""
    graph = proto.graph
    columns = mean_columns(spec)
    f, c = spec.n_features, len(columns)
    for node in graph.node:
        renamed = {INPUT_NAME: _CHANNEL_INPUT, EXPLAIN_VALUE: _CHANNEL_ERROR}
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    for info in graph.value_info:  # shapes inferred before (the quantizer keeps them): follow the renames
        if info.name == EXPLAIN_VALUE:
            info.name = _CHANNEL_ERROR
    placement = np.zeros((c, f), np.float32)
    placement[np.arange(c), columns] = 1.0
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(columns, np.int64), "mean_columns"),
            numpy_helper.from_array(placement, "mean_placement"),
        ]
    )
    head = helper.make_node("Gather", [INPUT_NAME, "mean_columns"], [_CHANNEL_INPUT], name="select_means", axis=1)
    tail = helper.make_node("MatMul", [_CHANNEL_ERROR, "mean_placement"], [EXPLAIN_VALUE], name="place_errors")
    nodes = [head, *graph.node, tail]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", f])])
    onnx.checker.check_model(proto)
    return proto


def channel_graph(model: Autoencoder, mean: np.ndarray, scale: np.ndarray) -> Autoencoder:
    """The fleet autoencoder with the standardization ``mean``/``scale`` (raw units in, the fleet's z inside)."""
    return dataclasses.replace(
        model, mean=np.asarray(mean, np.float32).copy(), scale=np.asarray(scale, np.float32).copy()
    )


def build_graph(
    model: Autoencoder, spec: FeatureSpec, path: Path, calibration: np.ndarray | None, metadata: Mapping[str, str]
) -> Path:
    """Write the version's graph to ``path``: FP32, or INT8 (static QDQ, the gate's recipe) calibrated on the
    smoothed readings ``calibration`` ``(n, C)`` when given; the standardization and score stay float. A
    process graph is wrapped behind the agent's feature row (``wrap_features``); a vibration graph's rows are
    the feature rows."""
    with tempfile.TemporaryDirectory(prefix="pdm-fleet-process-") as tmp:
        fp32 = Path(tmp) / FP32_FILE
        fp32.write_bytes(build_onnx(model, metadata).SerializeToString())
        chosen = fp32
        if calibration is not None:
            chosen = Path(tmp) / INT8_FILE
            q.quantize(fp32, chosen, np.asarray(calibration, np.float32), q.QuantizeConfig())
        proto = onnx.load(str(chosen))
        if ae_kind(spec.kind).gathers_means:
            proto = wrap_features(proto, spec)
    path.write_bytes(proto.SerializeToString())
    return path


def gate_calibration(series: Series) -> np.ndarray:
    """The gate's calibration rows of one machine (``process_gate.gate_counts``), in z units."""
    train = series.train.astype(np.float32)
    centre = train.mean(axis=0)
    return np.concatenate([train, centre + CALIBRATION_STRETCH * (train - centre)])


def gate_ships_int8(gate: Mapping[str, Any]) -> bool:
    """Whether the fleet's quantization gate passed INT8 (no gate: FP32)."""
    return bool((gate.get("int8_vs_fp32") or {}).get("accuracy_rules_passed"))


def write_template(
    out_dir: Path,
    settings: Mapping[str, Any],
    counters: Outcome,
    model: Autoencoder,
    gate: Mapping[str, Any],
    threshold_rms: float,
    version: str,
    spec: FeatureSpec,
    detector: DetectorConfig | None = None,
    heldout: Mapping[str, Any] | None = None,
) -> Path:
    """The coordinator's ``out_dir/process-anomaly-<version>`` (or ``vibration-anomaly-<version>`` for a
    vibration spec; module docstring); returns it after loading it the way an agent's registry will.
    ``counters``: the federation's ``server_app.Outcome``; ``heldout``: how the detector's threshold factor
    came from the clients' held-out windows (``process_gate.heldout_factor``), kept in the manifest."""
    detector = detector or DetectorConfig()
    if model.n_features != len(row_names(spec)):
        raise ValueError(f"the fleet autoencoder has {model.n_features} inputs, the spec's rows {row_names(spec)}")
    if not math.isfinite(threshold_rms) or threshold_rms <= 0:
        raise ValueError(f"no machine threshold came back from the clients ({threshold_rms})")
    folder = Path(out_dir) / f"{MODEL_IDS[spec.kind]}-{version}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    identity = channel_graph(model, np.zeros(model.n_features), np.ones(model.n_features))
    path = build_graph(identity, spec, folder / FP32_FILE, None, _metadata(version, spec))
    federation = provenance(settings, counters)
    template = {
        "standardization": "identity: fleet install folds in the agent's machine's commissioning baseline",
        "detector": detector.to_dict(),
        "commissioning_readings": TRAIN_ROWS,
        "install_ships": "int8" if gate_ships_int8(gate) else "fp32",
        **({"threshold_factor_from_heldout": dict(heldout)} if heldout else {}),
    }
    manifest = _manifest(
        version,
        spec,
        path,
        threshold=threshold_rms**2,
        rule=(
            f"template: the largest machine threshold the clients reported in round "
            f"{federation['rounds_completed']} ({threshold_rms:.6g} RMS on the z scale, squared); fleet install "
            "replaces it with the machine's own"
        ),
        metrics={"federated_evaluation": _evaluation(counters)},
        quantization={"shipped": "fp32", "template": True, **({"gate": json_safe(gate)} if gate else {})},
        training={"federation": federation, TEMPLATE: template},
    )
    manifest.write(folder)
    _card(folder, manifest)
    OnnxAnomalyModel.load(folder)
    return folder


def specialize(template_dir: Path, values: np.ndarray, machine: str, out_dir: Path) -> Path:
    """The template folded with ``machine``'s baseline (its readings ``values`` ``(n, C)`` in the template's
    channel order, the first ``TRAIN_ROWS`` its commissioning) as ``out_dir/process-anomaly-<version>``;
    returns it after loading it as the agent will and checking it scores what the fleet model scores."""
    template = Manifest.load(template_dir, TASK)
    facts = template.training.get(TEMPLATE)
    if not isinstance(facts, dict):
        raise ValueError(f"{template_dir}: not a fleet process template (no training.{TEMPLATE})")
    spec = template.spec()
    assert isinstance(spec, FeatureSpec)
    detector = DetectorConfig(**facts["detector"])
    model = read_autoencoder(template_dir / template.file)
    series = smoothed_z(values, None, detector)
    assert series.mean is not None and series.scale is not None
    folded = channel_graph(model, series.mean, series.scale)
    int8 = facts["install_ships"] == "int8"
    calibration = series.mean + series.scale * gate_calibration(series) if int8 else None
    folder = Path(out_dir) / template_dir.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = build_graph(
        folded, spec, folder / (INT8_FILE if int8 else FP32_FILE), calibration, _metadata(template.version, spec)
    )
    # The machine's smoothed readings (vibration: feature rows) at every commissioning / later step, as the
    # agent's feature rows.
    parts = {"train": series.train, "test": series.test}
    rows = {part: _feature_rows(spec, series.mean + series.scale * z) for part, z in parts.items()}
    sess = q.session(path)
    scores = {part: q.run_scores(sess, x).astype(np.float64) for part, x in rows.items()}
    threshold = (detector.threshold_factor**2) * float(scores["train"].max())
    alarms = int((scores["test"] > threshold).sum())
    expected = folded.score(series.train.astype(np.float64) * series.scale + series.mean)
    if not int8 and not np.allclose(scores["train"], expected, rtol=1e-3, atol=1e-6):
        raise RuntimeError(f"{path}: the folded graph does not reproduce the fleet model on {machine}'s windows")
    machine_facts = {
        "machine": machine,
        "readings": len(values),
        "commissioning_readings": TRAIN_ROWS,
        "commissioning_windows": len(series.train),
        "data_sha256": _sha256(values),
        "baseline": {"mean": series.mean.tolist(), "scale": series.scale.tolist()},
        "template_sha256": template.sha256,
    }
    manifest = dataclasses.replace(
        template,
        file=path.name,
        sha256=sha256_file(path),
        threshold=threshold,
        threshold_rule=(
            f"{detector.threshold_factor:g}^2 x the largest score of machine {machine}'s {len(series.train)} "
            f"commissioning windows under this graph ({detector.threshold_factor:g} x the largest RMS score, "
            "squared): the fleet's per-machine rule, label-free"
            + ("; the factor from the clients' held-out windows" if "threshold_factor_from_heldout" in facts else "")
        ),
        metrics={
            **template.metrics,
            "machine": {
                "commissioning_max_score": float(scores["train"].max()),
                "later_steps": len(series.test),
                "later_steps_above_threshold": alarms,
            },
        },
        quantization={
            **{k: v for k, v in template.quantization.items() if k != "template"},
            "shipped": "int8" if int8 else "fp32",
            **({"calibration": f"{machine}'s commissioning windows, and x{CALIBRATION_STRETCH:g}"} if int8 else {}),
        },
        training={**template.training, TEMPLATE: facts, "machine": machine_facts},
        created_by=f"{template.created_by}; specialized on the agent for machine {machine}",
    )
    manifest.write(folder)
    _card(folder, manifest)
    OnnxAnomalyModel.load(folder)
    return folder


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float as ``None`` (a manifest is strict JSON; the gate's AUC is
    NaN when no client has an anomalous step, as on agents without labels)."""
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_autoencoder(path: Path) -> Autoencoder:
    """The fleet autoencoder's weights from a template's FP32 graph (``layer{i}.weight``/``.bias``)."""
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    layers = sum(1 for name in inits if name.startswith("layer") and name.endswith(".weight"))
    if not layers:
        raise ValueError(f"{path}: no autoencoder layers in the graph")
    weights = tuple(np.asarray(inits[f"layer{i}.weight"], np.float32) for i in range(layers))
    biases = tuple(np.asarray(inits[f"layer{i}.bias"], np.float32) for i in range(layers))
    n = weights[0].shape[0]
    return Autoencoder(mean=np.zeros(n, np.float32), scale=np.ones(n, np.float32), weights=weights, biases=biases)


def row_names(spec: FeatureSpec) -> list[str]:
    """What one row of the fleet autoencoder is: a process spec's channels (their smoothed readings), a
    vibration spec's features."""
    return ae_kind(spec.kind).row_names(spec)


def _feature_rows(spec: FeatureSpec, smoothed: np.ndarray) -> np.ndarray:
    """Feature rows whose ``_mean`` columns are ``smoothed`` (the graph reads nothing else); a vibration
    spec's rows are ``smoothed`` itself."""
    if not ae_kind(spec.kind).gathers_means:
        return np.asarray(smoothed, np.float32)
    x = np.zeros((len(smoothed), spec.n_features), np.float32)
    x[:, mean_columns(spec)] = smoothed
    return x


def _sha256(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes()).hexdigest()


def _metadata(version: str, spec: FeatureSpec) -> dict[str, str]:
    return {"model_id": MODEL_IDS[spec.kind], "version": version, "feature_spec_hash": spec.spec_hash()}


def _evaluation(counters: Outcome) -> dict[str, Any]:
    return {
        "rule": "the fleet model on every client's later steps, each machine at its own threshold; counts summed",
        **{str(k): v for k, v in sorted(counters.evaluation.items())},
    }


def _manifest(
    version: str,
    spec: FeatureSpec,
    path: Path,
    threshold: float,
    rule: str,
    metrics: dict[str, Any],
    quantization: dict[str, Any],
    training: dict[str, Any],
) -> Manifest:
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model_id=MODEL_IDS[spec.kind],
        version=version,
        task=TASK,
        file=path.name,
        sha256=sha256_file(path),
        inputs=(TensorInfo(INPUT_NAME, ("batch", spec.n_features), "float32"),),
        outputs=(TensorInfo(OUTPUT_NAME, ("batch",), "float32"),),
        feature_spec=spec.to_dict(),
        feature_spec_hash=spec.spec_hash(),
        feature_names=spec.feature_names(),
        threshold=threshold,
        threshold_rule=rule,
        metrics=metrics,
        quantization=quantization,
        created_by=f"pdm_tools.fleet_learning (Flower federation of the {spec.kind} autoencoder)",
        training=training,
    )


def _card(folder: Path, manifest: Manifest) -> Path:
    """A short model card from the manifest, and the federation's section (``ship.card_section``)."""
    machine = manifest.training.get("machine")
    spec = manifest.spec()
    assert isinstance(spec, FeatureSpec)
    reads = ae_kind(spec.kind).reads(spec)
    heldout = manifest.training.get(TEMPLATE, {}).get("threshold_factor_from_heldout")
    lines = [
        f"# Model card: {manifest.model_id} {manifest.version} (fleet {spec.kind} autoencoder)",
        "",
        f"Unsupervised anomaly model for {spec.kind} windows, trained by a Flower federation on every agent's own "
        "commissioning data; each machine standardized by its own commissioning baseline. Generated; do not edit.",
        "",
        f"- Shipped file: `{manifest.file}` (sha256 `{manifest.sha256}`), {manifest.quantization.get('shipped')}",
        f"- Feature spec hash: `{manifest.feature_spec_hash}`; {reads}",
        f"- Threshold: **{manifest.threshold:.6g}** ({manifest.threshold_rule})",
        *(
            [
                f"- Threshold factor {heldout['factor']:.4g} from {heldout['heldout_steps']} held-out windows of "
                f"the clients (federated evaluation): {heldout['rule']}; at most "
                f"{heldout['heldout_steps_above_at_most']} of them above it"
            ]
            if heldout
            else []
        ),
        (
            f"- Machine: {machine['machine']}, baseline from its first {machine['commissioning_readings']} readings "
            f"(sha256 of its readings `{machine['data_sha256'][:16]}`)"
            if machine
            else "- Template: fleet install folds in one machine's commissioning baseline and threshold"
        ),
    ]
    path = folder / CARD_FILE
    path.write_text("\n".join(lines) + "\n" + card_section(manifest.training["federation"]), encoding="utf-8")
    return path
