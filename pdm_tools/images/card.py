"""``MODEL_CARD.md`` of an image model, written from its manifest only (so the two cannot disagree)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.inference.manifest import Manifest
from pdm_tools.common.modelcard import CARD_FILE


def write_card(m: Manifest, model_dir: Path) -> Path:
    path = Path(model_dir) / CARD_FILE
    path.write_text(render_card(m), encoding="utf-8")
    return path


def render_card(m: Manifest) -> str:
    q: dict[str, Any] = m.quantization
    t: dict[str, Any] = m.training
    measured = q.get("measured", {})
    fp32, int8 = measured.get("fp32", {}), measured.get("int8", {})
    lat = q.get("latency", {})
    names = list(lat)
    cfg = t.get("config", {})
    lines = [
        f"# {m.model_id} {m.version}: surface defects in camera images",
        "",
        f"Classifies one grayscale frame into {len(m.class_names)} classes: {', '.join(m.class_names)}.",
        f"Shipped file: `{m.file}` (sha256 `{m.sha256[:16]}...`); chosen by the quantization gate: "
        f"{q.get('ship_reason', 'n/a')}.",
        "",
        "## Input",
        "",
        f"- A uint8 grayscale frame of any size, resized to {m.feature_spec['size']} x {m.feature_spec['size']} "
        "with an area filter and standardised per image (`agent.images.preprocess.prepare`, "
        f"spec version {m.feature_spec['version']}, hash `{m.feature_spec_hash[:16]}...`).",
        "- Graph: `image` float32 (N, 1, S, S) -> `probs` float32 (N, C), softmax inside.",
        "",
        "## Training",
        "",
        f"- Data: {t.get('data', {}).get('dataset', 'n/a')}; split {t.get('data', {}).get('images', {})} "
        f"(seeded stratified, seed {t.get('seed')}).",
        f"- Network: {_stem(int(cfg.get('space_to_depth', 1)))}"
        f"{len(cfg.get('channels', []))} x [conv 3x3, batch norm (folded at export), ReLU, max-pool], "
        f"channels {', '.join(str(c) for c in cfg.get('channels', []))}, global average pool, dense; "
        f"{t.get('parameters')} parameters.",
        f"- numpy (no framework), {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, Adam with cosine "
        f"learning rate {cfg.get('learning_rate')} -> {cfg.get('final_learning_rate')}, weight decay "
        f"{cfg.get('weight_decay')}; augmentation: random crop (78-100 % of the side), horizontal and vertical flips.",
        f"- Best validation epoch {t.get('best_epoch')} (validation accuracy {t.get('validation_accuracy', 0):.4f}); "
        f"training {t.get('train_seconds')} s on one thread.",
        "",
        f"## Test images ({measured.get('images')}: {measured.get('split', '')})",
        "",
        "| | FP32 | INT8 |",
        "|---|---|---|",
        f"| accuracy | {fp32.get('accuracy')} | {int8.get('accuracy')} |",
        f"| macro-F1 | {fp32.get('macro_f1')} | {int8.get('macro_f1')} |",
        f"| size (bytes) | {fp32.get('size_bytes')} | {int8.get('size_bytes')} |",
    ]
    for b in ("batch1", "batch16"):
        if names:
            lines.append(
                f"| p50 ms per image, {b.replace('batch', 'batch ')}, 1 thread | "
                + " | ".join(str(lat[n][b]["p50_ms"]) for n in names)
                + " |"
            )
    lines += [
        "",
        f"INT8 agrees with FP32 on {measured.get('agreement')} of the test images. CPU: {q.get('cpu', 'n/a')}.",
        "",
        "Confusion matrix of the shipped file on the test images (rows true, columns predicted, order as above):",
        "",
        "```",
        *(
            " ".join(f"{v:4d}" for v in row)
            for row in (int8 if m.file == q.get("int8_file") else fp32).get("confusion", [])
        ),
        "```",
        "",
        "## Quantization",
        "",
        f"- Recipe: {q.get('recipe', {}).get('method')} {q.get('recipe', {}).get('format')}, per-channel "
        f"{q.get('recipe', {}).get('per_channel')}, calibration {q.get('recipe', {}).get('calibration_method')} on "
        f"{q.get('recipe', {}).get('calibration_samples')} prepared training images, reduce_range "
        f"{q.get('recipe', {}).get('reduce_range')}.",
        f"- Gate: {q.get('gate', {}).get('reason')}; verdicts: "
        + "; ".join(f"{k}: {' '.join(v['reasons'])}" for k, v in q.get("gate", {}).get("verdicts", {}).items()),
        "",
        "## Known limits",
        "",
        "- Trained on the NEU database only (hot-rolled steel strip, one camera setup): another surface, "
        "lighting or lens needs images of it and retraining.",
        "- Six classes and no 'no defect' class: every frame gets one of the six labels.",
        "",
        f"Rebuild: `{t.get('command', 'pdm-agent train --model surface-defect --data DIR')}`.",
        "",
    ]
    return "\n".join(lines)


def _stem(block: int) -> str:
    """The space-to-depth stem in words (``""`` for a model built without one)."""
    if block <= 1:
        return ""
    return f"space-to-depth {block} x {block} (each {block} x {block} patch becomes {block * block} channels), then "
