"""``MODEL_CARD.md``: the manifest's facts written for the engineer who ships and reads the model.

One card per task (anomaly model, defect classifier), each built only from the manifest, with the same
"Quantization" section rendered from the manifest's quantization record (``pdm_tools.quantization.report``).
``pdm-agent train`` writes the cards, ``pdm-agent model quantize --ship`` rewrites them.

Beside each card, ``figures/*.png`` (``write_figures``): the shipped model, its FP32 parent and its INT8
version run on the model's own held-out rows (``eval.npz``, named in the quantization record), so the
pictures need nothing but the model folder and are redrawn whenever the card is written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.manifest import Manifest
from agent.inference.session import open_session
from pdm_tools.common import plots

logger = logging.getLogger(__name__)

CARD_FILE = "MODEL_CARD.md"
FIGURES_DIR = "figures"


@dataclass(frozen=True)
class Figure:
    """One picture of the card: its path relative to the model folder and what it shows."""

    file: str
    caption: str


_ANOMALY_LIMITS = {
    "vibration": [
        "Trained on simulated machines only (`pdm_tools.simulator`); real accelerometers add mounting "
        "resonances, cable noise and speed changes the simulator does not have. Retrain (or adapt per "
        "machine) on a few hours of the real fleet's healthy data before trusting alerts.",
        "One fleet model for nominally identical machines at one speed (about 1800 rpm) and one sampling "
        "rate (10240 Hz): a machine of another type or speed will score high without any fault.",
        "An anomaly score says *that* a window is unusual, not *which* fault it is (that is the defect "
        "classifier's job); sensor faults (stuck, dropout) are not evaluated here.",
    ],
    "process": [
        "Trained on simulated machines only (`pdm_tools.simulator`); real process values have set-point "
        "changes, start-ups and shutdowns that the simulator does not have and that will score high.",
        "A fleet model: its normal range spans the differences between machines (a few degrees C, several "
        "percent of current), so a slow drift that stays within that span on one machine (for example "
        "overheating at a quarter of the simulated full severity) is mostly not detected. Per-machine "
        "adaptation is the remedy.",
        "Windows are 30 readings at the simulator's 1 s period; another publishing period changes the "
        "meaning of `*_slope` and `*_std` and needs retraining.",
    ],
}


_CLASSIFIER_LIMITS = (
    "Trained on the CWRU test rig only (one SKF 6205 bearing type, one motor, 12 kHz, 1730-1800 rpm, "
    "artificial EDM defects of 0.007-0.028 in). The bearing geometry (defect frequency multipliers) is part "
    "of the feature spec: a machine with another bearing needs a spec with its multipliers and retraining.",
    "The same damaged bearings were recorded at every load, so the cross-load figures measure robustness to "
    "load and speed, not to new bearings, new machines or natural (spalled) defects. Leaving one defect "
    "diameter out (a new damaged bearing) drops macro-F1 to about 0.5: expect much lower accuracy on a real "
    "fleet until the model is retrained or adapted on its own labelled data. Treat the class as a hint "
    "for the technician, with its probability, not as a diagnosis.",
    "Healthy data are 5 s of one recording (load 0). The model must only be asked when the anomaly model "
    "has fired: on a healthy machine of another type it can name a defect with high probability.",
    "Classes are normal, inner_race, outer_race and ball only: imbalance, misalignment, looseness or "
    "lubrication problems are forced into one of them.",
    "The agent's simulator samples at 10240 Hz (window 0.4 s instead of 0.34 s at 12 kHz): the features "
    "take the rate and the rpm, but the resonances of another structure differ from the CWRU rig's. On the "
    "simulator's bearing faults (built with the same bearing geometry) it names outer and inner race faults "
    "reliably and ball faults mostly; that is a plumbing check, not independent evidence.",
)


def write_model_card(manifest: Manifest, model_dir: Path) -> Path:
    """Draw the figures, then write the card that links them."""
    path = Path(model_dir) / CARD_FILE
    path.write_text(render_model_card(manifest, write_figures(manifest, Path(model_dir))), encoding="utf-8")
    return path


def render_model_card(m: Manifest, figures: Sequence[Figure] = ()) -> str:
    """Markdown for one model, built only from its manifest (so the two cannot disagree) and the figures
    drawn from its folder."""
    card = _classifier_card(m) if m.task == "classifier" else _anomaly_card(m)
    if not figures:
        return card
    section = ["## Figures", ""]
    for f in figures:
        section += [f"![{f.caption}]({f.file})", "", f"*{f.caption}*", ""]
    head, limits, tail = card.partition("## Known limits")
    return head + "\n".join(section) + "\n" + limits + tail


def write_figures(m: Manifest, model_dir: Path) -> list[Figure]:
    """PNGs of the model on its held-out rows, into ``model_dir/figures``; none (with a warning) when the
    folder has no evaluation rows, no INT8 file or matplotlib is missing, so the card is written anyway.

    Anomaly model: the score histograms of healthy and faulty rows with the threshold, the ROC curve with
    the operating point, INT8 against FP32 scores. Classifier: the confusion matrix, INT8 against FP32
    class probabilities.
    """
    qz = m.quantization
    files = {
        "rows": (qz.get("evaluation") or {}).get("file"),
        "fp32": (qz.get("parent") or {}).get("file"),
        "int8": qz.get("int8_file"),
    }
    missing = [name for name, file in files.items() if not file or not (model_dir / file).is_file()]
    if missing:
        logger.warning("%s: no figures for the model card (no %s file)", model_dir, " or ".join(missing))
        return []
    try:
        plots.require()
    except plots.PlotsUnavailable as exc:
        logger.warning("%s: no figures for the model card: %s", model_dir, exc)
        return []
    with np.load(model_dir / str(files["rows"])) as data:
        x, y = data["x"], data["y"]
    folder = model_dir / FIGURES_DIR
    folder.mkdir(exist_ok=True)
    # The first output: the score of an anomaly model, the probabilities of a classifier (FP32 and INT8 alike).
    feed, output = m.inputs[0].name, m.outputs[0].name
    outputs = {
        k: open_session(model_dir / str(files[k]), threads=1).run([output], {feed: x.astype(np.float32)})[0]
        for k in ("fp32", "int8")
    }
    shipped = "int8" if m.file == files["int8"] else "fp32"
    name = f"{m.model_id} {m.version}"
    n = f"{len(y)} held-out rows"
    if m.task == "classifier":
        probs = outputs
        matrix = np.zeros((len(m.class_names),) * 2, dtype=np.int64)
        np.add.at(matrix, (y, probs[shipped].argmax(axis=1)), 1)
        agree = float(np.mean(probs["fp32"].argmax(axis=1) == probs["int8"].argmax(axis=1)))
        series = {c: (probs["fp32"][:, k], probs["int8"][:, k]) for k, c in enumerate(m.class_names)}
        plots.confusion_figure(folder / "confusion.png", f"{name} ({shipped.upper()}), {n}", matrix, m.class_names)
        plots.agreement_figure(
            folder / "int8_vs_fp32.png",
            f"{name}: INT8 vs FP32\n{n}, same class on {agree:.2%}",
            series,
            "FP32 probability",
            "INT8 probability",
        )
        return [
            Figure(f"{FIGURES_DIR}/confusion.png", f"Confusion matrix of the shipped model on the {n}"),
            Figure(f"{FIGURES_DIR}/int8_vs_fp32.png", f"INT8 against FP32 class probabilities on the {n}"),
        ]
    if m.threshold is None:
        raise ValueError(f"{model_dir}: an anomaly model without a threshold")  # Manifest.load refuses it too
    threshold = m.threshold
    scores = {k: v.astype(np.float64) for k, v in outputs.items()}
    healthy = y == 0
    groups = {"healthy": scores[shipped][healthy], "faulty": scores[shipped][~healthy]}
    plots.histogram_figure(
        folder / "scores.png", f"{name} ({shipped.upper()}), {n}", groups, threshold, "anomaly score"
    )
    plots.roc_figure(folder / "roc.png", f"{name}: score / threshold", scores[shipped] / threshold, ~healthy)
    series = {
        label: (scores["fp32"][rows] / threshold, scores["int8"][rows] / threshold)
        for label, rows in (("healthy", healthy), ("faulty", ~healthy))
    }
    plots.agreement_figure(
        folder / "int8_vs_fp32.png",
        f"{name}: INT8 vs FP32\n{n}",
        series,
        "FP32 score / threshold",
        "INT8 score / threshold",
    )
    return [
        Figure(f"{FIGURES_DIR}/scores.png", f"Scores of healthy and faulty windows against the threshold, {n}"),
        Figure(f"{FIGURES_DIR}/roc.png", f"ROC curve of score / threshold with the operating point, {n}"),
        Figure(f"{FIGURES_DIR}/int8_vs_fp32.png", f"INT8 against FP32 scores (over the threshold), {n}"),
    ]


def _anomaly_card(m: Manifest) -> str:
    """Markdown for an anomaly model."""
    t, qz, mt = m.training, m.quantization, m.metrics
    data = t.get("data", {})
    kind = m.feature_spec.get("kind", "")
    lines = [
        f"# Model card: {m.model_id} {m.version}",
        "",
        f"Unsupervised **anomaly** model for {kind} windows: a small autoencoder scores how badly it can "
        "reconstruct a window's features; a score above the threshold means the window does not look like "
        "the healthy machines it was trained on. Generated by the training command; do not edit by hand.",
        "",
        f"- Shipped file: `{m.file}` (sha256 `{m.sha256}`), {qz.get('shipped', '?')}",
        f"- Built with: `{m.created_by}`",
        f"- Feature spec hash: `{m.feature_spec_hash}`",
        f"- Threshold: **{m.threshold:g}**",
        "",
        "## Inputs",
        "",
        f"Feature spec ({kind}): window {m.feature_spec.get('window_samples')} samples, hop "
        f"{m.feature_spec.get('hop_samples')}, channels {', '.join(m.feature_spec.get('channels', []))}"
        + (
            f", band edges {', '.join(f'{e:g}' for e in m.feature_spec['band_edges_hz'])} Hz"
            if m.feature_spec.get("band_edges_hz")
            else ""
        )
        + ".",
        "",
        f"{m.n_features} features, in this order: " + ", ".join(f"`{n}`" for n in m.feature_names) + ".",
        "",
        "## Data",
        "",
        f"- Source: {data.get('source', 'n/a')}; simulator seed {data.get('simulator_seed', 'n/a')}.",
        f"- Windows: {_inline(data.get('windows', t.get('rows', {})))}; "
        f"{data.get('minutes_per_machine', '?')} simulated minutes per machine.",
        f"- Machines: {_inline(data.get('machines', {}))}.",
        f"- Splits: {data.get('splits', 'train / val as given')}.",
    ]
    fe = data.get("fault_evaluation")
    if fe:
        lines.append(
            f"- Fault evaluation: {', '.join(fe['kinds'])} at severities "
            f"{', '.join(f'{s:g}' for s in fe['severities'])} on {', '.join(fe['machines'])}, "
            f"{fe['minutes_per_machine']} min each, {fe['onset']}."
        )
    model, fit = t.get("model", {}), t.get("fit", {})
    lines += [
        "",
        "## Training",
        "",
        f"- Autoencoder {' → '.join(str(n) for n in model.get('layers', []))}, ReLU between layers, "
        f"inputs standardized with the training mean and standard deviation (inside the ONNX graph).",
        f"- Numpy Adam (lr {model.get('learning_rate')}, batch {model.get('batch_size')}, weight decay "
        f"{model.get('weight_decay')}), seed {t.get('seed')}; early stopping on the validation machines "
        f"(patience {model.get('patience')}): {fit.get('epochs_run')} epochs run, weights of epoch "
        f"{fit.get('best_epoch')} kept; train MSE {fit.get('train_mse')}, "
        f"validation MSE {fit.get('val_mse')}.",
        f"- Tools: {_inline(t.get('tools', {}))}.",
        "",
        "## Threshold",
        "",
        f"{m.threshold:g} = {m.threshold_rule}",
        "",
        "## Metrics",
        "",
        "Score quantiles of the shipped model on healthy windows:",
        "",
        "| set | n | q50 | q90 | q99 | q99.9 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, key in (("validation (threshold)", "val_scores"), ("test (unseen machines)", "test_scores")):
        s = mt.get(key)
        if s:
            lines.append(
                f"| {label} | {s['n']} | "
                + " | ".join(f"{s[k]:g}" for k in ("q50", "q90", "q99", "q99.9", "max"))
                + " |"
            )
    if "false_alarm_rate_test" in mt:
        lines += [
            "",
            f"False alarms on the healthy test windows: {mt['false_alarm_rate_test']:.4%} of windows.",
        ]
    det = mt.get("detection_rate")
    if det:
        lines += [
            "",
            "Detection at the threshold, per injected fault (`kind@severity`, windows of unseen machines):",
            "",
            "| fault | windows | detected | median score | median / threshold |",
            "|---|---|---|---|---|",
        ]
        for fault, d in det.items():
            lines.append(
                f"| {fault} | {d['windows']} | {d['rate']:.1%} | {d['median_score']:g} | "
                f"{d['median_score'] / m.threshold:.3g} |"
            )
    lines += _anomaly_quantization_section(qz, mt.get("int8_vs_fp32", {}))
    lines += ["", "## Known limits", ""]
    lines += [f"- {text}" for text in _ANOMALY_LIMITS.get(kind, [])]
    lines.append("")
    return "\n".join(lines)


def _anomaly_quantization_section(qz: dict[str, Any], diff: dict[str, Any]) -> list[str]:
    lines = _quantization_section(qz)
    if diff:
        lines += [
            "",
            f"`{qz.get('int8_file', 'model.int8.onnx')}` ({qz.get('int8_recipe', 'static INT8')}) vs FP32 scores on "
            f"{diff.get('rows')} held-out healthy windows: max |diff| {diff.get('max_abs_diff')} "
            f"({diff.get('max_abs_diff_over_threshold', 0):.1%} of the threshold), mean |diff| "
            f"{diff.get('mean_abs_diff')}, Pearson r {diff.get('pearson_r')}.",
        ]
    return lines


def _classifier_card(m: Manifest) -> str:
    """Markdown for the defect classifier."""
    mt, qz, t, spec = m.metrics, m.quantization, m.training, m.feature_spec
    top_hz = max(spec["band_edges_hz"][-1], *(hi for _, hi in spec.get("evidence_bands_hz", spec["envelope_bands_hz"])))
    lines = [
        f"# Model card: {m.model_id} {m.version}",
        "",
        "Supervised **bearing defect classifier**: given a vibration window and the shaft speed, it returns the "
        f"probabilities of {', '.join(m.class_names)}. The agent asks it when the vibration anomaly model fires "
        "and puts the most probable class into the alert. Generated by the training command; do not edit by hand.",
        "",
        f"- Shipped file: `{m.file}` (sha256 `{m.sha256}`), {str(qz.get('shipped', '?')).upper()} "
        f"({qz.get('ship_reason', '')})",
        f"- Built with: `{m.created_by}`, seed {t.get('seed')}",
        f"- Feature spec hash: `{m.feature_spec_hash}`",
        "",
        "## Inputs and outputs",
        "",
        f"{len(m.feature_names)} features (`agent.features.bearing`) of a window of {spec.get('window_samples')} "
        f"samples at any rate whose Nyquist frequency is above {top_hz:g} Hz, "
        "and the shaft speed in rpm: " + _bearing_groups(spec) + ".",
        "",
        "Outputs: `probabilities` float32 [batch, "
        + str(len(m.class_names))
        + "] in the order "
        + ", ".join(f"`{c}`" for c in m.class_names)
        + "; `label` int64 [batch] (index of the most probable class).",
        "",
        "## Training",
        "",
        f"Data: {t.get('data', {}).get('dataset')}; rows per class {t.get('rows', {}).get('per_class')} (classes "
        f"balanced by resampling); {t.get('rows', {}).get('held_out', 0)} rows held out "
        f"({t.get('rows', {}).get('held_out_rule', 'none')}). Model: MLP {t.get('model', {}).get('layers')}, ReLU, "
        f"adam, L2 {t.get('model', {}).get('alpha')}.",
        "",
        "## Evaluation (CWRU)",
        "",
    ]
    if "cross_load" in mt:
        lines += [
            "| test load (trained on the other two) | accuracy FP32 | macro-F1 FP32 | accuracy INT8 | macro-F1 INT8 |",
            "|---|---|---|---|---|",
        ]
        for load, r in mt["cross_load"]["per_test_load"].items():
            r8 = mt["cross_load_int8"]["per_test_load"][load]
            lines.append(
                f"| {load} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r8['accuracy']:.4f} | {r8['macro_f1']:.4f} |"
            )
        c3 = mt["cross_load_faults_only"]
        lines += [
            "",
            f"Fault classes alone (3 classes), cross-load mean macro-F1 {c3['mean_macro_f1']:.4f}. Random split "
            f"(optimistic; published 96.5-100 %): accuracy {mt['random_split']['accuracy']:.4f}. Largest INT8 "
            f"macro-F1 drop: {mt['int8_max_macro_f1_drop_points']:.2f} points.",
        ]
        if "cross_fault_size" in mt:
            size = mt["cross_fault_size"]
            per = ", ".join(f"{d} in: {r['macro_f1']:.2f}" for d, r in size["per_test_diameter_in"].items())
            lines += [
                "",
                "**On damaged bearings it has not seen** (leave one defect diameter out, all loads) macro-F1 is "
                f"only {size['mean_macro_f1']:.2f} on average ({per}): the cross-load figures above are high "
                "because the same damaged bearings were recorded at every load.",
            ]
        if "cross_bearing" in mt:
            cb = mt["cross_bearing"]
            lines += [
                "",
                f"Leaving one damaged bearing out (all its loads; {cb['bearings']} bearings), pooled macro-F1 is "
                f"{cb['macro_f1']:.2f}; only {cb['envelope_visible_bearings']} of the {cb['bearings']} show their "
                "defect in the envelope spectrum at all (docs/results_cwru.md).",
            ]
    else:
        lines.append("(not evaluated in this build)")
    lines += _quantization_section(qz)
    if "int8_vs_fp32_on_train_rows" in mt:
        lines += [
            "",
            f"`{qz.get('int8_file', 'model.int8.onnx')}` ({qz.get('int8_recipe', 'static INT8')}) agrees with FP32 on "
            f"{mt['int8_vs_fp32_on_train_rows']['label_agreement']:.4f} of the training rows.",
        ]
    lines += [
        "",
        "## Known limits",
        "",
        *[f"- {limit}" for limit in _CLASSIFIER_LIMITS],
        "",
    ]
    return "\n".join(lines)


def _quantization_section(qz: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the model card's "Quantization" section, from the record alone."""
    if "candidates" not in qz:
        return ["", "## Quantization", "", "(no quantization record)"]
    lat = qz["latency"]
    per = lat["per_candidate"]
    verdicts = qz["gate"]["verdicts"]
    parent, cal, ev = qz["parent"], qz["calibration"], qz.get("evaluation")
    lines = [
        "",
        "## Quantization",
        "",
        f"Shipped: **{qz['shipped']}** (`{qz['shipped_file']}`), because {qz['ship_reason']}.",
        "",
        f"- Parent: `{parent['file']}`, {parent['parameters']} parameters, {parent['macs_per_sample']} "
        f"multiply-adds per window, {parent['size_bytes']} bytes.",
        f"- Calibration: {cal['rows']} rows of `{cal.get('file') or 'given rows'}` (sha256 of the rows "
        f"`{cal['sha256'][:16]}…`).",
    ]
    if ev:
        lines.append(
            f"- Held-out evaluation: {ev['rows']} rows of `{ev.get('file') or 'given rows'}`, labels {ev['labels']} "
            f"(sha256 `{ev['sha256'][:16]}…`)."
        )
    lines += [
        f"- Latency: {lat['unit']}, batch {lat['batch']}, {lat['threads']} thread(s), {lat['runs']} runs each, on "
        f"{lat['cpu']}, in {lat.get('rounds', 1)} interleaved rounds (measured when this was built; a record of "
        "that machine, not a guarantee).",
        f"- Gate: {_criteria(qz['criteria'], qz.get('task', ''))}.",
        "",
        "| candidate | bits per layer | size (× FP32) | p50 / p99 us per window (× FP32) | "
        + ("Δaccuracy / ΔF1 points, agreement" if qz.get("task") == "classifier" else "ΔAUC, Δdetection points")
        + " | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in qz["candidates"]:
        name = c["name"]
        v = verdicts.get(name, {})
        verdict = ("**shipped**: " if name == qz["shipped"] else "") + "; ".join(v.get("reasons", []))
        if "error" in c:
            lines.append(f"| {name} | — | — | — | — | {verdict} |")
            continue
        bits = "/".join(str(layer["bits"]) for layer in c["layers"])
        p = per.get(name, {})
        lat_text = f"{p.get('p50_us', 0):.3g} / {p.get('p99_us', 0):.3g} ({p.get('p50_ratio', 0):.2f}×)"
        m = c.get("metrics", {})
        if not m:
            acc = "not measured"
        elif qz.get("task") == "classifier":
            acc = f"{m['accuracy_delta_points']:+.2f} / {m['macro_f1_delta_points']:+.2f}, {m['agreement']:.2%}"
        else:
            acc = f"{m['auc_delta']:+.4f}, {m['detection_delta_points']:+.2f}"
        lines.append(
            f"| {name} | {bits} | {c['size_bytes']} B ({c['size_ratio']:.2f}×) | {lat_text} | {acc} | {verdict} |"
        )
    lines += [
        "",
        "Per-layer error (SQNR in dB: weights / layer output against FP32 on the held-out rows, healthy rows "
        "only for an anomaly model; GPTQ trades weight SQNR for output SQNR):",
        "",
    ]
    layer_names = [layer["layer"] for layer in qz["candidates"][0]["layers"]]
    lines += ["| candidate | " + " | ".join(layer_names) + " |", "|---|" + "---|" * len(layer_names)]
    for c in qz["candidates"][1:]:
        if "error" in c:
            continue
        cells = []
        for layer in c["layers"]:
            w, o = layer.get("weight_sqnr_db"), layer.get("output_sqnr_db")
            cells.append(f"{layer['bits']}b: {_db(w)} / {_db(o)}")
        lines.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    for name, s in qz.get("sensitivity", {}).items():
        single = ", ".join(f"{k} {v:.1f}" for k, v in s["single_layer_sqnr_db"].items())
        lines += [
            "",
            f"Mixed precision `{name}`: single-layer sensitivity ({s['sensitivity_tensor']} SQNR in dB when only "
            f"that layer is quantized): {single}; rule: {s['rule']}; kept: {', '.join(s['sensitive_layers'])}.",
        ]
    return lines


def _criteria(c: Mapping[str, float], task: str) -> str:
    if task == "classifier":
        acc = (
            f"Δaccuracy and ΔF1 ≥ −{c['max_accuracy_drop_points_8bit']:g} points (8-bit) / "
            f"−{c['max_accuracy_drop_points_4bit']:g} (4-bit), agreement ≥ {c['min_agreement_8bit']:.0%} / "
            f"{c['min_agreement_4bit']:.0%}"
        )
    else:
        acc = (
            f"ΔAUC ≥ −{c['max_auc_drop']:g}, detection at the operating false-alarm rate ≥ "
            f"−{c['max_detection_drop_points']:g} points"
        )
    return (
        f"{acc}; p50 per window ≤ FP32's, overall and in every timing round; the cheapest passing candidate "
        "(p50, then size) ships"
    )


def _db(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _inline(d: Any) -> str:
    if isinstance(d, dict):
        return "; ".join(f"{k}: {_inline(v)}" for k, v in d.items())
    if isinstance(d, list | tuple):
        return ", ".join(str(v) for v in d)
    return str(d)


def _bearing_groups(spec: dict[str, Any]) -> str:
    """What a bearing feature spec's column groups are, in words (version 1: the first three groups)."""
    lines = (
        "1..3x the shaft, BPFI, BPFO, BSF and FTF frequencies ("
        + ", ".join(f"{n} {v:g}" for n, v in spec["multipliers"])
        + " x shaft speed)"
    )
    words = {
        "time": "time-domain statistics",
        "band_shares": "band power shares",
        "envelope_peaks": f"envelope-spectrum peaks at {lines}, relative to the envelope spectrum's median level",
        "envelope_evidence": f"envelope evidence: the squared envelope's lines at {lines} and their sidebands, "
        "each against its local background, of the raw and the pre-whitened window, best band of a fixed grid",
    }
    parts = [words[g] for g in spec.get("groups", ("time", "band_shares", "envelope_peaks"))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1]
