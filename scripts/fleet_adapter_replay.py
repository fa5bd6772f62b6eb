"""Why the federated LoRA adapter was below central (docs/fleet.md): the adapter federation of ``fleet evaluate
--dataset cwru --adapters`` replayed in-process, one suspect changed at a time, scored on validation.

The replay is the federation's arithmetic without Flower: every client runs ``train_adapter`` with the seed its
ClientApp uses, the coordinator takes the row-weighted mean of the factors (FedAvg), optionally with server
momentum (Flower's FedAvgM rule). It reproduces Flower's runs (seed 42, Adam restarted: 0.8997 on the test
load, 0.9143 on the clients' held-out rows, as ``fleet evaluate`` printed). Settings are judged on the clients'
own held-out windows (validation, at their own loads); the unseen-load test rows are printed beside.

    .venv/bin/python scripts/fleet_adapter_replay.py --data ../shared/datasets/cwru --seeds 42 1 2 3
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from agent.adaptation.lora import BaseMlp, LoraWeights
from agent.features.bearing import BearingFeatureSpec
from pdm_tools.datasets.cwru import CLASS_NAMES, Recording, load_cwru
from pdm_tools.evaluation.classification import scores
from pdm_tools.fleet_learning.adapter_eval import default_federation, shift_fleet
from pdm_tools.fleet_learning.adapters import AdamMoments, AdapterFederation, train_adapter
from pdm_tools.fleet_learning.data import ClientData
from pdm_tools.models.defect_mlp import export_onnx


@dataclasses.dataclass(frozen=True)
class Variant:
    """One suspect changed: the rows' split, the optimizer's state between rounds, the server's momentum."""

    name: str
    rounds: int = 20
    local_epochs: int = 5
    keep_moments: bool = False
    momentum: float = 0.0
    split: str = "loads"  # "loads" (as fleet evaluate), "iid" (same rows shuffled), "one" (one client, all rows)


VARIANTS = (
    Variant("federated, Adam restarted every round (as it was)"),
    Variant("same rows, IID over the clients", split="iid"),
    Variant("one client with all rows, Adam restarted", split="one"),
    Variant("one client with all rows, moments kept", split="one", keep_moments=True),
    Variant("20 rounds x 10 epochs", local_epochs=10),
    Variant("40 rounds x 5 epochs", rounds=40),
    Variant("server momentum 0.7 (FedAvgM)", momentum=0.7),
    Variant("federated, each client's moments kept", keep_moments=True),
)


def replay(base: BaseMlp, clients: Sequence[ClientData], config: AdapterFederation, variant: Variant) -> LoraWeights:
    """``variant``'s fleet adapter after its rounds of row-weighted FedAvg (with server momentum if set)."""
    current = LoraWeights.initial(base, config.layers, config.rank, config.alpha, config.seed)
    moments = {c.name: AdamMoments.zeros(current) for c in clients}
    weights = np.array([len(c.y) for c in clients], np.float64) / sum(len(c.y) for c in clients)
    velocity: dict[str, list[np.ndarray]] = {}
    for rnd in range(1, variant.rounds + 1):
        trained = [
            train_adapter(
                base,
                current,
                c.x,
                c.y,
                variant.local_epochs,
                zlib.crc32(f"{c.name}/{config.seed}/{rnd}".encode()),
                config.learning_rate,
                config.batch_size,
                config.weight_decay,
                moments[c.name] if variant.keep_moments else None,
            )[0]
            for c in clients
        ]
        factors = {}
        for layer, start in current.factors.items():
            step = [
                sum(
                    w * (t.factors[layer][j] - start[j].astype(np.float64))
                    for w, t in zip(weights, trained, strict=True)
                )
                for j in (0, 1)
            ]
            if variant.momentum:
                previous = velocity.get(layer, [np.zeros_like(s) for s in step])
                step = velocity[layer] = [variant.momentum * v + s for v, s in zip(previous, step, strict=True)]
            factors[layer] = tuple((start[j].astype(np.float64) + step[j]).astype(np.float32) for j in (0, 1))
        current = dataclasses.replace(current, factors=factors)
    return current


def resplit(clients: Sequence[ClientData], split: str, seed: int) -> list[ClientData]:
    """The same training rows as ``clients`` (``split`` "loads"), shuffled over as many clients ("iid"), or all
    held by one ("one"); the held-out rows stay where they were (validation is on all of them)."""
    if split == "loads":
        return list(clients)
    x, y = np.concatenate([c.x for c in clients]), np.concatenate([c.y for c in clients])
    if split == "one":
        x_held = np.concatenate([c.x_held for c in clients])
        return [ClientData("all", x, y, x_held, np.concatenate([c.y_held for c in clients]), CLASS_NAMES)]
    parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), len(clients))
    return [
        ClientData(f"iid{i}", x[p], y[p], c.x_held, c.y_held, CLASS_NAMES)
        for i, (p, c) in enumerate(zip(parts, clients, strict=True))
    ]


def run_seed(recordings: Sequence[Recording], seed: int, clients_per_load: int) -> dict[str, tuple[float, float]]:
    """Validation and test macro-F1 of central (100 epochs) and of every variant, for one seed."""
    base_model, clients, test, _ = shift_fleet(recordings, BearingFeatureSpec(), 0.014, clients_per_load, 3)
    with tempfile.TemporaryDirectory() as tmp:
        base = BaseMlp.from_onnx(export_onnx(base_model, Path(tmp) / "base.onnx", {"model_id": "b", "version": "1"}))
    config = default_federation(20, 5, len(clients), seed)
    held = (np.concatenate([c.x_held for c in clients]), np.concatenate([c.y_held for c in clients]))

    def f1(lora: LoraWeights, rows: tuple[np.ndarray, np.ndarray]) -> float:
        return float(scores(rows[1], base.predict(rows[0], lora), len(CLASS_NAMES))["macro_f1"])

    start = LoraWeights.initial(base, config.layers, config.rank, config.alpha, seed)
    x, y = np.concatenate([c.x for c in clients]), np.concatenate([c.y for c in clients])
    lr, batch, decay = config.learning_rate, config.batch_size, config.weight_decay
    central = train_adapter(base, start, x, y, 100, seed, lr, batch, decay)[0]
    out = {"central adapter, 100 epochs": (f1(central, held), f1(central, test))}
    for variant in VARIANTS:
        lora = replay(base, resplit(clients, variant.split, seed), config, variant)
        out[variant.name] = (f1(lora, held), f1(lora, test))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the CWRU dataset folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--clients", type=int, default=6, help="clients (as fleet evaluate --clients; default 6)")
    args = parser.parse_args()
    recordings = load_cwru(args.data)
    per_load = -(-args.clients // (len({r.load_hp for r in recordings if r.kind != "normal"}) - 1))
    with threadpool_limits(limits=1, user_api="blas"):
        runs = [run_seed(recordings, seed, per_load) for seed in args.seeds]
    print(f"{'':52} validation (mean; per seed {args.seeds})   test (mean)")
    for name in runs[0]:
        val, test = [r[name][0] for r in runs], [r[name][1] for r in runs]
        print(f"{name:52} {np.mean(val):.3f} ({', '.join(f'{v:.3f}' for v in val)})   {np.mean(test):.3f}")


if __name__ == "__main__":
    main()
