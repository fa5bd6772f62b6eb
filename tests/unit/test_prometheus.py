"""The Prometheus text format 0.0.4 of the agent's metrics, read back by a strict parser written here."""

from __future__ import annotations

import doctest
import logging
import math
import re
from dataclasses import dataclass, field

import pytest

from agent.health import prometheus
from agent.health.prometheus import CONTENT_TYPE, metric_name, render, render_metrics
from agent.metrics import Metrics

# --- a strict parser of the text exposition format 0.0.4 ---------------------------------------------------

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
FLOAT = r"[+-]?(?:Inf|NaN|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
HELP_LINE = re.compile(rf"# HELP ({METRIC_NAME}) ((?:[^\\\n]|\\[\\n])*)")
TYPE_LINE = re.compile(rf"# TYPE ({METRIC_NAME}) (counter|gauge|histogram|summary|untyped)")
LABEL = re.compile(rf"({LABEL_NAME})=({LABEL_VALUE})")
SAMPLE_LINE = re.compile(
    rf"({METRIC_NAME})(?:\{{((?:{LABEL_NAME}={LABEL_VALUE})(?:,{LABEL_NAME}={LABEL_VALUE})*)?\}})? ({FLOAT})(?: -?\d+)?"
)


@dataclass
class Family:
    type: str
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        found = [v for n, ls, v in self.samples if n == name and ls == labels]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples in {self.samples}"
        return found[0]


def _unescape(text: str, quote: bool) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"' if quote else '\\"'}[m.group(1)], text)


def _float(text: str) -> float:
    return float(text.replace("Inf", "inf").replace("NaN", "nan"))


def parse(text: str) -> dict[str, Family]:
    """Families by name; AssertionError on anything the format (or its histogram rules) does not allow."""
    assert text == "" or text.endswith("\n"), "the last line must end with a line feed"
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    current: str | None = None  # family whose samples are being read: they must be contiguous
    finished: set[str] = set()
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            m = HELP_LINE.fullmatch(line)
            assert m, f"bad HELP, {where}"
            assert m.group(1) not in helps, f"second HELP, {where}"
            helps[m.group(1)] = _unescape(m.group(2), quote=False)
            continue
        if line.startswith("# TYPE "):
            m = TYPE_LINE.fullmatch(line)
            assert m, f"bad TYPE, {where}"
            name = m.group(1)
            assert name not in families, f"second TYPE or TYPE after samples, {where}"
            if current is not None:
                finished.add(current)
            families[name] = Family(m.group(2), helps.get(name))
            current = name
            continue
        assert not line.startswith("#") or line.startswith("# "), f"bad comment, {where}"
        if line.startswith("#"):
            continue
        m = SAMPLE_LINE.fullmatch(line)
        assert m, f"bad sample, {where}"
        name, label_text, value = m.group(1), m.group(2) or "", _float(m.group(3))
        pairs = [(k, _unescape(v[1:-1], quote=True)) for k, v in LABEL.findall(label_text)]
        labels = dict(pairs)
        assert len(labels) == len(pairs), f"repeated label name, {where}"
        assert not any(k.startswith("__") for k in labels), f"reserved label name, {where}"
        assert current is not None, f"sample before any TYPE, {where}"
        family = families[current]
        allowed = {
            "counter": {current},
            "gauge": {current},
            "histogram": {f"{current}_bucket", f"{current}_sum", f"{current}_count"},
        }[family.type]
        assert name in allowed, f"sample {name} does not belong to {family.type} {current}, {where}"
        assert current not in finished
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"duplicate sample, {where}"
        seen.add(key)
        family.samples.append((name, labels, value))
    for name, family in families.items():
        assert family.help is not None, f"{name} has no HELP before its TYPE"
        if family.type == "counter":
            assert name.endswith("_total")
            assert all(v >= 0 for _, _, v in family.samples)
        if family.type == "histogram":
            _check_histogram(name, family)
    return families


