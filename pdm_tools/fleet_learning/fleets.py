"""The fleets ``fleet evaluate`` builds from a dataset: which client holds which rows.

CWRU: one client per motor load (non-IID: speed and signal differ by load), every recording split by time
into training and held-out rows. Simulator: machines of one type at different shaft speeds from the
machine simulator (``pdm_tools.simulator``), their bearing features computed as the agent does. Synthetic:
machines at different speeds with Gaussian classes, for tests (no dataset, no signal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.features.bearing import BearingFeatureSpec, bearing_features
from pdm_tools.datasets.cwru import CLASS_NAMES, NORMAL_TRAIN_HOP, Recording, cut, featurize, normal_parts, stack
from pdm_tools.fleet_learning.data import ClientData, ClientDataError
from pdm_tools.training.defect_train import HOLDOUT_FRACTION, split_by_time


@dataclass(frozen=True)
class Fleet:
    """Clients of one evaluation, and the rows of a load no client trained on (empty when none left out)."""

    clients: tuple[ClientData, ...]
    unseen_x: np.ndarray
    unseen_y: np.ndarray
    unseen_name: str = ""
    # Clients that hold only a small share of their data (``--least-data-clients``): reported one by one.
    least_data: tuple[str, ...] = ()

    def held_out(self) -> tuple[np.ndarray, np.ndarray]:
        """Every client's held-out rows, pooled."""
        return (
            np.concatenate([c.x_held for c in self.clients]),
            np.concatenate([c.y_held for c in self.clients]),
        )


