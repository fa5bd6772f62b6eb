"""The inspection stage (pure: a fake classifier), the alert payload of a camera defect, and ``GET /images``."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from agent.alerts.engine import AlertEngine
from agent.alerts.payload import alert_body
from agent.alerts.rules import AlertRule, RuleBook
from agent.health.server import HealthServer
from agent.images.store import ImageStore
from agent.metrics import Metrics
from agent.records import NS_PER_S, ImageFrame, Source
from agent.runtime.inspection import ImageLinks, InspectionStage

REPO = Path(__file__).resolve().parents[2]
ALERT_SCHEMA = json.loads((REPO / "agent" / "schemas" / "alert.schema.json").read_text())
SOURCE = Source.of(site="s1", machine="cam-1", sensor="camera")
T0 = 1_790_000_000 * NS_PER_S


class FakeClassifier:
    """Probabilities given per frame by the frame's first pixel (an index into ``rows``)."""

    model_id = "surface_defect"
    version = "1.0.0"
    classes = ("ok", "scratches", "patches")

    def __init__(self, rows: Sequence[Sequence[float]], fail: bool = False) -> None:
        self.rows = np.asarray(rows, dtype=np.float32)
        self.fail = fail

    def prepare(self, grays: Sequence[np.ndarray]) -> np.ndarray:
        if self.fail:
            raise ValueError("frame too small")
        return np.array([[[[float(g[0, 0])]]] for g in grays], dtype=np.float32)

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs = self.rows[x[:, 0, 0, 0].astype(int)]
        return probs.argmax(axis=1), probs


def _frame(row: int, t: int = 0) -> ImageFrame:
    payload = bytes([row, t]) * 8
    gray = np.full((8, 8), row, dtype=np.uint8)
    sha = hashlib.sha256(payload).hexdigest()
    return ImageFrame(SOURCE, T0 + t * NS_PER_S, sha, "png", 8, 8, gray, payload, {})


ROWS = [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.4, 0.35, 0.25]]


def _stage(clf: FakeClassifier | None, **kw: object) -> InspectionStage:
    return InspectionStage(
        clf,
        alert_type="surface-defect",
        min_confidence=kw.pop("min_confidence", 0.5),  # type: ignore[arg-type]
        image_url=ImageLinks(None, "http://edge:9108"),
        **kw,  # type: ignore[arg-type]
    )


def test_the_verdict_score_is_the_best_defect_probability_against_min_confidence() -> None:
    metrics = Metrics()
    verdicts, lines = _stage(FakeClassifier(ROWS), defect_classes=("scratches", "patches")).inspect(
        [_frame(0), _frame(1), _frame(2)], metrics
    )
    assert [round(v.score.score, 3) for v in verdicts] == [0.05, 0.8, 0.35]
    assert [v.score.is_anomalous for v in verdicts] == [False, True, False]
    assert all(v.alert_type == "surface-defect" and v.score.threshold == 0.5 for v in verdicts)
    assert verdicts[1].defect is not None and verdicts[1].defect.class_name == "scratches"
    assert verdicts[1].evidence is not None
    assert verdicts[1].evidence["url"] == f"http://edge:9108/images/{_frame(1).sha256}"
    assert len(lines) == 3 and lines[1].startswith("inspection,")
    assert "class=scratches" in lines[1] and "defect=true" in lines[1] and "defect=false" in lines[0]
    assert metrics.get("images.scored", model="surface_defect") == 3
    assert metrics.get("images.defects", **{"class": "scratches"}) == 1


def test_without_defect_classes_every_class_is_a_defect() -> None:
    verdicts, _ = _stage(FakeClassifier(ROWS)).inspect([_frame(0)], Metrics())
    assert verdicts[0].score.score == pytest.approx(0.9)


def test_unknown_defect_classes_are_refused_at_build() -> None:
    with pytest.raises(ValueError, match="not classes of model"):
        _stage(FakeClassifier(ROWS), defect_classes=("rust",))


def test_no_model_or_unusable_frames_are_counted_not_raised() -> None:
    metrics = Metrics()
    assert _stage(None).inspect([_frame(0)], metrics) == ([], [])
    assert _stage(FakeClassifier(ROWS, fail=True)).inspect([_frame(0), _frame(1)], metrics) == ([], [])
    assert metrics.get("images.unscored", reason="no_model") == 1
    assert metrics.get("images.unscored", reason="bad_input") == 2


def test_a_defect_alert_carries_the_image_and_validates_against_the_schema() -> None:
    stage = _stage(FakeClassifier(ROWS), defect_classes=("scratches", "patches"))
    engine = AlertEngine(RuleBook(by_type={"surface-defect": AlertRule(raise_n=2, raise_m=3)}), metrics=Metrics())
    frames = [_frame(1, t) for t in range(3)]
    verdicts, _ = stage.inspect(frames, Metrics())
    alerts = []
    for i, verdict in enumerate(verdicts):
        assert verdict.defect is not None and verdict.evidence is not None
        defect = {**verdict.defect.as_dict(), "image": dict(verdict.evidence)}
        alerts += engine.observe(verdict.score, T0 + i * NS_PER_S, defect, alert_type=verdict.alert_type)
    (alert,) = alerts
    body = alert_body(alert, "edge-01")
    jsonschema.validate(body, ALERT_SCHEMA)
    assert body["v"] == 4 and body["alert_type"] == "surface-defect"
    assert body["defect"]["defect"] == "scratches" and "image" not in body["defect"]
    assert body["image"]["sha256"] == frames[1].sha256
    assert body["image"]["url"].endswith(f"/images/{frames[1].sha256}")


def test_image_links_prefer_the_public_url_then_the_bound_server() -> None:
    links = ImageLinks(None, "http://127.0.0.1:0")

    class Server:
        url = "http://127.0.0.1:4242"

    links.server = Server()
    assert links("ab") == "http://127.0.0.1:4242/images/ab"
    assert ImageLinks("https://edge.example/pdm/", "x")("ab") == "https://edge.example/pdm/images/ab"


def test_images_are_served_by_sha256_with_their_type_and_unknown_ones_are_404(tmp_path: Path) -> None:
    metrics = Metrics()
    store = ImageStore(tmp_path, 10_000, 3600, metrics)
    data = b"\x89PNG\r\n\x1a\n" + bytes(100)
    sha = hashlib.sha256(data).hexdigest()
    store.put(sha, "png", data)
    with HealthServer(metrics, {}, port=0, images=store) as server:
        with urllib.request.urlopen(f"{server.url}/images/{sha}", timeout=10) as response:
            assert response.read() == data
            assert response.headers["Content-Type"] == "image/png"
            assert "immutable" in response.headers["Cache-Control"]
        for name, status in (("0" * 64, 404), ("..%2Fspool.db", 400), (sha.upper(), 400)):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"{server.url}/images/{name}", timeout=10)
            assert caught.value.code == status
    assert metrics.get("images.fetched", result="ok") == 1
    assert metrics.get("images.fetched", result="not_found") == 1
    assert metrics.get("images.fetched", result="bad_request") == 2
