"""The targets table of ``benchmarks/run.py``: each target of the data-plane issue against what this run measured.

``target_rows(result)`` returns one row per target: ``name``, ``target`` (text), ``measured`` (text: the value,
or the ratio and both sides of it), ``value`` (the number compared, or None), ``holds`` (True, False, or None
when not measured) and ``why`` (why not measured: a phase did not run, fewer than 100 alerts, a quick
run's fleet is not the target's...). Every ratio compares two rates measured side by side in the same run.
``markdown_rows`` renders them as the table that ends ``bench.md`` and the printed report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.alert_accounting import MIN_SAMPLES

T_THROUGHPUT = "agent sustained ≥ 0.8 × bare live receive"
T_DRAIN = "agent backlog drain ≥ 0.5 × bare subscriber's"
T_WRITER = "agent spool + writer ≥ 0.9 × bare writer"
T_LOSS = "every reading and raw sample stored (the ramp)"
HEADLINE_ALERT_MODE = "around_alerts"  # the shipped raw_vibration mode: the alert targets are judged on it
RSS_TARGET_MACHINES = 1000


def _row(
    name: str,
    target: str,
    value: float | bool | None,
    measured: str,
    test: Callable[[Any], bool],
    why: str | None = None,
) -> dict[str, Any]:
    if why is not None or value is None:
        why = why or "no value"
        return {"name": name, "target": target, "measured": measured, "value": None, "holds": None, "why": why}
    return {"name": name, "target": target, "measured": measured, "value": value, "holds": bool(test(value))}


def _n(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _not_run(phases: str) -> str:
    return f"phase {phases} not run"


def target_rows(result: dict[str, Any], memory_flat: bool | None = None) -> list[dict[str, Any]]:
    """The rows; ``memory_flat`` is the scaling series' verdict (``run._rss_slope_flat``), None without one."""
    rows = [*_vibration_mix(result), *_burst(result), *_alerts(result), *_memory(result, memory_flat)]
    for row in rows:
        row.setdefault("why", None)
    return rows


def _vibration_mix(result: dict[str, Any]) -> list[dict[str, Any]]:
    limits = result.get("limits") or {}
    thr = result.get("throughput")
    rows = []
    bare = limits.get("bare_receive") or {}
    if thr is None or not bare:
        why = _not_run("throughput and limits")
        rows.append(_row("throughput_ge_0.8_bare_receive", T_THROUGHPUT, None, "", bool, why))
        rows.append(_row("backlog_drain_ge_0.5_bare_backlog", T_DRAIN, None, "", bool, why))
    else:
        best = thr.get("max_sustained") or {}
        agent = best.get("published_msgs_per_s", 0.0)
        live = bare.get("receive_msgs_per_s")
        rows.append(
            _row(
                "throughput_ge_0.8_bare_receive",
                T_THROUGHPUT,
                agent / live if live else None,
                f"{agent / live:.2f} ({_n(agent)} vs {_n(live)} msg/s)" if live else "",
                lambda r: r >= 0.8,
                None if live else "bare receive rate missing",
            )
        )
        # The agent's drain is timed as the bare subscriber's: the same number of messages queued at the broker
        # while it was away (``Run.backlog_drain``). The ramp's drains after a failed step (still in its table)
        # exist only when the publisher outruns the agent, which a faster agent on the same two cores prevents.
        drain = thr.get("backlog_drain") or {}
        agent_drain = drain.get("msgs_per_s")
        bare_drain = (bare.get("backlog") or {}).get("receive_msgs_per_s")
        why = None
        if not agent_drain:
            why = drain.get("not_measured") or "no backlog drain in this result"
        elif not bare_drain:
            why = "bare backlog drain missing"
        rows.append(
            _row(
                "backlog_drain_ge_0.5_bare_backlog",
                T_DRAIN,
                agent_drain / bare_drain if agent_drain and bare_drain else None,
                f"{agent_drain / bare_drain:.2f} ({_n(agent_drain)} vs {_n(bare_drain)} msg/s)"
                if agent_drain and bare_drain
                else "",
                lambda r: r >= 0.5,
                why,
            )
        )
    influx = limits.get("influx") or {}
    writer, bare_writer = influx.get("spool_writer_points_per_s"), influx.get("bare_points_per_s")
    rows.append(
        _row(
            "writer_ge_0.9_bare_writer",
            T_WRITER,
            writer / bare_writer if writer and bare_writer else None,
            f"{writer / bare_writer:.2f} ({_n(writer)} vs {_n(bare_writer)} points/s)"
            if writer and bare_writer
            else "",
            lambda r: r >= 0.9,
            None if writer and bare_writer else (_not_run("limits") if not influx else "writer rates missing"),
        )
    )
    if thr is None:
        rows.append(_row("zero_loss_vibration_mix", T_LOSS, None, "", bool, _not_run("throughput")))
    else:
        fin = thr["final"]
        if fin.get("raw_vibration", "every_n") == "every_n":
            raw = f"{fin['samples_stored']:,}/{fin['samples_expected']:,} raw samples (every_n)"
        else:
            raw = (
                f"{fin['samples_stored']:,} raw samples stored of {fin.get('raw_released', 0):,.0f} released by "
                f"alerts, {fin.get('raw_missing', 0):,.0f} missing ({fin['raw_vibration']})"
            )
        rows.append(
            _row(
                "zero_loss_vibration_mix",
                T_LOSS,
                bool(fin["zero_loss"]),
                f"{fin['readings_stored']:,}/{fin['readings_published']:,} readings, {raw}",
                bool,
            )
        )
    return rows