def _check_histogram(name: str, family: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for sample, labels, value in family.samples:
        if sample.endswith("_bucket"):
            assert "le" in labels, f"{name}: bucket without le"
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            series.setdefault(rest, []).append((_float(labels["le"]), value))
    assert series, f"{name}: no buckets"
    for rest, buckets in series.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{name}{rest}: le not increasing to +Inf"
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{name}{rest}: buckets are not cumulative"
        assert family.value(f"{name}_count", **dict(rest)) == counts[-1], f"{name}{rest}: +Inf bucket != _count"
        family.value(f"{name}_sum", **dict(rest))


# --- tests -------------------------------------------------------------------------------------------------


def test_module_doctests_pass() -> None:
    assert doctest.testmod(prometheus).failed == 0


def test_content_type_is_the_text_format_0_0_4() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_no_series_renders_an_empty_document() -> None:
    assert render_metrics(Metrics()) == ""
    assert parse("") == {}


def test_counters_get_the_prefix_snake_case_and_total_with_their_labels() -> None:
    m = Metrics()
    m.inc("ingest.messages", 3)
    m.inc("decode.errors", reason="bad_json")
    m.inc("decode.errors", 4, reason="non_finite")
    families = parse(render_metrics(m))
    assert families["pdm_ingest_messages_total"].type == "counter"
    assert families["pdm_ingest_messages_total"].value("pdm_ingest_messages_total") == 3
    errors = families["pdm_decode_errors_total"]
    assert errors.value("pdm_decode_errors_total", reason="non_finite") == 4
    assert errors.value("pdm_decode_errors_total", reason="bad_json") == 1
    assert errors.help == "Rejected messages, by reason (each one also goes to the dead-letter topic)."


def test_gauges_keep_their_name_and_seconds_are_spelled_out() -> None:
    m = Metrics()
    m.set("spool.depth", 12)
    m.set("mqtt.connected", 0)
    m.set("storage.backoff_s", 1.5)
    m.set("inference.last_batch_ms", 0.25, model="a")
    m.set_function("spool.oldest_age_s", lambda: 42.5)
    families = parse(render_metrics(m))
    assert {n: f.type for n, f in families.items()} == {
        "pdm_spool_depth": "gauge",
        "pdm_mqtt_connected": "gauge",
        "pdm_storage_backoff_seconds": "gauge",
        "pdm_inference_last_batch_milliseconds": "gauge",
        "pdm_spool_oldest_age_seconds": "gauge",
    }
    assert families["pdm_spool_oldest_age_seconds"].value("pdm_spool_oldest_age_seconds") == 42.5
    assert (
        families["pdm_inference_last_batch_milliseconds"].value("pdm_inference_last_batch_milliseconds", model="a")
        == 0.25
    )


def test_histograms_have_cumulative_buckets_sum_count_and_recent_quantiles() -> None:
    m = Metrics(buckets=(0.001, 0.01, 0.1))
    for value in (0.0005, 0.002, 0.003, 0.05, 0.2):
        m.observe("inference.seconds", value, model="vib")
    m.observe("inference.seconds", 0.004, model="proc")
    families = parse(render_metrics(m))
    h = families["pdm_inference_seconds"]
    assert h.type == "histogram"
    buckets = {ls["le"]: v for n, ls, v in h.samples if n.endswith("_bucket") and ls["model"] == "vib"}
    assert buckets == {"0.001": 1, "0.01": 3, "0.1": 4, "+Inf": 5}
    assert h.value("pdm_inference_seconds_count", model="vib") == 5
    assert h.value("pdm_inference_seconds_sum", model="vib") == pytest.approx(0.2555)
    assert h.value("pdm_inference_seconds_count", model="proc") == 1
    recent = families["pdm_inference_seconds_recent"]
    assert recent.type == "gauge"
    assert recent.value("pdm_inference_seconds_recent", model="vib", quantile="0.5") == 0.003
    assert recent.value("pdm_inference_seconds_recent", model="vib", quantile="0.99") == 0.2
    assert recent.value("pdm_inference_seconds_recent", model="proc", quantile="0.99") == 0.004


def test_label_values_are_escaped_and_read_back_unchanged() -> None:
    nasty = 'C:\\path "quoted"\nsecond line, and {braces}=x'
    m = Metrics()
    m.inc("mqtt.publish_errors", reason=nasty)
    m.set("models.loaded", 1, model="vibration-anomaly", version="1.0.0+int8")
    text = render_metrics(m)
    assert "\nsecond line" not in text  # the line feed is escaped, not written
    families = parse(text)
    assert families["pdm_mqtt_publish_errors_total"].value("pdm_mqtt_publish_errors_total", reason=nasty) == 1
    loaded = families["pdm_models_loaded"]
    assert loaded.value("pdm_models_loaded", model="vibration-anomaly", version="1.0.0+int8") == 1


def test_unknown_names_are_sanitized_and_described_by_their_dotted_name() -> None:
    m = Metrics()
    m.inc("weird-name.with space", 1, **{"bad-label": "v", "2nd": "w", "__reserved": "x"})
    families = parse(render_metrics(m))
    (name,) = families
    assert name == "pdm_weird_name_with_space_total"
    assert families[name].help == "pdm-agent metric weird-name.with space."
    assert families[name].samples == [(name, {"bad_label": "v", "_2nd": "w", "label__reserved": "x"}, 1)]


def test_help_text_is_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(prometheus.HELP, "odd.help", "back\\slash\nnew line")
    m = Metrics()
    m.set("odd.help", 1)
    text = render_metrics(m)
    assert "# HELP pdm_odd_help back\\\\slash\\nnew line\n" in text
    assert parse(text)["pdm_odd_help"].help == "back\\slash\nnew line"


def test_a_label_named_le_or_quantile_does_not_clash_with_the_histogram_labels() -> None:
    m = Metrics()
    m.observe("odd.seconds", 0.1, le="mine", quantile="also mine")
    families = parse(render_metrics(m))
    bucket = next(ls for n, ls, _ in families["pdm_odd_seconds"].samples if n.endswith("_bucket"))
    assert bucket["exported_le"] == "mine" and bucket["quantile"] == "also mine"
    recent = families["pdm_odd_seconds_recent"].samples[0][1]
    assert recent["exported_quantile"] == "also mine" and recent["quantile"] == "0.5"


def test_special_values_are_written_as_the_format_spells_them() -> None:
    m = Metrics()
    m.set("a.nan", math.nan)
    m.set("a.inf", math.inf)
    m.set("a.minus_inf", -math.inf)
    m.set("a.big", 1e300)
    text = render_metrics(m)
    assert "pdm_a_nan NaN\n" in text and "pdm_a_inf +Inf\n" in text and "pdm_a_minus_inf -Inf\n" in text
    families = parse(text)
    assert math.isnan(families["pdm_a_nan"].value("pdm_a_nan"))
    assert families["pdm_a_big"].value("pdm_a_big") == 1e300


def test_names_that_collide_are_rendered_once_and_the_loser_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    m.inc("a.b_c", 1)
    m.inc("a_b.c", 2)  # also pdm_a_b_c_total
    m.set("x.count", 5)  # pdm_x_count: the _count sample of the histogram below
    m.observe("x", 0.1)
    with caplog.at_level(logging.WARNING, logger="agent.health.prometheus"):
        families = parse(render_metrics(m))
    assert families["pdm_a_b_c_total"].samples == [("pdm_a_b_c_total", {}, 1)]
    assert families["pdm_x_count"].type == "gauge"
    assert "pdm_x" not in families
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "a_b.c (counter) is not exported" in messages and "x (histogram) is not exported" in messages


def test_output_is_sorted_and_stable() -> None:
    m = Metrics()
    for name in ("z.last", "a.first", "m.middle"):
        m.inc(name)
    text = render_metrics(m)
    assert text == render_metrics(m)
    assert list(parse(text)) == ["pdm_a_first_total", "pdm_m_middle_total", "pdm_z_last_total"]


def test_the_figures_of_the_issue_are_exported_under_their_documented_names() -> None:
    """What the pipeline, spool, writer and MQTT adapter record shows up without any registration."""
    m = Metrics()
    m.inc("ingest.messages", 10)
    m.inc("ingest.readings", 30)
    m.inc("spool.appended", 35)
    m.inc("storage.points_written", 20)
    m.inc("decode.errors", reason="bad_json")
    m.set("spool.depth", 15)
    m.set_function("spool.oldest_age_s", lambda: 3.0)
    m.observe("storage.write_seconds", 0.02)
    m.inc("storage.write_failures", kind="retryable")
    m.observe("inference.seconds", 0.004, model="vibration-anomaly")
    m.observe("inference.window_seconds", 0.0001, model="vibration-anomaly")
    m.inc("windows.scored", 40, model="vibration-anomaly")
    m.inc("alerts.published", state="new")
    m.set("models.loaded", 1, model="vibration-anomaly", version="1.0.0")
    m.set("mqtt.connected", 1)
    families = parse(render_metrics(m))
    assert set(families) == {
        "pdm_ingest_messages_total",
        "pdm_ingest_readings_total",
        "pdm_spool_appended_total",
        "pdm_storage_points_written_total",
        "pdm_decode_errors_total",
        "pdm_spool_depth",
        "pdm_spool_oldest_age_seconds",
        "pdm_storage_write_seconds",
        "pdm_storage_write_seconds_recent",
        "pdm_storage_write_failures_total",
        "pdm_inference_seconds",
        "pdm_inference_seconds_recent",
        "pdm_inference_window_seconds",
        "pdm_inference_window_seconds_recent",
        "pdm_windows_scored_total",
        "pdm_alerts_published_total",
        "pdm_models_loaded",
        "pdm_mqtt_connected",
    }
    assert all(not f.help.startswith("pdm-agent metric") for f in families.values() if f.help), "undocumented"
    assert metric_name("storage.write_seconds") == "pdm_storage_write_seconds"


def test_render_takes_a_snapshot() -> None:
    m = Metrics()
    m.inc("ingest.messages")
    snapshot = m.collect()
    m.inc("ingest.messages")
    assert "pdm_ingest_messages_total 1\n" in render(snapshot)