def cwru_fleet(
    recordings: Sequence[Recording],
    spec: BearingFeatureSpec,
    clients: int,
    leave_out_load: int | None = None,
    least_data: int = 0,
    fraction: float = 1.0,
) -> Fleet:
    """Clients by motor load (non-IID: speed and signal differ by load), each recording split by time.

    With more clients than loads, the recordings of a load are dealt class by class to its clients (so every
    client holds every class), and the healthy piece standing for the load is split by time between them.
    CWRU has healthy data at load 0 only: as in ``pdm_tools.evaluation.cwru``, consecutive disjoint parts of
    it stand for each load. ``leave_out_load``: that load's clients are dropped and all its windows become
    the unseen rows.

    ``least_data`` clients (``least_data_choice``) train on only the first ``fraction`` of each of their
    recordings' training part (a machine that has recorded for a shorter time; at least two windows per
    recording); their held-out rows are the same as with all their data, so every model is scored on them
    alike.
    """
    faults = [r for r in recordings if r.kind != "normal"]
    normals = [r for r in recordings if r.kind == "normal"]
    loads = sorted({r.load_hp for r in faults})
    if not normals or not loads:
        raise ClientDataError("CWRU fleet needs fault recordings and a healthy recording")
    if leave_out_load is not None and leave_out_load not in loads:
        raise ClientDataError(f"--leave-out-load {leave_out_load} is not one of the loads {loads}")
    per_load = max(1, -(-clients // len(loads)))
    fewest = min(sum(1 for r in faults if r.load_hp == load and r.kind == k) for load in loads for k in CLASS_NAMES[1:])
    if clients < len(loads) or per_load > fewest:
        raise ClientDataError(
            f"--clients {clients}: CWRU gives each motor load ({len(loads)}) one to {fewest} clients "
            f"({len(loads)}..{fewest * len(loads)})"
        )
    healthy = max(normals, key=lambda r: len(r.samples))
    parts = normal_parts(healthy, len(loads))
    # Each client's healthy piece is short (CWRU: 5 s for all loads): its held-out tail gets at least five
    # windows, its head at least three.
    healthy_tail = spec.window_samples + 4 * NORMAL_TRAIN_HOP
    if len(parts[0]) // per_load < healthy_tail + spec.window_samples + 2 * NORMAL_TRAIN_HOP:
        raise ClientDataError(
            f"--clients {clients}: the healthy recording ({len(healthy.samples)} samples) is too short to give "
            f"{per_load} clients per load their own training and held-out windows"
        )
    trained_loads = [load for load in loads if load != leave_out_load]
    small = least_data_choice(trained_loads, per_load, least_data)
    if least_data and not 0 < fraction < 1:
        raise ClientDataError(f"--least-data-fraction {fraction}: must be between 0 and 1 (exclusive)")
    out: list[ClientData] = []
    unseen: list[tuple[np.ndarray, int]] = []
    for load, part in zip(loads, parts, strict=True):
        at_load = [r for r in faults if r.load_hp == load]
        pieces = np.array_split(part, per_load)
        for j in range(per_load):
            mine = [
                r for k in CLASS_NAMES[1:] for i, r in enumerate(x for x in at_load if x.kind == k) if i % per_load == j
            ]
            sources = [(r, r.samples, spec.hop_samples) for r in mine] + [(healthy, pieces[j], NORMAL_TRAIN_HOP)]
            if load == leave_out_load:
                unseen += [(featurize(spec, r, s, hop), r.label) for r, s, hop in sources]
                continue
            train, held = [], []
            for r, samples, hop in sources:
                head, tail = split_by_time(samples, max(HOLDOUT_FRACTION, healthy_tail / len(samples)))
                if f"load{load}-{j}" in small:
                    head = head[: max(round(len(head) * fraction), spec.window_samples + hop)]
                train.append((featurize(spec, r, head, hop), r.label))
                held.append((featurize(spec, r, tail, hop), r.label))
            x, y = stack(train, spec.n_features)
            xh, yh = stack(held, spec.n_features)
            out.append(ClientData(f"load{load}-{j}", x, y, xh, yh, CLASS_NAMES))
    ux, uy = stack(unseen, spec.n_features)
    return Fleet(tuple(out), ux, uy, f"load {leave_out_load}" if leave_out_load is not None else "", tuple(small))


def least_data_choice(loads: Sequence[int], per_load: int, count: int) -> list[str]:
    """Names of the ``count`` clients that keep little data: one load after the other (so two of them are at
    different loads whenever there are two loads), each load's last client first.

    >>> least_data_choice([0, 1, 2], 2, 4)
    ['load0-1', 'load1-1', 'load2-1', 'load0-0']
    """
    if not 0 <= count < len(loads) * per_load:
        raise ClientDataError(
            f"--least-data-clients {count}: must leave at least one of the {len(loads) * per_load} training "
            "clients with all its data"
        )
    return [f"load{loads[k % len(loads)]}-{per_load - 1 - k // len(loads)}" for k in range(count)]


def synthetic_fleet(
    clients: int, rows: int, seed: int, n_features: int = 8, class_names: Sequence[str] = CLASS_NAMES
) -> Fleet:
    """A fleet of machines at different speeds: each class a Gaussian cluster whose centre shifts with the
    machine's speed (non-IID like CWRU's loads), rows split in time order 85/15. Clients get different row
    counts (the first ones fewest). For tests and the robust-aggregation measurement; no dataset needed."""
    rng = np.random.default_rng(seed)
    k = len(class_names)
    centres = rng.normal(0.0, 2.0, (k, n_features))
    speed_axis = rng.normal(0.0, 1.0, n_features)
    out = []
    for c in range(clients):
        speed = 0.6 + 0.8 * c / max(1, clients - 1)  # relative shaft speed of the machine
        n = max(k * 8, int(rows * (0.4 + 1.2 * c / max(1, clients - 1))))
        y = rng.integers(0, k, n)
        x = (centres[y] * speed + speed_axis * speed + rng.normal(0.0, 1.0, (n, n_features))).astype(np.float32)
        cut_at = round(n * (1 - HOLDOUT_FRACTION))
        out.append(ClientData(f"machine{c}", x[:cut_at], y[:cut_at], x[cut_at:], y[cut_at:], tuple(class_names)))
    return Fleet(tuple(out), np.empty((0, n_features), np.float32), np.empty(0, np.int64))


# The simulator's bearing fault kind of each classifier class (``None``: healthy).
SIMULATED_KINDS = {"normal": None, "inner_race": "bearing_inner", "outer_race": "bearing_outer", "ball": "bearing_ball"}


def simulator_fleet(
    clients: int, seconds: float, seed: int, severity: float = 0.05, spec: BearingFeatureSpec | None = None
) -> Fleet:
    """A fleet of simulated pumps of one type (``fleet_profile``: small unit-to-unit differences) running at
    different shaft speeds (0.6x to 1.4x of 1,500 rpm, client by client) and holding different amounts of
    data (0.4x to 1.6x of ``seconds`` per class: the first clients least). Each client records every class:
    healthy, and each bearing defect at ``severity`` (default 0.05 of the simulator's full impact: early
    defects, which one machine's few windows do not always tell apart; at 0.1 every model scores 1.000, at
    0.02 none is useful); every recording is split by time (the last 15 %, at
    least three windows, held out) and turned into the classifier's bearing features
    (``agent.features.bearing``), at the machine's own speed."""
    from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile

    spec = spec or BearingFeatureSpec()
    out = []
    for c in range(clients):
        share = c / max(1, clients - 1)
        base = fleet_profile(c, seed)
        profile = dataclasses.replace(base, rpm=1500.0 * (0.6 + 0.8 * share))
        # At least four windows' worth, so the training and held-out parts get some windows each.
        n = max(int(seconds * (0.4 + 1.2 * share) * profile.rate_hz), 4 * spec.window_samples)
        train: list[tuple[np.ndarray, int]] = []
        held: list[tuple[np.ndarray, int]] = []
        for label, name in enumerate(CLASS_NAMES):
            kind = SIMULATED_KINDS[name]
            faults = [] if kind is None else [Fault(profile.name, kind, 0.0, severity=severity, ramp_s=0.0)]
            samples = SimulatedMachine(profile, faults, seed).vibration(0.0, n).astype(np.float64)
            head, tail = split_by_time(
                samples, max(HOLDOUT_FRACTION, (spec.window_samples + 2 * spec.hop_samples) / len(samples))
            )
            for part, rows in ((head, train), (tail, held)):
                windows = cut(part, spec.window_samples, spec.hop_samples)
                rate, rpm = np.full(len(windows), profile.rate_hz), np.full(len(windows), profile.rpm)
                rows.append((bearing_features(spec, windows, rate, rpm).astype(np.float32), label))
        x, y = stack(train, spec.n_features)
        xh, yh = stack(held, spec.n_features)
        out.append(ClientData(f"{profile.name}-{round(profile.rpm)}rpm", x, y, xh, yh, CLASS_NAMES))
    return Fleet(tuple(out), np.empty((0, spec.n_features), np.float32), np.empty(0, np.int64))
