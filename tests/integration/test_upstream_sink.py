"""An upstream sink beside the local one, with real processes: Mosquitto, the local InfluxDB 1.6.7, an upstream
VictoriaMetrics (the InfluxDB v2 write API), the gateway simulator and the agent (``python -m agent run``).

The upstream (``storage.upstreams``: scores, alerts and the heartbeat, process readings downsampled to
``INTERVAL_S`` with mean/min/max/last, no raw vibration) is stopped under load (SIGTERM; why not SIGKILL: at
the stop); while it is away the agent is
killed with SIGKILL and started again; then the upstream comes back. Afterwards:

- the local InfluxDB holds every reading and every raw sample exactly once (``chaos_support.account``);
- the upstream holds exactly what its selection promised, counted per series: every downsampled bucket the
  local readings complete, with their aggregates, and the same anomaly scores and heartbeat points as the
  local database (rewrites after the kill are the same points: equal values at equal timestamps);
- the local sink's delivery lag (the heartbeat's ``spool_backlog_age_s_sink_local``) during the outage is
  printed beside the lag before it (``-s``): measured, not asserted (no timing thresholds in tests).

The second test reads the local store back (``agent.storage.query``, what ``pdm-agent adapt`` uses) from a
real InfluxDB while the configured upstream is unreachable.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chaos_support as chaos

from agent import schema
from pdm_tools.dev import services as devservices

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]
REPO = Path(__file__).resolve().parents[2]

INTERVAL_S = 4
GRACE_S = 4
NS = 10**9
AGGREGATES = ("mean", "min", "max", "last")
LOCAL_LAG = "spool_backlog_age_s_sink_local"


def _upstream(url: str) -> dict:
    return {
        "name": "cloud",
        "type": "influx_v2",
        "url": url,
        "v2": {"org": "pdm", "bucket": "pdm"},
        "flush_interval_s": 0.5,
        "backoff_min_s": 0.2,
        "backoff_max_s": 2,
        "timeout_s": 5,
        "select": {
            "kinds": ["scores", "alerts", "heartbeat"],
            "readings": {"mode": "downsample", "interval_s": INTERVAL_S, "grace_s": GRACE_S},
            "raw_vibration": "none",
        },
    }


def _lag_samples(rig: chaos.Rig, seconds: float) -> list[float]:
    """The local sink's backlog age of each heartbeat (one a second) within ``seconds``."""
    assert rig.recorder is not None
    samples: dict[int, float] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        beat = rig.recorder.heartbeat
        fields = beat.get("fields", {})
        if LOCAL_LAG in fields:
            samples[int(beat.get("time_ns", 0))] = float(fields[LOCAL_LAG])
        time.sleep(0.2)
    return list(samples.values())