def _burst(result: dict[str, Any]) -> list[dict[str, Any]]:
    b = result.get("burst")
    names = ("burst_ge_0.9_bare_batcher", "burst_zero_loss_no_duplicates")
    target_ratio = "agent ≥ 0.9 × bare batcher (readings/s until all stored)"
    target_loss = "every reading stored once, every attempt"
    if b and "error" in b:
        why = f"the phase failed: {b['error'][:200]}"
        return [_row(names[0], target_ratio, None, "", bool, why), _row(names[1], target_loss, None, "", bool, why)]
    if not b:
        return [
            _row(names[0], target_ratio, None, "", bool, _not_run("burst")),
            _row(names[1], target_loss, None, "", bool, _not_run("burst")),
        ]
    n = b["messages"]
    agent, bare = b["agent"], b["bare"]
    size = f"burst of {n:,}, best of {b['attempts']}"
    if not bare["readings_per_s"]:
        ratio_row = _row(names[0], target_ratio, None, "", bool, f"the bare batcher did not store all {n:,} ({size})")
    elif not agent["readings_per_s"]:
        ratio_row = _row(
            names[0],
            target_ratio,
            0.0,
            f"agent stored {agent['stored_at_timeout'] or agent['stored']:,}/{n:,} before the timeout ({size})",
            lambda r: r >= 0.9,
        )
    else:
        ratio_row = _row(
            names[0],
            target_ratio,
            b["ratio_agent_over_bare"],
            f"{b['ratio_agent_over_bare']:.2f} ({_n(agent['readings_per_s'])} vs {_n(bare['readings_per_s'])} "
            f"readings/s; {size})",
            lambda r: r >= 0.9,
        )
    agent_runs = b["runs"]["agent"]
    agent_ok = all(r["complete"] and r["duplicates"] == 0 for r in agent_runs)
    measured = "; ".join(
        f"{who} " + ", ".join(f"{r['stored']:,}/{n:,} ({r['duplicates']} dup.)" for r in b["runs"][key])
        for who, key in (("agent", "agent"), ("bare", "bare_batcher"))
    )
    return [ratio_row, _row(names[1], target_loss + " (agent)", agent_ok, measured, bool)]


def _alerts(result: dict[str, Any]) -> list[dict[str, Any]]:
    runs = result.get("alert_runs") or {}
    run = runs.get(HEADLINE_ALERT_MODE)
    names = ("alert_decision_p99_le_250ms", "alert_onset_p99_le_block_period_plus_250ms")
    if run is None:
        why = (
            _not_run("alerts")
            if not runs
            else f"no {HEADLINE_ALERT_MODE} run (this run: {', '.join(runs)}); the target is for {HEADLINE_ALERT_MODE}"
        )
        return [
            _row(names[0], f"p99 ≤ 250 ms from the deciding block ({HEADLINE_ALERT_MODE})", None, "", bool, why),
            _row(
                names[1],
                f"p99 ≤ block period + 250 ms from the first faulty block ({HEADLINE_ALERT_MODE})",
                None,
                "",
                bool,
                why,
            ),
        ]
    block_ms = run["block_period_wall_ms"]
    rows = []
    for name, key, limit, target in (
        (names[0], "decision", 250.0, "p99 ≤ 250 ms from the deciding block"),
        (
            names[1],
            "onset",
            block_ms + 250.0,
            f"p99 ≤ block period + 250 ms = {block_ms + 250:,.0f} ms from the first faulty block",
        ),
    ):
        s = run[key]
        target = f"{target} ({HEADLINE_ALERT_MODE})"
        if s["n"] < MIN_SAMPLES:
            rows.append(
                _row(name, target, None, f"max {_n(s['max_ms'])} ms", bool, f"N={s['n']} < {MIN_SAMPLES} alerts")
            )
            continue
        rows.append(
            _row(
                name,
                target,
                s["p99_ms"],
                f"{s['p99_ms']:,.0f} ms (p50 {s['p50_ms']:,.0f}, max {s['max_ms']:,.0f}, n={s['n']})",
                lambda v, limit=limit: v <= limit,
            )
        )
    return rows


