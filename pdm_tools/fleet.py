"""Move a machine, with its state, from one agent of a sharded fleet to another (``docs/scale_out.md``).

When a machine changes owner (another ``mqtt.shard`` count, other topic filters), the new owner would start
it afresh: a new commissioning (learning "normal" again, possibly on a fault) and no open alerts. This moves
the machine's state instead, between the two agents' state files, while **both agents are stopped**:

- its commissioning baselines (``commissioning_baselines.json``: collecting or fitted, per source);
- its alert state (``alert_state.json``: open events, last clears and transitions, silences, known machine).

The files stay in their formats, so the agents load them as after a restart. The target is written first,
then the source: a crash between the two leaves the state in both (the old owner no longer receives the
machine), never in neither. Refused, with nothing written: a machine without state at the source, a target
that already has state for it, baselines of another spec (the two agents must run the same commissioning
config and channels)::

    python -m pdm_tools.fleet move-machine --machine press-7 --from agent-a.yaml --to agent-b.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.commissioning.store import FORMAT as BASELINES_FORMAT
from agent.commissioning.store import FORMAT_VERSION as BASELINES_VERSION
from agent.config import Config, load_config
from agent.statefile import write_atomically


class MoveRefused(ValueError):
    """Nothing was moved; the message says why."""


@dataclass(frozen=True)
class StatePaths:
    """Where one agent keeps the state that belongs to machines."""

    alerts: Path
    baselines: Path

    @classmethod
    def of(cls, config: Config) -> StatePaths:
        state_dir = config.spool.path.parent  # the defaults, as agent.bootstrap resolves them
        return cls(
            alerts=config.alerts.state_path or state_dir / "alert_state.json",
            baselines=config.commissioning.state_path or state_dir / "commissioning_baselines.json",
        )


@dataclass(frozen=True)
class Moved:
    machine: str
    baselines: int
    alert_tracks: int
    open_events: int
    silences: int


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MoveRefused(f"{path}: unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise MoveRefused(f"{path}: not a JSON object")
    return doc


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())


def _of(entry: dict[str, Any], machine: str) -> bool:
    return ["machine", machine] in entry.get("source", [])


def _split(entries: list[dict[str, Any]], machine: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    mine = [e for e in entries if _of(e, machine)]
    return mine, [e for e in entries if not _of(e, machine)]


def move_machine(source: StatePaths, target: StatePaths, machine: str) -> Moved:
    """Move ``machine``'s baselines and alert state from ``source`` to ``target``; ``MoveRefused`` otherwise."""
    src_b, dst_b = _read(source.baselines), _read(target.baselines)
    src_a, dst_a = _read(source.alerts), _read(target.alerts)
    for path, doc in ((source.baselines, src_b), (target.baselines, dst_b)):
        if doc is not None and (doc.get("format") != BASELINES_FORMAT or doc.get("version") != BASELINES_VERSION):
            raise MoveRefused(f"{path}: not a {BASELINES_FORMAT} file of version {BASELINES_VERSION}")
    baselines, keep_b = _split(list(src_b["baselines"]) if src_b else [], machine)
    tracks, keep_t = _split(list(src_a["tracks"]) if src_a else [], machine)
    silences = [s for s in (src_a or {}).get("silences", []) if s.get("machine") == machine]
    if not baselines and not tracks and not silences:
        raise MoveRefused(f"{machine!r} has no state at the source ({source.baselines}, {source.alerts})")
    at_target = (
        _split(list((dst_b or {}).get("baselines", [])), machine)[0]
        or _split(list((dst_a or {}).get("tracks", [])), machine)[0]
    )
    if at_target:
        raise MoveRefused(f"the target already has state for {machine!r}; move nothing over it")
    if baselines and dst_b is not None and src_b is not None and dst_b.get("spec") != src_b.get("spec"):
        raise MoveRefused(
            f"baselines of spec {src_b.get('spec')!r} cannot join the target's {dst_b.get('spec')!r}: the two agents "
            "run different commissioning configs or channels"
        )
    if src_a is not None and dst_a is not None and src_a.get("version") != dst_a.get("version"):
        raise MoveRefused(f"alert state versions differ ({src_a.get('version')!r}, {dst_a.get('version')!r})")

    # Target first: a crash in between leaves the state in both places, never in neither.
    if baselines:
        assert src_b is not None
        new_dst_b = dict(dst_b) if dst_b is not None else {k: v for k, v in src_b.items() if k != "baselines"}
        new_dst_b["baselines"] = list(new_dst_b.get("baselines", [])) + baselines
        _write(target.baselines, new_dst_b)
    if tracks or silences:
        assert src_a is not None
        new_dst_a = dict(dst_a) if dst_a is not None else {"version": src_a["version"], "tracks": [], "silences": []}
        new_dst_a["tracks"] = list(new_dst_a.get("tracks", [])) + tracks
        new_dst_a["silences"] = list(new_dst_a.get("silences", [])) + silences
        new_dst_a["machines"] = sorted({*new_dst_a.get("machines", []), machine})
        _write(target.alerts, new_dst_a)
    if baselines:
        assert src_b is not None
        _write(source.baselines, {**src_b, "baselines": keep_b})
    if tracks or silences:
        assert src_a is not None
        rest = [s for s in src_a.get("silences", []) if s.get("machine") != machine]
        machines = [m for m in src_a.get("machines", []) if m != machine]
        _write(source.alerts, {**src_a, "tracks": keep_t, "silences": rest, "machines": machines})
    return Moved(
        machine=machine,
        baselines=len(baselines),
        alert_tracks=len(tracks),
        open_events=sum(1 for t in tracks if t.get("event") is not None),
        silences=len(silences),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdm_tools.fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    move = sub.add_parser("move-machine", help="move a machine's baselines and alert state (both agents stopped)")
    move.add_argument("--machine", required=True)
    move.add_argument("--from", dest="source", required=True, help="the old owner's config file")
    move.add_argument("--to", dest="target", required=True, help="the new owner's config file")
    args = parser.parse_args(argv)
    try:
        moved = move_machine(
            StatePaths.of(load_config(args.source)), StatePaths.of(load_config(args.target)), args.machine
        )
    except MoveRefused as exc:
        print(f"not moved: {exc}", file=sys.stderr)
        return 1
    print(
        f"moved {moved.machine}: {moved.baselines} baseline(s), {moved.alert_tracks} alert track(s) "
        f"({moved.open_events} open), {moved.silences} silence(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
