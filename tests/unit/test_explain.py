"""Top contributing features of an anomaly score: each feature's share of the autoencoder's error."""

from pathlib import Path

import numpy as np
import pytest

from agent.inference.model import OnnxAnomalyModel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model() -> OnnxAnomalyModel:
    return OnnxAnomalyModel.load(REPO / "models/process_anomaly")


def _normal_rows(model: OnnxAnomalyModel, n: int) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(REPO / "models/process_anomaly" / model.manifest.file)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    sub = next(n for n in graph.node if n.name == "normalize_sub")
    div = next(n for n in graph.node if n.name == "normalize_div")
    mean, scale = inits[sub.input[1]], inits[div.input[1]]
    rng = np.random.default_rng(0)
    return (mean + 0.1 * scale * rng.standard_normal((n, mean.size))).astype(np.float32), scale


def test_shares_are_non_negative_sum_to_one_and_point_at_the_disturbed_feature(model):
    x, scale = _normal_rows(model, 8)
    for k in (0, 5, model.n_features - 1):
        disturbed = x.copy()
        disturbed[:, k] += 20 * scale[k]
        shares = model.explain(disturbed)
        assert shares.shape == (8, model.n_features)
        assert (shares >= 0).all()
        assert shares.sum(axis=1) == pytest.approx(np.ones(8))
        assert (shares.argmax(axis=1) == k).all()
        assert (model.score(disturbed) > model.threshold).all()


def test_explaining_does_not_change_the_scores(model):
    x, _ = _normal_rows(model, 16)
    before = model.score(x)
    model.explain(x)
    assert np.array_equal(model.score(x), before)