def _memory(result: dict[str, Any], memory_flat: bool | None) -> list[dict[str, Any]]:
    rows = []
    c = result.get("commissioned")
    name = "peak_rss_le_300mb_at_1000_machines_commissioned"
    target = f"peak RSS ≤ 300 MB, {RSS_TARGET_MACHINES} machines (10 % vibration), every baseline full"
    if not c or "error" in c:
        why = _not_run("commissioned") if not c else f"the phase failed: {c['error'][:200]}"
        rows.append(_row(name, target, None, "", bool, why))
    else:
        proof = (
            f"{c['machines_with_baseline_scores']:,}/{c['machines']:,} machines scored by their baseline, "
            f"{c['state_after_commissioning']['steps_commissioning']:,.0f} commissioning steps "
            f"(= {c['machines']:,} × {c['commissioning_steps']})"
        )
        measured = f"{c['peak_rss_mb']:,.0f} MB; {proof}"
        why = None
        if c["machines"] != RSS_TARGET_MACHINES:
            why = f"{c['machines']} machines in this run, not {RSS_TARGET_MACHINES}"
        elif not (c["all_baselines_full"] and c["machines_with_baseline_scores"] == c["machines"]):
            why = "not every baseline proven full"
        rows.append(_row(name, target, c["peak_rss_mb"], measured, lambda v: v <= 300, why))
    sc = result.get("scaling") or {}
    machines = sc.get("machines", [])
    with_vib = sc.get("machines_vibration", [])
    rss_1000 = [p["peak_rss_mb"] for p in machines + with_vib if p["machines"] == RSS_TARGET_MACHINES]
    rows.append(
        _row(
            "peak_rss_le_300mb_at_1000_machines",
            f"peak RSS ≤ 300 MB, {RSS_TARGET_MACHINES} machines, 15 s runs (baselines still commissioning)",
            max(rss_1000) if rss_1000 else None,
            f"{max(rss_1000):,.0f} MB" if rss_1000 else "",
            lambda v: v <= 300,
            None if rss_1000 else (_not_run("scaling") if not sc else f"no {RSS_TARGET_MACHINES}-machine run"),
        )
    )
    cost = machines[-1].get("cost_per_unit_vs_first") if len(machines) >= 2 else None
    rows.append(
        _row(
            "cpu_per_reading_flat_with_machines",
            "CPU per reading at the largest fleet ≤ 1.25 × at the smallest",
            cost,
            f"{cost:.2f} × ({machines[0]['machines']} → {machines[-1]['machines']} machines)" if cost else "",
            lambda v: v <= 1.25,
            None if cost else "fewer than two scaling points",
        )
    )
    flat = [r.get("rss_growth_kb_per_machine") for r in machines]
    rows.append(
        _row(
            "memory_per_machine_flat",
            "RSS growth per machine at the largest fleet ≤ 1.25 × at the middle one",
            memory_flat,
            ", ".join(f"{v:.0f}" for v in flat if v is not None) + " kB/machine" if any(flat) else "",
            bool,
            None if len(machines) >= 3 else "fewer than three scaling points",
        )
    )
    return rows


def markdown_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| Target | Wanted | Measured (this run) | Holds |", "|---|---|---|---|"]
    for r in rows:
        holds = f"not measured ({r['why']})" if r["holds"] is None else ("**yes**" if r["holds"] else "**no**")
        lines.append(f"| `{r['name']}` | {r['target']} | {r['measured'] or '–'} | {holds} |")
    return lines
