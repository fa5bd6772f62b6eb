"""`make demo`: the agent against a local broker and database, fed by the gateway simulator for about a minute.

Prints a summary (messages, readings stored, windows scored, alerts and the faults they matched) and exits
0 when the injected fault alerted and the healthy machines did not.
"""

from __future__ import annotations

import argparse
import sys

from pdm_tools.dev.demo import run_demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="simulated seconds (default: %(default)s)")
    parser.add_argument("--speed", type=float, default=1.0, help="simulation speed-up (default: real time)")
    args = parser.parse_args()
    report = run_demo(duration_s=args.duration, speed=args.speed)
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
