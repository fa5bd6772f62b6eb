"""Where the agent spends its time under load: py-spy on the agent subprocess, hot spots per thread.

``python benchmarks/profile_agent.py [--speed 16] [--seconds 10] [--raw-vibration MODE] [--out DIR]`` starts
Mosquitto and InfluxDB, the agent (every stage on) and the benchmark fleet published at ``speed`` x real time, samples
the agent with ``py-spy record --threads`` (``pip install py-spy``; on-CPU samples only), and prints the
functions with the most samples: self time (the leaf frame) and inclusive time, per thread.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.run import BROKER_CONF, Run  # noqa: E402
from benchmarks.workload import Fleet  # noqa: E402
from pdm_tools.dev import services as devservices  # noqa: E402

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def _short(frame: str, with_line: bool) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("/agent/", "site-packages/", "/lib/python3"):
        if marker in path:
            path = path[path.index(marker) + 1 :]
            break
    line = f":{m.group('line')}" if with_line and m.group("line") else ""
    return f"{m.group('func')} ({path}{line})"


def hot_spots(raw: str, top: int = 15) -> str:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed stack) output."""
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        self_count[_short(frames[-1], True)] += count
        for name in {_short(f, False) for f in frames[1:]}:
            incl[name] += count
    out = [f"{total} samples", "", "threads:"]
    out += [f"  {100 * c / total:5.1f} %  {t}" for t, c in threads.most_common()]
    out += ["", "self (leaf frame):"]
    out += [f"  {100 * c / total:5.1f} %  {f}" for f, c in self_count.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * c / total:5.1f} %  {f}" for f, c in incl.most_common(top * 2)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", type=float, default=16.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--machines", type=int, default=100)
    parser.add_argument("--vibration-machines", type=int, default=10)
    parser.add_argument("--idle", action="store_true", help="also sample waiting threads (where they wait)")
    parser.add_argument("--record-seconds", type=float, default=None, help="py-spy duration (default --seconds)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--raw-vibration",
        default="around_alerts",
        choices=("around_alerts", "every_n", "all", "none"),
        help="storage.raw_vibration.mode of the agent (default around_alerts, the shipped one; the ramp's)",
    )
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / "profile.raw.txt"
    with tempfile.TemporaryDirectory(prefix="pdm-prof-") as tmp:
        workdir = Path(tmp)
        broker = devservices.start_mosquitto(workdir / "mosquitto", extra_conf=BROKER_CONF)
        influx = devservices.start_influxdb_v1(workdir / "influxdb")
        try:
            fleet = Fleet(args.machines, args.vibration_machines)
            with Run((broker.host, broker.port, influx.url), workdir, "profile", fleet, raw=args.raw_vibration) as run:
                assert run.agent.process is not None
                spy = subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--threads",
                        "--subprocesses",  # the writer process too
                        "--nonblocking",
                        "-r",
                        "200",
                        "-f",
                        "raw",
                        *(["--idle"] if args.idle else []),
                        "-d",
                        str(int(args.record_seconds or args.seconds)),
                        "-o",
                        str(raw_path),
                        "-p",
                        str(run.agent.process.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                step: dict = {}
                t = threading.Thread(target=lambda: step.update(run.step(args.speed, args.seconds, drain_s=60.0)))
                t.start()
                t.join()
                spy.wait(60)
                run.finish()
        finally:
            broker.stop()
            influx.stop()
    report = hot_spots(raw_path.read_text())
    (args.out / "profile.txt").write_text(report + "\n")
    print(f"step: {step.get('published_msgs_per_s', 0):.0f} msg/s, agent CPU {step.get('agent_cpu_pct', 0):.0f} %")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