def _readyz(rig: chaos.Rig) -> dict:
    """The agent's /readyz answer (its health port is chosen by the OS: the log names the URL)."""
    match = re.search(r"health endpoint on (http://\S+) ", rig.agent_log())
    assert match, "the agent did not log its health endpoint"
    try:
        with urllib.request.urlopen(f"{match.group(1)}/readyz", timeout=10) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def _rss_kb(pid: int) -> dict[str, int]:
    """Resident memory (kB) of the agent process and of each of its children (the writer processes)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(stat.parent.name) != pid and int(fields[1]) != pid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        rss = re.search(r"VmRSS:\s+(\d+)", status)
        name = "agent" if int(stat.parent.name) == pid else f"child {stat.parent.name}"
        out[name] = int(rss.group(1)) if rss else 0
    return out


def _lag(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    return f"max {max(samples):.2f} mean {sum(samples) / len(samples):.2f} (n={len(samples)})"


def _export(vm: devservices.Service, match: str) -> list[dict]:
    urllib.request.urlopen(f"{vm.url}/internal/force_flush", timeout=10).read()
    query = urllib.parse.urlencode({"match[]": match, "start": "0"})
    with urllib.request.urlopen(f"{vm.url}/api/v1/export?{query}", timeout=30) as response:
        return [json.loads(line) for line in response.read().decode().splitlines() if line.strip()]


def _by_series(series: list[dict], keys: tuple[str, ...]) -> dict[tuple, dict[int, list[float]]]:
    """(metric name, label values of ``keys``) -> timestamp (ms) -> every sample value stored at it."""
    out: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in series:
        key = (s["metric"]["__name__"], *(s["metric"].get(k, "") for k in keys))
        for t, v in zip(s["timestamps"], s["values"], strict=True):
            out[key][int(t)].append(float(v))
    return out


def _expected_buckets(readings: list[dict]) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """What the downsampling promises from the local readings: per (machine, sensor) and emitted bucket
    (start, ms), ``<field>_<aggregate>`` and ``n``. A bucket is emitted once a later bucket of its series has
    a reading, or once the newest reading of any series is ``GRACE_S`` past its end."""
    series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in readings:
        series[(r["machine"], r["sensor"])].append(r)
    newest = max(int(r["time"]) for r in readings)
    skip = {"time", "seq", *(k for r in readings for k, v in r.items() if isinstance(v, str))}
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for key, rows in series.items():
        rows.sort(key=lambda r: int(r["time"]))
        buckets: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            buckets[int(r["time"]) // (INTERVAL_S * NS)].append(r)
        last_index = max(buckets)
        emitted: dict[int, dict[str, float]] = {}
        for index, members in buckets.items():
            if index == last_index and (index + 1) * INTERVAL_S * NS + GRACE_S * NS > newest:
                continue  # still open
            values: dict[str, float] = {"n": float(len(members))}
            for field in sorted({k for r in members for k, v in r.items() if k not in skip and v is not None}):
                xs = [float(r[field]) for r in members if r.get(field) is not None]
                stats = {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "last": xs[-1]}
                values.update({f"{field}_{a}": stats[a] for a in AGGREGATES})
            emitted[index * INTERVAL_S * 1000] = values
        out[key] = emitted
    return out


def _local_points(rig: chaos.Rig, measurement: str, field: str, tags: tuple[str, ...]) -> dict[tuple, set[int]]:
    """Timestamps (ms) of ``measurement`` in the local database, per (``<measurement>_<field>``, tag values)."""
    assert rig.influx is not None
    out: dict[tuple, set[int]] = defaultdict(set)
    group = ", ".join(f'"{t}"' for t in tags)
    for s in rig.influx.query(f'SELECT "{field}" FROM "{measurement}" GROUP BY {group}', timeout_s=60):
        key = (f"{measurement}_{field}", *(s["tags"].get(t, "") for t in tags))
        out[key].update(int(t) // 1_000_000 for t, v in s["values"] if v is not None)
    return out


@pytest.mark.chaos
def test_upstream_killed_under_load_and_the_agent_killed_gets_exactly_its_selection(tmp_path: Path) -> None:
    vm = devservices.start_victoria_metrics(tmp_path / "victoria-metrics")
    try:
        config = {"storage": {"upstreams": [_upstream(vm.url)]}}
        with chaos.Rig(tmp_path / "rig", machines=2, duration_s=36.0, agent_config=config) as rig:
            rig.start_agent()
            rig.start_simulator()
            assert rig.wait_published(1, 30), "the simulator published nothing"
            lag_before = _lag_samples(rig, 7.0)

            # The upstream goes away under load. SIGTERM, not SIGKILL: VictoriaMetrics acknowledges a write while
            # the rows are still in memory and saves them within -inmemoryDataFlushInterval (5 s); a SIGKILL loses
            # what it acknowledged in those seconds (seen in a first run of this test: the first two buckets of
            # each series), which is the upstream's durability, not the agent's, and which no client can see.
            vm.stop()
            lag_outage = _lag_samples(rig, 5.0)
            ready = _readyz(rig)
            assert rig.agent is not None
            rss = _rss_kb(rig.agent.pid)
            killed_beat = dict(rig.recorder.heartbeat.get("fields", {})) if rig.recorder else {}
            rig.kill_agent()  # SIGKILL while the upstream is away
            time.sleep(2.0)
            rig.start_agent()
            lag_restarted = _lag_samples(rig, 6.0)
            vm.start()
            back = time.monotonic()

            stats = rig.wait_simulator(rig.duration_s / rig.speed + 120)
            process = int(stats["by_kind"].get("process", 0))
            # Both sinks caught up (spool_depth is the slowest sink's backlog).
            assert rig.wait_stored(process, 180), "the sinks did not catch up"
            caught_up_s = time.monotonic() - back
            stop_ns = time.time_ns()
            assert rig.stop_agent() == 0
            assert rig.recorder is not None
            rig.recorder.wait(lambda r: int(r.heartbeat.get("time_ns", 0)) >= stop_ns, 10)
            final = dict(rig.recorder.heartbeat.get("fields", {}))
            accounting = rig.account(stats)
            readings = rig.influx.readings() if rig.influx else []
            local_scores = _local_points(rig, schema.SCORE, schema.SCORE_FIELD, ("machine", "model_id"))
            local_beats = _local_points(rig, schema.AGENT, "ingest_messages", ("agent_id",))

        # -- /readyz while the upstream was away: ready (no ready_max_lag_s), the upstream's backlog shown
        sinks = ready["checks"]["sinks"]
        assert ready["status"] == "ok" and sinks["ok"], ready
        assert sinks["sinks"]["cloud"]["backlog_rows"] > 0 and sinks["sinks"]["cloud"]["backlog_age_s"] > 0, ready

        # -- the local sink: every reading and sample exactly once
        print(accounting.render())
        assert stats["exit_code"] == 0 and stats["unacked"] == 0
        assert accounting.complete, accounting.render()
        assert accounting.points_stored == stats["samples"] + stats["readings"]

        # -- the upstream: exactly its selection, per series
        expected = _expected_buckets(readings)
        n_expected = sum(len(b) for b in expected.values())
        got = _by_series(_export(vm, '{__name__=~"reading_.*"}'), ("machine", "sensor"))
        raw_samples = sum(len(v) for s in got.values() for v in s.values())
        problems = []
        for (machine, sensor), buckets in expected.items():
            for start_ms, values in buckets.items():
                for name, want in values.items():
                    stored = got.get((f"reading_{name}", machine, sensor), {}).get(start_ms, [])
                    if not stored:
                        problems.append(f"{machine}/{sensor} {name} @{start_ms}: missing")
                    elif any(not math.isclose(v, want, rel_tol=1e-9, abs_tol=1e-9) for v in stored):
                        problems.append(f"{machine}/{sensor} {name} @{start_ms}: {stored} != {want}")
        extra = {
            (key, t) for key, samples in got.items() for t in samples if t not in expected.get((key[1], key[2]), {})
        }
        one = next(iter(expected))
        assert not problems, "\n".join(problems[:20]) + (
            f"\n{one}: expected buckets {sorted(expected[one])}, stored "
            f"{sorted(got.get(('reading_n', *one), {}))}, newest reading {max(int(r['time']) for r in readings)}"
        )
        assert not extra, f"buckets the upstream should not have: {sorted(extra)[:10]}"

        up_scores = _by_series(
            _export(vm, f'{{__name__="{schema.SCORE}_{schema.SCORE_FIELD}"}}'), ("machine", "model_id")
        )
        up_beats = _by_series(_export(vm, f'{{__name__="{schema.AGENT}_ingest_messages"}}'), ("agent_id",))
        assert {k: set(v) for k, v in up_scores.items()} == dict(local_scores)
        assert {k: set(v) for k, v in up_beats.items()} == dict(local_beats)
        rewritten = sum(len(v) - 1 for s in (*up_scores.values(), *up_beats.values()) for v in s.values())
        assert all(len(set(v)) == 1 for s in (*got.values(), *up_scores.values()) for v in s.values())
        assert not _export(vm, '{__name__=~"vibration_.*"}'), "raw vibration is not in the selection"
        assert chaos.counter(final, "sink.backlog_dropped_points") == 0

        print(
            f"upstream: {n_expected} downsampled buckets over {len(expected)} series "
            f"({raw_samples} samples incl. rewrites), scores {sum(len(v) for v in local_scores.values())} "
            f"over {len(local_scores)} series, heartbeats {sum(len(v) for v in local_beats.values())}; "
            f"rewritten after the kill (same values): {rewritten}; late readings "
            f"{chaos.counter(final, 'sink.late_readings')}; caught up {caught_up_s:.1f} s after the upstream "
            f"returned; upstream write failures before the kill "
            f"{sum(v for k, v in killed_beat.items() if k.startswith('sink_write_failures_') and 'cloud' in k)}"
        )
        print(f"resident memory (kB) of the agent and its writer processes, during the outage: {rss}")
        print(
            f"local delivery lag (backlog age, s): {_lag(lag_before)} with the upstream up; {_lag(lag_outage)} with "
            f"it away; {_lag(lag_restarted)} with it away after the agent's kill and restart"
        )
    finally:
        vm.stop()


def test_the_local_store_is_read_back_for_adapt_with_the_upstream_unreachable(
    influxdb_v1: devservices.Service, influx_db_name: str, tmp_path: Path
) -> None:
    from agent.bootstrap import build_sink
    from agent.cli.adapt import _from_influx
    from agent.config import parse_config
    from agent.inference.manifest import Manifest
    from agent.storage.query import LocalStore

    unreachable = f"http://127.0.0.1:{devservices.free_port()}"
    config = parse_config(
        {
            "storage": {
                "url": influxdb_v1.url,
                "v1": {"database": influx_db_name},
                "upstreams": [{"name": "cloud", "url": unreachable}],
            },
            "spool": {"path": str(tmp_path / "spool.db")},
        },
        environ={},
    )
    manifest_path = REPO / "models" / "process_anomaly" / "manifest.json"
    manifest = Manifest.from_dict(json.loads(manifest_path.read_text()), str(manifest_path))
    names = list(manifest.feature_names)
    now = time.time_ns() // NS * NS
    start = now - 3600 * NS
    lines = []
    for i in range(40):
        t = start + i * 60 * NS
        lines.append(f"reading,machine=m1,sensor=process temperature={50 + i}.5,rpm=1780.0,seq={i}i {t}")
        lines.append(f"reading,machine=m2,sensor=process temperature=20.0 {t}")
        values = ",".join(f"{n}={i + k / 10}" for k, n in enumerate(names))
        lines.append(f"features,machine=m1,model_id={manifest.model_id} {values} {t}")
        lines.append(
            f"anomaly_score,machine=m1,model_id={manifest.model_id} score={i / 40},threshold=0.9,anomalous=0i {t}"
        )
    lines.append(f"features,machine=m1,model_id={manifest.model_id} {names[0]}=1.0 {now - 30 * NS}")  # incomplete
    sink = build_sink(config)
    try:
        sink.write(lines)
        store = LocalStore(sink)
        readings = store.readings("m1", start, now)
        assert readings.columns == ("rpm", "temperature") and len(readings) == 40  # seq and the tags left out
        assert readings.values[3].tolist() == [1780.0, 53.5]
        assert readings.times_ns[3] == start + 180 * NS
        window = store.readings("m1", start + 600 * NS, start + 1200 * NS, fields=["temperature"])
        assert window.values[:, 0].tolist() == [60.5 + k for k in range(10)]  # [start, end)
        scores = store.scores("m1", start, model_id=manifest.model_id)
        assert scores.columns == ("score", "threshold", "anomalous") and scores.values[-1].tolist() == [0.975, 0.9, 0]
        assert len(store.features("m1", manifest.model_id, names, start)) == 41
        assert len(store.readings("m3", start)) == 0
    finally:
        sink.close()
    # What adapt trains on: the complete feature vectors of the last hour, oldest first.
    x = _from_influx(config, manifest, "m1", "2h", 1000)
    assert x.shape == (40, len(names)) and x[0, 1] == pytest.approx(0.1) and x[-1, 0] == 39.0
