"""Chaos: the spool's disk fills up while InfluxDB is down, and the agent gets out of it by itself.

Real processes (Mosquitto, InfluxDB 1.6.7, ``python -m agent run``, the gateway simulator) and a real full
file system: the spool, its reserve and the agent's state files live on a small tmpfs mounted for the test
(root only; the test is skipped, saying so, where mounting is not allowed). The simulator publishes raw
vibration (every sample a point) faster than real time while InfluxDB is down, so the spool fills the disk.

What must hold (issue "Nothing lost, nothing doubled…", item 1): the agent stops acknowledging and says so
(``/readyz`` 503 naming the full disk, the ``spool.disk_full`` gauge, one log line per state change and
no traceback per retry); SIGTERM while the disk is full ends the agent by itself within its shutdown timeout;
once InfluxDB is back the writer delivers although its cursor update needs room, the spool frees pages,
appends resume, and every message the simulator published is in InfluxDB exactly once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chaos_support as chaos

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(300)]

DISK_BYTES = 4 * 1024 * 1024
RESERVE_BYTES = 256 * 1024
SHUTDOWN_TIMEOUT_S = 20


@contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk scenario (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _counters(rig: chaos.Rig) -> dict:
    assert rig.recorder is not None
    return dict(rig.recorder.heartbeat.get("fields", {}))


def _health_url(rig: chaos.Rig, start: int) -> str:
    """The health endpoint of the agent process started as number ``start`` (its log names the port)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = (rig.workdir / f"agent-{start}.log").read_text(errors="replace")
        found = re.search(r"health endpoint on (http://\S+)", text)
        if found:
            return found.group(1)
        time.sleep(0.2)
    raise AssertionError("the agent did not log its health endpoint")


def _readyz(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_full_spool_disk_stops_acks_says_so_and_recovers_without_loss_or_duplicates(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    observed: dict[str, object] = {}

    def before_agent(rig: chaos.Rig, result: chaos.ScenarioResult) -> None:
        data = yaml.safe_load(rig.config_path.read_text())
        data["spool"]["path"] = str(disk / "spool.db")  # alert and baseline state default to beside it
        data["spool"]["reserve_bytes"] = RESERVE_BYTES
        data["agent"]["shutdown_timeout_s"] = SHUTDOWN_TIMEOUT_S
        rig.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        assert rig.influxdb is not None
        rig.influxdb.stop()
        result.notes.append("InfluxDB stopped before the agent started")

    def disrupt(rig: chaos.Rig, result: chaos.ScenarioResult) -> None:
        assert rig.recorder is not None and rig.influxdb is not None and rig.agent is not None
        url = _health_url(rig, 1)
        if not rig.recorder.wait(lambda r: chaos.counter(r.heartbeat.get("fields", {}), "spool.disk_full") == 1, 90):
            raise AssertionError(f"the disk never filled up:\n{rig.agent_log()[-3000:]}")
        full_at = time.monotonic()
        observed["readyz_full"] = _readyz(url)
        # The spool's maintenance thread may see the full disk before the ingest thread's next append fails:
        # wait (bounded) for a heartbeat that counts the refused append, then keep that heartbeat's counters.
        rig.recorder.wait(lambda r: chaos.counter(r.heartbeat.get("fields", {}), "spool.append_failures") >= 1, 30)
        observed["counters_full"] = _counters(rig)
        time.sleep(3)  # messages keep arriving and are not acknowledged
        # SIGTERM while the disk is full: the agent ends by itself within its shutdown timeout.
        t0 = time.monotonic()
        try:
            observed["stop_exit"] = rig.stop_agent(timeout_s=SHUTDOWN_TIMEOUT_S + 15)
        except subprocess.TimeoutExpired:
            observed["stop_exit"] = "hung"
            rig.kill_agent()
        observed["stop_s"] = time.monotonic() - t0
        rig.start_agent()
        baseline = 0
        backlog = rig.recorder.count("process")
        rig.influxdb.start()
        t1 = time.monotonic()
        result.outage_s = t1 - full_at
        result.recovery = rig.measure_recovery(t1, baseline, backlog, online=False, timeout_s=120)
        chaos.log(f"InfluxDB back after the disk filled: {result.recovery.render()}")
        # Once the stream has ended and is stored, the spool has room again (delivered rows freed) and says so.
        assert rig.simulator is not None
        rig.simulator.wait(rig.duration_s / rig.speed + 120)
        observed["room_again"] = rig.recorder.wait(
            lambda r: (
                chaos.counter(r.heartbeat.get("fields", {}), "spool.depth", missing=-1) == 0
                and chaos.counter(r.heartbeat.get("fields", {}), "spool.disk_full", missing=-1) == 0
            ),
            120,
        )
        observed["readyz_after"] = _readyz(_health_url(rig, 2))

    with tmpfs(disk, DISK_BYTES):
        result = chaos.run_scenario(
            "spool_disk_full",
            tmp_path / "rig",
            disrupt,
            before_agent=before_agent,
            duration_s=40.0,
            speed=2.0,
        )
        log_text = (tmp_path / "rig" / "agent-1.log").read_text(errors="replace") + (
            tmp_path / "rig" / "agent-2.log"
        ).read_text(errors="replace")
    print(result.render())
    print({k: v for k, v in observed.items() if not k.startswith("counters")})

    status, body = observed["readyz_full"]  # type: ignore[misc]
    assert status == 503 and "disk full" in body["checks"]["spool"]["error"], body
    full = observed["counters_full"]
    assert isinstance(full, dict) and chaos.counter(full, "spool.append_failures") >= 1
    assert chaos.counter(full, "spool.reserve_bytes") == 0
    assert observed["stop_exit"] == 0, f"SIGTERM with a full disk: {observed['stop_exit']}\n{log_text[-3000:]}"
    assert observed["room_again"], "the spool never left the full state once its backlog was delivered"
    assert observed["readyz_after"][0] == 200, observed["readyz_after"]  # type: ignore[index]
    # Said once per state change, never a traceback per retry.
    assert "Traceback" not in log_text, log_text[log_text.index("Traceback") - 500 :][:3000]
    assert log_text.count("the disk is full") == 1 + chaos.counter(result.counters, "spool.disk_full_events")
    # Each of these lines is a change of state (the last one of each of the two processes may stay failing).
    assert log_text.count("spool append failed") <= log_text.count("spool appends succeed again") + 2
    # Nothing lost, nothing doubled.
    stats, acc = result.stats, result.accounting
    assert stats["exit_code"] == 0 and stats["unacked"] == 0 and stats["failed"] == 0
    assert acc.published == stats["messages"] > 0
    assert acc.lost == 0 and acc.duplicates == 0 and acc.checksum_mismatches == 0, acc.render()
    assert acc.points_stored == acc.points_expected == stats["samples"] + stats["readings"], acc.render()
    assert result.agent_exit_code == 0
    assert chaos.counter(result.counters, "spool.disk_full") == 0
