"""Does the shipped version detect what the fleet model detects? The SKAB fleet (one client per testbed
group, Flower's simulation), its template version, and every SKAB file as one agent's machine: the template
specialized with the file's first ``TRAIN_ROWS`` readings, its readings (1 s apart) cut into windows by the
agent's windower, featurized by the agent's extraction and scored by the loaded version at the version's
threshold; against the fleet model's per-step decisions at the same steps (each window's last reading).
Point-wise confusion pooled over files, as in ``pdm_tools.evaluation.skab``.

    python -m pdm_tools.fleet_learning.process_ship_check --data ../shared/datasets/skab [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.features.extract import extract_matrix
from agent.features.spec import FeatureSpec
from agent.features.windows import Windower
from agent.inference.model import OnnxAnomalyModel
from agent.metrics import Metrics
from agent.records import NS_PER_S, Reading, Source
from pdm_tools.evaluation import skab
from pdm_tools.evaluation.skab import Confusion
from pdm_tools.fleet_learning.process import rms_score, smoothed_z
from pdm_tools.fleet_learning.process_app import ProcessFederation
from pdm_tools.fleet_learning.process_eval import simulate_process, uneven_skab_fleet
from pdm_tools.fleet_learning.process_ship import fleet_spec, specialize, write_template
from pdm_tools.fleet_learning.server_app import FederationConfig


def check(data: Path, rounds: int, seed: int) -> dict[str, object]:
    files, _ = skab.load_skab(data)
    clients, _ = uneven_skab_fleet(files)
    channels = clients[0].n_channels
    names = tuple(f"c{i}" for i in range(channels))
    config = ProcessFederation(FederationConfig(class_names=(), rounds=rounds, seed=seed), channels)
    outcome = simulate_process(clients, config)
    assert outcome.model is not None
    shipped, fleet = Confusion(), Confusion()
    windows_total = 0
    with tempfile.TemporaryDirectory(prefix="pdm-ship-check-") as tmp:
        template = write_template(
            Path(tmp),
            config.to_dict(),
            outcome.counters,
            outcome.model,
            {},
            outcome.threshold_rms_max,
            "2.0.0",
            fleet_spec(names),
        )
        for client in clients:
            for i, (values, labels) in enumerate(zip(client.values, client.labels, strict=True)):
                assert labels is not None
                version = specialize(template, values, f"{client.name}-{i}", Path(tmp) / f"{client.name}-{i}")
                model = OnnxAnomalyModel.load(version)
                windower = Windower(_fixed(model.spec), Metrics())
                source = Source.of(machine="m", sensor="process")
                cut, ends = [], []
                for t, row in enumerate(values):
                    got = windower.add(Reading(source, t * NS_PER_S, dict(zip(names, map(float, row), strict=True))))
                    cut += got
                    ends += [t] * len(got)
                later = np.array(ends) >= len(values) - len(smoothed_z(values, labels).test)  # after commissioning
                scores = model.score(extract_matrix(model.spec, cut))[later]
                end = np.array(ends)[later]
                shipped = shipped + Confusion.of(scores > model.threshold, labels[end])
                series = smoothed_z(values, labels)
                threshold = 2.4 * float(rms_score(outcome.model, series.train).max())
                k = len(values) - len(series.test) - len(series.train) + 1  # smoothing steps
                z = np.concatenate([series.train, series.test])[end - k + 1]
                fleet = fleet + Confusion.of(rms_score(outcome.model, z) > threshold, labels[end])
                windows_total += int(later.sum())
    return {
        "files": sum(len(c.values) for c in clients),
        "windows": windows_total,
        "shipped_version": shipped.to_dict(),
        "fleet_model_same_steps": fleet.to_dict(),
        "rounds": rounds,
        "seed": seed,
    }


def _fixed(spec: FeatureSpec) -> Callable[[Source], FeatureSpec | None]:
    """The windower's spec lookup for one model: every source gets ``spec``."""
    return lambda source: spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    print(json.dumps(check(args.data or skab.default_data_dir(), args.rounds, args.seed), indent=2))


if __name__ == "__main__":
    main()
