"""Command line of the simulator (wired as ``pdm-agent simulate``): ``add_arguments`` and ``main``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pdm_tools.simulator.config import SimulatorConfig, SimulatorConfigError, load_config, replaced
from pdm_tools.simulator.gateway import Gateway
from pdm_tools.simulator.machine import FAULT_KINDS, Fault, ParameterError
from pdm_tools.simulator.publisher import GatewayError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

FAULT_SYNTAX = "MACHINE:KIND[@SENSOR]:START_S[:END_S[:SEVERITY[:RAMP_S]]]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags; flags override the values of ``--config``."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="simulator YAML file (see config/simulator.yaml); without it: 4 machines, 60 s, no faults",
    )
    parser.add_argument("--host", help="MQTT broker host (config broker.host)")
    parser.add_argument("--port", type=int, help="MQTT broker port (config broker.port)")
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="simulated seconds to run (config duration_s)"
    )
    parser.add_argument(
        "--speed",
        type=float,
        help="time acceleration: 1 = real time, 10 = ten simulated seconds per second (config speed)",
    )
    parser.add_argument("--machines", type=int, metavar="N", help="number of machines m01..mNN (config machines.count)")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help=(
            f"inject a fault, added to those of the config; repeatable. {FAULT_SYNTAX}, times in simulated"
            f" seconds, END_S empty = until the end, SEVERITY in (0, 1]. KIND: {', '.join(FAULT_KINDS)};"
            " sensor_stuck and dropout need @vibration or @process."
            " Example: m02:bearing_outer:20::0.8  m03:dropout@process:30:40"
        ),
    )
    parser.add_argument(
        "--ground-truth",
        metavar="PATH",
        help="write the injected faults as JSON lines to PATH (config ground_truth.path)",
    )
    parser.add_argument("--seed", type=int, help="random seed: same seed, same data (config seed)")
    parser.add_argument(
        "--stats-json",
        metavar="PATH",
        help="at the end, write what was published (messages, per kind and machine, unacknowledged...) as JSON",
    )


def parse_fault(spec: str) -> Fault:
    """A ``Fault`` from ``MACHINE:KIND[@SENSOR]:START_S[:END_S[:SEVERITY[:RAMP_S]]]``.

    >>> f = parse_fault("m02:dropout@process:30:40")
    >>> (f.machine, f.kind, f.sensor, f.start_s, f.end_s)
    ('m02', 'dropout', 'process', 30.0, 40.0)
    """
    parts = spec.split(":")
    if not 3 <= len(parts) <= 6:
        raise SimulatorConfigError("--fault", f"expected {FAULT_SYNTAX}, got {spec!r}")
    machine, kind_sensor, *numbers = parts
    kind, _, sensor = kind_sensor.partition("@")
    names = ("start_s", "end_s", "severity", "ramp_s")
    values: dict[str, Any] = {}
    for name, text in zip(names, numbers, strict=False):
        if text == "" and name != "start_s":
            continue
        try:
            values[name] = float(text)
        except ValueError:
            raise SimulatorConfigError("--fault", f"{name}: expected a number, got {text!r} in {spec!r}") from None
    try:
        return Fault(machine=machine, kind=kind, sensor=sensor or None, **values)
    except ParameterError as exc:
        raise SimulatorConfigError("--fault", f"{exc} in {spec!r}") from None


def build_config(args: argparse.Namespace) -> SimulatorConfig:
    """The config file (or the defaults) with the flags applied; errors name the flag or key path."""
    cfg = load_config(args.config) if args.config else SimulatorConfig()
    if args.host is not None:
        cfg = _flag("--host", lambda: replaced(cfg, broker=replaced(cfg.broker, host=args.host)))
    if args.port is not None:
        cfg = _flag("--port", lambda: replaced(cfg, broker=replaced(cfg.broker, port=args.port)))
    if args.duration is not None:
        cfg = _flag("--duration", lambda: replaced(cfg, duration_s=args.duration))
    if args.speed is not None:
        cfg = _flag("--speed", lambda: replaced(cfg, speed=args.speed))
    if args.seed is not None:
        cfg = _flag("--seed", lambda: replaced(cfg, seed=args.seed))
    if args.machines is not None:
        machines = _flag("--machines", lambda: replaced(cfg.machines, count=args.machines))
        cfg = _flag("--machines", lambda: replaced(cfg, machines=machines))
    if args.ground_truth is not None:
        gt = _flag("--ground-truth", lambda: replaced(cfg.ground_truth, path=args.ground_truth))
        cfg = _flag("--ground-truth", lambda: replaced(cfg, ground_truth=gt))
    if args.fault:
        faults = cfg.faults + tuple(parse_fault(spec) for spec in args.fault)
        cfg = _flag("--fault", lambda: replaced(cfg, faults=faults))
    return cfg


def main(args: argparse.Namespace) -> int:
    """Run the simulator: 0 when everything published was acknowledged, 2 on a bad option (usage), 1 on an
    invalid config file (as ``pdm-agent run``) or anything else."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = build_config(args)
    except SimulatorConfigError as exc:
        print(f"simulator: invalid configuration: {exc}", file=sys.stderr)
        return 2 if exc.path.startswith("--") else 1
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            stats = Gateway(cfg).run(stop)
    except GatewayError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 1
    if args.stats_json:
        path = Path(args.stats_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(stats), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if stats.unacked or stats.failed:
        print(f"simulator: {stats.unacked} messages unacknowledged, {stats.failed} failed", file=sys.stderr)
        return 1
    return 0


def _flag(flag: str, build: Callable[[], _T]) -> _T:
    try:
        return build()
    except SimulatorConfigError as exc:
        raise SimulatorConfigError(flag, str(exc)) from None


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM end the run cleanly (acknowledgements are still awaited); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
