"""The ship gate on plain numbers: cheapest passing candidate wins, slower-than-FP32 never ships, reasons."""

from __future__ import annotations

import pytest

from pdm_tools.quantization.gate import PARENT, Criteria, Measured, decide

CLS_OK = {"accuracy_delta_points": 0.0, "macro_f1_delta_points": 0.0, "agreement": 1.0}
ANOM_OK = {"auc_delta": 0.0, "detection_delta_points": 0.0}


def _m(name: str, p50: float, size: int = 1000, bits: int = 8, metrics: dict | None = None, **kw: object) -> Measured:
    return Measured(name, bits, size, p50, p50 * 2, CLS_OK if metrics is None else metrics, **kw)  # type: ignore[arg-type]


def _parent(p50: float = 10.0, metrics: dict | None = None) -> Measured:
    return _m(PARENT, p50, size=4000, bits=32, metrics=metrics)


def test_cheapest_passing_candidate_wins() -> None:
    d = decide([_parent(), _m("int8-a", 8.0), _m("int8-b", 6.0), _m("w4", 7.0, bits=4)], "classifier")
    assert d.chosen == "int8-b"
    assert "faster" in d.losers()["int8-a"] and "faster" in d.losers()[PARENT]


def test_a_candidate_slower_than_fp32_never_ships_even_when_it_is_smaller_and_accurate() -> None:
    d = decide([_parent(10.0), _m("int8", 10.5, size=10), _m("w4", 30.0, size=5, bits=4)], "classifier")
    assert d.chosen == PARENT
    assert "slower than its FP32 parent" in d.losers()["int8"]
    assert "1.05x" in d.losers()["int8"]
    assert d.reason == "no quantized candidate passed the gate"


def test_every_loser_has_a_reason() -> None:
    bad_acc = dict(CLS_OK, accuracy_delta_points=-0.8)
    d = decide(
        [_parent(), _m("int8-acc", 5.0, metrics=bad_acc), _m("int8-ok", 6.0), _m("broken", 1.0, error="boom")],
        "classifier",
    )
    assert d.chosen == "int8-ok"
    losers = d.losers()
    assert set(losers) == {PARENT, "int8-acc", "broken"}
    assert all(reason for reason in losers.values())
    assert "accuracy drops 0.80 points" in losers["int8-acc"]
    assert losers["broken"] == "error: boom"


def test_4bit_candidates_get_the_wider_accuracy_limit() -> None:
    drop = dict(CLS_OK, accuracy_delta_points=-0.8, macro_f1_delta_points=-0.8, agreement=0.985)
    d = decide([_parent(), _m("int8", 5.0, metrics=drop), _m("w4", 6.0, bits=4, metrics=drop)], "classifier")
    assert d.chosen == "w4"
    assert "accuracy drops" in d.losers()["int8"] and "agrees with FP32 on 98.50%" in d.losers()["int8"]


def test_anomaly_candidates_are_judged_on_auc_and_detection() -> None:
    d = decide(
        [
            _parent(metrics=ANOM_OK),
            _m("auc", 5.0, metrics={"auc_delta": -0.006, "detection_delta_points": 0.0}),
            _m("det", 5.0, metrics={"auc_delta": 0.0, "detection_delta_points": -1.5}),
            _m("ok", 9.0, metrics={"auc_delta": -0.004, "detection_delta_points": -0.5}),
        ],
        "anomaly",
    )
    assert d.chosen == "ok"
    assert "AUC drops 0.0060" in d.losers()["auc"]
    assert "detection at the operating false-alarm rate drops 1.50 points" in d.losers()["det"]


def test_unmeasured_accuracy_fails_the_candidate() -> None:
    d = decide([_parent(metrics={}), _m("int8", 1.0, metrics={})], "classifier")
    assert d.chosen == PARENT
    assert "not measured" in d.losers()["int8"]


def test_ties_on_latency_go_to_the_smaller_file_then_to_the_earlier_candidate() -> None:
    d = decide([_parent(), _m("a", 5.0, size=900), _m("b", 5.0, size=800)], "classifier")
    assert d.chosen == "b" and "larger" in d.losers()["a"]
    d = decide([_parent(), _m("a", 5.0, size=800), _m("b", 5.0, size=800)], "classifier")
    assert d.chosen == "a" and "earlier candidate" in d.losers()["b"]
    d = decide([_parent(5.0), _m("same", 5.0, size=4000)], "classifier")
    assert d.chosen == PARENT


def test_latency_limit_is_a_criterion() -> None:
    assert decide([_parent(10.0), _m("int8", 9.0)], "classifier", Criteria(max_latency_ratio=0.8)).chosen == PARENT


def test_the_parent_must_be_among_the_candidates_and_names_unique() -> None:
    with pytest.raises(ValueError, match="parent"):
        decide([_m("int8", 1.0)], "classifier")
    with pytest.raises(ValueError, match="unique"):
        decide([_parent(), _m("a", 1.0), _m("a", 2.0)], "classifier")


def test_a_candidate_faster_only_by_noise_does_not_ship() -> None:
    """Faster in the pooled p50 but slower in one interleaved round: not reliably faster, FP32 stays."""
    parent = Measured(PARENT, 32, 4000, 10.0, 20.0, CLS_OK, round_p50_us=(10.0, 10.0, 10.0))
    noisy = Measured("w4", 4, 1000, 9.5, 20.0, CLS_OK, round_p50_us=(9.0, 9.5, 10.4))
    steady = Measured("int8", 8, 2000, 9.8, 20.0, CLS_OK, round_p50_us=(9.7, 9.8, 9.9))
    d = decide([parent, noisy], "classifier")
    assert d.chosen == PARENT and "slower in 1 of 3 interleaved timing rounds" in d.losers()["w4"]
    assert decide([parent, noisy, steady], "classifier").chosen == "int8"
