"""``pdm-agent adapt``: train one machine's LoRA adapter on the device, from a file or from InfluxDB.

    pdm-agent adapt --model models/vibration_anomaly --machine m04 --config config/agent.yaml --since 2h
    pdm-agent adapt --model models/defect_classifier --machine m04 --data confirmed.npz --out adapters/...

Data: ``--data FILE.npz`` with ``x`` (float32 feature rows in time order, one column per feature name of the
model's manifest) and, for a classifier, ``y`` (class indices or class names confirmed by a technician);
or, for an anomaly model, the machine's own feature rows that the agent stored in InfluxDB (``features``
measurement, the ``storage`` settings of ``--config``), the oldest first: its commissioning period.
The adapter goes to ``--out``, by default ``{adaptation.dir}/{model_id}/{machine}`` of ``--config``, where a
running agent with ``adaptation.enabled`` picks it up without a restart.

The adapter's shape defaults to the automatic mode's (adaptation.auto of the example config): rank 1,
alpha 2, on the first and last dense layers of the base (9 % of the shipped vibration model's file);
--layers all adapts every layer (a larger adapter, more capacity).

Exit status: 0 the adapter was written; 1 it could not be made (invalid config, InfluxDB unreachable or
without enough of the machine's windows); 2 a usage error (missing or contradictory options, a --model or
--data that cannot be read as one).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import Config, ConfigError, load_config
from agent.config.learning import AdaptationAutoSection
from agent.inference.manifest import Manifest

_DURATION = re.compile(r"^(\d+)([smhd])$")
_AUTO = AdaptationAutoSection.model_fields  # the automatic mode's defaults: one adapter shape to explain
FIRST_AND_LAST = "first,last"


class UsageError(ValueError):
    """Options that cannot work together (exit 2, like argparse's own usage errors)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "adapt",
        help="train a machine's LoRA adapter on the frozen base model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="base model directory (manifest.json + ONNX)")
    p.add_argument("--machine", required=True, help="the machine tag the adapter is for")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help=".npz with x (and y for a classifier)")
    source.add_argument("--since", help="read the machine's stored features from InfluxDB, e.g. 2h, 30m, 1d")
    p.add_argument("--limit", type=int, default=600, help="at most this many windows (default: %(default)s)")
    p.add_argument("--config", type=Path, help="agent config: InfluxDB settings and adaptation.dir")
    p.add_argument("--out", type=Path, help="adapter directory (default: {adaptation.dir}/{model_id}/{machine})")
    p.add_argument(
        "--rank",
        type=_positive_int,
        default=_AUTO["rank"].default,
        help="rank r of the low-rank factors A (fan_in x r) and B (r x fan_out): the adapter's capacity and size "
        "(default: %(default)s, as the automatic mode)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=_AUTO["alpha"].default,
        help="scale of the update, W + (alpha / rank) * A @ B (default: %(default)s)",
    )
    p.add_argument(
        "--layers",
        default=FIRST_AND_LAST,
        help="dense layers to adapt: comma-separated MatMul node names (e.g. layer0_matmul,layer3_matmul), "
        "'first,last' or 'all' (default: %(default)s)",
    )
    p.add_argument("--refit-standardization", action="store_true", help="also use the machine's own input scaling")
    p.add_argument("--seed", type=int, default=0, help="seed of the factors' initialisation and the batch order")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as exc:
        print(f"pdm-agent adapt: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, ConfigError, KeyError) as exc:
        print(f"pdm-agent adapt: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from agent.adaptation.adapt import adapt_machine
    from agent.adaptation.lora import BaseMlp, LoraConfig

    if args.data is None and args.since is None:
        raise UsageError("give --data FILE.npz or --since DURATION")
    if args.since is not None and args.config is None:
        raise UsageError("--since reads InfluxDB: give --config with the storage settings")
    if args.since is not None and not _DURATION.match(args.since):
        raise UsageError(f"--since must look like 30m, 2h or 1d, got {args.since!r}")
    if args.out is None and args.config is None:
        raise UsageError("give --out, or --config to use its adaptation.dir")
    try:
        manifest_data = json.loads((args.model / "manifest.json").read_text(encoding="utf-8"))
        manifest = Manifest.from_dict(manifest_data, str(args.model / "manifest.json"))
        base_layers = BaseMlp.from_onnx(args.model / manifest.file).layer_names
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model {args.model}: not a model directory: {exc}") from None
    layers = _layers(args.layers, base_layers)
    config = load_config(args.config) if args.config else None
    if args.data is not None:
        x, y = _from_file(args.data, manifest)
    else:
        if manifest.task != "anomaly":
            raise UsageError("a classifier adapts on technician-confirmed labels: give --data with x and y")
        assert config is not None  # checked above
        x, y = _from_influx(config, manifest, args.machine, args.since, args.limit), None
    x = x[: args.limit]
    y = None if y is None else y[: args.limit]
    if len(x) < 20:
        raise ValueError(f"only {len(x)} windows of machine {args.machine}; at least 20 are needed")
    out = args.out or _default_out(config, manifest.model_id, args.machine)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}"
    result = adapt_machine(
        args.model,
        args.machine,
        x,
        staging,
        y=y,
        config=LoraConfig(
            rank=args.rank, alpha=args.alpha, layers=layers, refit_standardization=args.refit_standardization
        ),
        seed=args.seed,
        description=f"pdm-agent adapt from {args.data or f'InfluxDB, last {args.since}'}",
    )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    size = (out / result.file).stat().st_size
    base_size = (args.model / manifest.file).stat().st_size
    summary: dict[str, Any] = {
        "machine": args.machine,
        "model_id": manifest.model_id,
        "model_version": manifest.version,
        "out": str(out),
        "windows": result.data["count"],
        "data_sha256": result.data["sha256"],
        "rank": result.rank,
        "alpha": result.alpha,
        "layers": list(result.layers),
        "held_out": result.metrics,
        "threshold": result.threshold,
        "base_threshold": manifest.threshold,
        "training_s": result.training["seconds"],
        "peak_memory_bytes": result.training["peak_memory_bytes"],
        "bytes": size,
        "base_bytes": base_size,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"adapter for machine {args.machine} of {manifest.model_id} {manifest.version}: {out}")
    print(f"  windows            : {result.data['count']} (sha256 {result.data['sha256'][:16]}...)")
    print(f"  rank / alpha       : {result.rank} / {result.alpha:g} on {', '.join(result.layers)}")
    print(f"  held-out (before)  : {_pairs(result.metrics['before'])}")
    print(f"  held-out (after)   : {_pairs(result.metrics['after'])} ({result.metrics['rows']} windows)")
    if result.threshold is not None:
        print(f"  threshold          : {result.threshold:g} (base {manifest.threshold:g})")
    print(f"  training           : {result.training['seconds']} s, peak {result.training['peak_memory_bytes']} B")
    print(f"  size               : {size} B ({100 * size / base_size:.1f} % of the base file)")
    return 0


def _pairs(values: dict[str, Any]) -> str:
    """``{"held_out_loss": 0.41}`` as ``held-out loss 0.41``: a summary line, not a dict repr."""
    return ", ".join(f"{name.removeprefix('held_out_').replace('_', ' ')} {value:g}" for name, value in values.items())


def _layers(option: str, names: tuple[str, ...]) -> tuple[str, ...] | None:
    """The layers ``--layers`` names among the base's ``names`` (None: all of them)."""
    if option == "all":
        return None
    if option == FIRST_AND_LAST:
        return (names[0], names[-1]) if len(names) > 1 else names
    chosen = tuple(part.strip() for part in option.split(",") if part.strip())
    unknown = [name for name in chosen if name not in names]
    if unknown or not chosen:
        raise UsageError(
            f"--layers: unknown layer(s) {', '.join(unknown) or '(none given)'}; the base has {', '.join(names)}"
        )
    return chosen


def _from_file(path: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data:
                raise UsageError(f"{path}: no array 'x' (feature rows)")
            x = np.asarray(data["x"], dtype=np.float32)
            y_raw = data.get("y")
    except (OSError, ValueError) as exc:  # missing, not an .npz, pickled objects
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"--data {path}: cannot read it as .npz: {exc}") from None
    if x.ndim != 2 or x.shape[1] != manifest.n_features:
        raise UsageError(f"{path}: x must have shape (n, {manifest.n_features}) for {manifest.model_id}, got {x.shape}")
    if not np.isfinite(x).all():
        raise UsageError(f"{path}: x contains NaN or infinity")
    if manifest.task == "anomaly":
        return x, None
    if y_raw is None:
        raise UsageError(f"{path}: a classifier needs labels 'y' (class indices or names)")
    names = list(manifest.class_names or ())
    if y_raw.dtype.kind in "US":
        unknown = sorted(set(y_raw.tolist()) - set(names))
        if unknown:
            raise UsageError(f"{path}: unknown classes {unknown}; the model knows {names}")
        y = np.array([names.index(v) for v in y_raw.tolist()], dtype=np.int64)
    else:
        y = np.asarray(y_raw, dtype=np.int64)
        if y.min() < 0 or y.max() >= len(names):
            raise UsageError(f"{path}: class indices must be in 0..{len(names) - 1}")
    if len(y) != len(x):
        raise UsageError(f"{path}: {len(x)} rows in x but {len(y)} labels in y")
    return x, y


def _from_influx(config: Config, manifest: Manifest, machine: str, since: str, limit: int) -> np.ndarray:
    """The machine's stored feature vectors of the last ``since``, from the local store (``agent.storage.query``:
    the local InfluxDB, whatever the upstream sinks are doing)."""
    from agent.bootstrap import build_sink
    from agent.storage.query import LocalStore, since_ns

    sink = build_sink(config)
    try:
        found = LocalStore(sink).features(
            machine, manifest.model_id, list(manifest.feature_names), since_ns(since), limit=limit
        )
    finally:
        sink.close()
    if not len(found):
        raise ValueError(f"no stored features of machine {machine} for {manifest.model_id} in the last {since}")
    return found.complete().values.astype(np.float32)


def _default_out(config: Config | None, model_id: str, machine: str) -> Path:
    if config is None:
        raise UsageError("give --out, or --config to use its adaptation.dir")
    root = config.adaptation.dir or config.spool.path.parent / "adapters"
    (root / model_id).mkdir(parents=True, exist_ok=True)
    return root / model_id / machine
