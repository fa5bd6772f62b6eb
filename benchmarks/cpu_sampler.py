"""CPU use over time of the processes of a benchmark run, from ``/proc``, every 50 ms until stopped.

    .venv/bin/python benchmarks/cpu_sampler.py /tmp/cpu.log &  # then the benchmark; kill the sampler after

Each line: wall time (s), then ``name=ticks`` for each process found (``influxd``, ``mosquitto``, ``agent``:
the ``python -m agent run`` process, ``bench``: ``benchmarks/run.py``) and for each of the agent's threads
that ran (by thread name), in clock ticks (``os.sysconf("SC_CLK_TCK")`` a second, 100 on Linux) since the
previous line. Used to line up the late alerts of the alert phase with what else took the CPU then
(docs/benchmarks.md, "The alert tail at x3.97, narrowed").
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PATTERNS = {
    "influxd": "influxd run",
    "mosquitto": "mosquitto -c",
    "agent": "-m agent run",
    "bench": "benchmarks/run.py",
}


def ticks(stat: Path) -> int | None:
    """User + system clock ticks of a process or thread (``/proc/<pid>/stat``), None once it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def find() -> dict[str, str]:
    """The pids of the processes ``PATTERNS`` names, by name."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        for name, pattern in PATTERNS.items():
            if pattern in command:
                found[name] = pid
    return found


def main(out_path: str, period_s: float = 0.05) -> None:
    procs: dict[str, str] = {}
    last: dict[str, int] = {}
    with Path(out_path).open("w", buffering=1) as out:
        while True:
            if len(procs) < len(PATTERNS):
                procs.update(find())
            row = [f"{time.time():.3f}"]
            samples = [(name, Path(f"/proc/{pid}/stat")) for name, pid in sorted(procs.items())]
            if "agent" in procs:
                task = Path(f"/proc/{procs['agent']}/task")
                for tid in os.listdir(task) if task.is_dir() else []:
                    try:
                        comm = (task / tid / "comm").read_text().strip()
                    except OSError:
                        continue
                    samples.append((f"t:{comm}:{tid}", task / tid / "stat"))
            for key, stat in samples:
                now = ticks(stat)
                if now is None:
                    continue
                before, last[key] = last.get(key), now
                if before is not None and (now - before or not key.startswith("t:")):
                    row.append(f"{key.split(':')[1] if key.startswith('t:') else key}={now - before}")
            out.write(" ".join(row) + "\n")
            time.sleep(period_s)


if __name__ == "__main__":
    main(sys.argv[1])
