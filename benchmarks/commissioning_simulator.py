"""False alarms and detection delay of the commissioning baseline on simulated machines.

Each of four simulated machines is commissioned on its own first 400 process readings (1 Hz), then scored
for two simulated hours: once healthy, once with an overheating fault (half severity, starting at
1200 s, growing over 600 s). Prints one row per run.

    .venv/bin/python benchmarks/commissioning_simulator.py
"""

from __future__ import annotations

import numpy as np

from agent.commissioning.baseline import CommissioningBaseline, CommissioningConfig
from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile

T0_NS = 1_790_000_000 * 10**9
HOURS = 2
ONSET_S = 1200


def run(index: int, faulty: bool) -> tuple[int, int, int | None]:
    profile = fleet_profile(index, seed=42)
    faults = [Fault(machine=profile.name, kind="overheating", start_s=ONSET_S, severity=0.5, ramp_s=600)]
    machine = SimulatedMachine(profile, faults if faulty else [], seed=index)
    baseline = CommissioningBaseline(CommissioningConfig())
    scored = anomalous = 0
    first: int | None = None
    for t in range(HOURS * 3600):
        values = machine.process(float(t))
        assert values is not None
        step = np.array([values["temperature"], values["current"], values["pressure"]])
        result = baseline.update(step, T0_NS + t * 10**9)
        if result is None:
            continue
        scored += 1
        if result.is_anomalous:
            anomalous += 1
            first = t if first is None else first
    return scored, anomalous, first


def main() -> None:
    print("| machine | run | readings scored | anomalous | first anomalous (s after onset) |")
    print("|---|---|---|---|---|")
    for index in range(4):
        for faulty in (False, True):
            scored, anomalous, first = run(index, faulty)
            delay = "-" if first is None else (f"{first - ONSET_S}" if faulty else f"{first} (false alarm)")
            print(f"| {index} | {'overheating 0.5' if faulty else 'healthy'} | {scored} | {anomalous} | {delay} |")


if __name__ == "__main__":
    main()
