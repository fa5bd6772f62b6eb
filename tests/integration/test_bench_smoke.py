"""The benchmark runs end to end in its quick form and reports every rate it promises (no thresholds).

Speed targets are judged from the ratios of a full run (``docs/benchmarks.md``), never by a timed test:
this test only checks that ``benchmarks/run.py --quick`` starts its services, drives the agent, and
writes the JSON and the markdown table with the expected keys and nonzero rates.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SUMMARY_KEYS = {
    "agent_max_msgs_per_s",
    "agent_max_readings_per_s",
    "agent_max_samples_per_s",
    "agent_zero_loss",
    "agent_peak_rss_mb",
    "bare_receive_msgs_per_s",
    "ratio_agent_over_bare_receive",
    "bare_backlog_drain_msgs_per_s",
    "bare_influx_points_per_s",
    "writer_influx_points_per_s",
    "ratio_writer_over_bare_influx",
    "int8_over_fp32",
    "alert_onset_p50_ms",
    "alert_onset_p99_ms",
    "targets",
    "target_rows",
    "burst_agent_readings_per_s",
    "burst_bare_readings_per_s",
    "ratio_burst_agent_over_bare",
    "commissioned_peak_rss_mb",
}


def test_quick_benchmark_writes_json_and_table_with_nonzero_rates(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("# Benchmark results")
    assert {"machine", "limits", "throughput", "alerts", "scaling", "burst", "commissioned", "summary"} <= result.keys()
    summary = result["summary"]
    assert summary.keys() >= SUMMARY_KEYS
    for key in (
        "agent_max_msgs_per_s",
        "agent_max_readings_per_s",
        "agent_max_samples_per_s",
        "bare_receive_msgs_per_s",
        "bare_backlog_drain_msgs_per_s",
        "bare_influx_points_per_s",
        "writer_influx_points_per_s",
        "agent_peak_rss_mb",
    ):
        assert summary[key] > 0, key
    assert result["throughput"]["steps"], "no throughput step ran"
    # The backlog drain stopped the agent, queued messages for its session and started it again: it took them
    # all (timed, or too quick to time, said why), and with the ramp's they all reached InfluxDB.
    drain = result["throughput"]["backlog_drain"]
    assert drain["messages"] > 0
    assert (drain["msgs_per_s"] is None) == bool(drain["not_measured"]), drain
    assert drain["not_measured"] is None or "too short" in drain["not_measured"], drain
    assert drain["start_to_done_s"] is not None, drain
    assert result["throughput"]["final"]["zero_loss"], result["throughput"]["final"]
    alerts = result["alerts"]
    assert alerts["alerts_matched"] > 0, "no injected fault produced an alert"
    assert sum(alerts["accounting"].values()) == alerts["episodes"], "an injected episode is not accounted for"
    onset = alerts["onset"]
    assert onset["n"] == alerts["alerts_matched"]
    # A percentile is printed only from 100 alerts or more; below that the report says so instead.
    assert (summary["alert_onset_p99_ms"] is None) == (onset["n"] < 100)
    assert summary["alert_onset_p99_ms"] is None or summary["alert_onset_p99_ms"] > 0
    for name, model in result["limits"]["onnx"].items():
        assert model["fp32_batch1_us"] > 0 and model["int8_batch1_us"] > 0, name
    assert result["scaling"]["machines"], "no scaling point ran"
    assert all(p["peak_rss_mb"] > 0 for p in result["scaling"]["machines"])
    burst = result["burst"]
    assert burst["all_complete"], "a burst attempt did not store every reading"
    assert summary["burst_agent_readings_per_s"] > 0 and summary["burst_bare_readings_per_s"] > 0
    commissioned = result["commissioned"]
    assert commissioned["all_baselines_full"], "the commissioned run did not get every baseline full"
    assert commissioned["machines_with_baseline_scores"] == commissioned["machines"]
    # Every target row is measured (holds true/false) or says why not (holds None), never both or neither.
    for row in summary["target_rows"]:
        assert {"name", "target", "measured", "holds"} <= row.keys(), row
        assert (row["holds"] is None) == bool(row.get("why")), row
