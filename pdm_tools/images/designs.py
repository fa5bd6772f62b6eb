"""INT8 against FP32 latency of candidate CNN designs, with random weights: which one can INT8 make faster?

Training one design costs minutes of CPU; whether its static INT8 graph beats the FP32 one on this CPU
does not depend on the weights. So each design is built from a seed (``Cnn.init``), exported, quantized
exactly as the build does it (static, per-channel, QDQ, minmax on a few random images, softmax in float)
and both files are timed at batch 1 and 16 on one thread with the agent's session options, in interleaved
rounds (``measure.latency``). Only a design whose ratio is well under the bar is worth training.

    python -m pdm_tools.images.designs            # the designs of docs/results_neu.md, one JSON line each

The figures describe this machine only (an AVX2 CPU without VNNI here); on a CPU with VNNI run it again.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pdm_tools.images.cnn import Cnn
from pdm_tools.images.measure import latency
from pdm_tools.quantization.static import QuantizeConfig, quantize_static_qdq

CLASSES = ("c0", "c1", "c2", "c3", "c4", "c5")
CALIBRATION_IMAGES = 16


@dataclass(frozen=True)
class Design:
    """A CNN shape: the stem's block side (1: none), the channels of the [conv 3x3, pool] blocks and the
    input side (None: the ``size`` ``measure_designs`` is given)."""

    name: str
    space_to_depth: int
    channels: tuple[int, ...]
    size: int | None = None


DESIGNS = (
    Design("shipped: 5 blocks at full resolution", 1, (8, 16, 32, 64, 128)),
    Design("wider first block", 1, (16, 16, 32, 64, 128)),
    Design("2x2 space-to-depth, 4 blocks", 2, (16, 32, 64, 128)),
    Design("4x4 space-to-depth, 3 narrow blocks", 4, (32, 64, 128)),
    Design("4x4 space-to-depth, 3 blocks 48-96-192", 4, (48, 96, 192)),
    Design("4x4 space-to-depth, 3 blocks 64-128-128 (STEM_CONFIG at 128)", 4, (64, 128, 128)),
    Design("4x4 space-to-depth, 4 blocks 64-128-128-128", 4, (64, 128, 128, 128)),
    Design("2x2 space-to-depth, 4 wide blocks 32-64-128-128", 2, (32, 64, 128, 128)),
    Design("2x2 space-to-depth, 4 wide blocks 48-96-128-128", 2, (48, 96, 128, 128)),
    Design("2x2 space-to-depth, 4 wide blocks 32-64-128-128 at 192", 2, (32, 64, 128, 128), 192),
    Design("4x4 space-to-depth, 3 blocks 64-128-128 at 160 (STEM_CONFIG)", 4, (64, 128, 128), 160),
    Design("4x4 space-to-depth, 3 blocks 64-128-128 at 192", 4, (64, 128, 128), 192),
)


def measure_designs(
    designs: Sequence[Design], size: int = 128, runs: int = 100, rounds: int = 5, seed: int = 0
) -> list[dict[str, Any]]:
    """One record per design: parameters, INT8 file size, p50 ms per image FP32/INT8 at batch 1 and 16, ratios."""
    out = []
    with tempfile.TemporaryDirectory(prefix="pdm-designs-") as tmp:
        for i, d in enumerate(designs):
            side = d.size or size
            rng = np.random.default_rng(seed)
            calibration = rng.standard_normal((CALIBRATION_IMAGES, 1, side, side)).astype(np.float32)
            x = rng.standard_normal((16, 1, side, side)).astype(np.float32)
            net = Cnn.init(d.channels, len(CLASSES), seed, d.space_to_depth)
            fp32, int8 = Path(tmp) / f"d{i}.fp32.onnx", Path(tmp) / f"d{i}.int8.onnx"
            onnx.save(net.to_onnx(side, CLASSES), str(fp32))
            config = QuantizeConfig(calibration="minmax", per_channel=True, reduce_range=True)
            quantize_static_qdq(fp32, int8, calibration, config, ["softmax"], input_name="image")
            t = latency({"fp32": fp32, "int8": int8}, x, runs=runs, rounds=rounds)
            record: dict[str, Any] = {
                "design": d.name,
                "size": side,
                "space_to_depth": d.space_to_depth,
                "channels": list(d.channels),
                "parameters": net.parameter_count,
                "int8_bytes": int8.stat().st_size,
            }
            for b in ("batch1", "batch16"):
                f, q = t["fp32"][b]["p50_ms"], t["int8"][b]["p50_ms"]
                record[b] = {"fp32_p50_ms": f, "int8_p50_ms": q, "ratio": round(q / f, 3)}
            out.append(record)
    return out


def main() -> int:
    for record in measure_designs(DESIGNS):
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
