"""Adapters on disk (``agent.adaptation.adapter``) and served on one shared base (``agent.adaptation.runtime``)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.adaptation.adapter import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    AdapterError,
    AdapterManifest,
    BaseIdentity,
    data_sha256,
    load_adapter,
    sha256_path,
    write_adapter,
)
from agent.adaptation.lora import BaseMlp, LoraWeights
from agent.adaptation.runtime import MachineAdapters, Mode, merged_session, open_model
from pdm_tools.models import defect_mlp
from pdm_tools.models.defect_mlp import DefectMlp


def tiny_classifier(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    sizes = (6, 8, 3)
    return defect_mlp.build_onnx(
        DefectMlp(
            mean=rng.normal(size=6).astype(np.float32),
            scale=rng.uniform(0.5, 2, 6).astype(np.float32),
            weights=tuple(rng.normal(0, 0.7, (a, b)).astype(np.float32) for a, b in itertools.pairwise(sizes)),
            biases=tuple(rng.normal(0, 0.1, b).astype(np.float32) for b in sizes[1:]),
            class_names=("normal", "inner_race", "outer_race"),
        )
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A base model directory as the agent ships it (manifest.json names the file and its sha256)."""
    directory = tmp_path / "base"
    directory.mkdir()
    (directory / "model.fp32.onnx").write_bytes(tiny_classifier().SerializeToString())
    manifest = {
        "model_id": "tiny-classifier",
        "version": "1.0.0",
        "file": "model.fp32.onnx",
        "sha256": sha256_path(directory / "model.fp32.onnx"),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return directory


def trained_like(base: BaseMlp, seed: int) -> LoraWeights:
    init = LoraWeights.initial(base, base.layer_names, rank=2, alpha=4.0, seed=seed)
    rng = np.random.default_rng(seed + 1)
    return LoraWeights(
        2, 4.0, {k: (a, rng.normal(0, 0.3, b.shape).astype(np.float32)) for k, (a, b) in init.factors.items()}
    )


def manifest_for(identity: BaseIdentity, machine: str, weights: LoraWeights, base: BaseMlp) -> AdapterManifest:
    x = np.zeros((4, base.n_features), np.float32)
    return AdapterManifest(
        schema_version=1,
        kind="lora-adapter",
        base=identity.to_dict(),
        machine=machine,
        rank=weights.rank,
        alpha=weights.alpha,
        layers={n: [base.layer(n).fan_in, base.layer(n).fan_out] for n in weights.layers},
        standardization=weights.standardization is not None,
        file="",
        sha256="0" * 64,
        threshold=None,
        data={"count": 4, "sha256": data_sha256(x), "description": "test rows"},
        metrics={"before": {"accuracy": 0.5}, "after": {"accuracy": 0.9}},
        training={"seed": 0, "seconds": 0.1, "peak_memory_bytes": 1},
        created_at="2026-11-26T00:00:00Z",
    )


@pytest.mark.parametrize("own_standardization", [False, True])
@pytest.mark.parametrize("mode", ["shared", "merged"])
def test_adapter_round_trip_matches_numpy_and_the_merged_model(
    model_dir: Path, tmp_path: Path, own_standardization: bool, mode: Mode
) -> None:
    shared = MachineAdapters.from_model_dir(model_dir, mode=mode, standardization=True)
    base = shared.base
    weights = trained_like(base, seed=3)
    if own_standardization:
        rng = np.random.default_rng(8)
        own = (
            rng.normal(size=base.n_features).astype(np.float32),
            rng.uniform(1, 3, base.n_features).astype(np.float32),
        )
        weights = LoraWeights(weights.rank, weights.alpha, weights.factors, own)
    write_adapter(tmp_path / "m07", weights, manifest_for(shared.identity, "m07", weights, base))
    assert (tmp_path / "m07" / ADAPTER_FILE).is_file() and (tmp_path / "m07" / MANIFEST_FILE).is_file()
    manifest = shared.add_adapter("m07", tmp_path / "m07")
    assert manifest.machine == "m07" and manifest.rank == 2
    _, loaded = load_adapter(tmp_path / "m07", shared.identity, base)
    assert (loaded.standardization is not None) == own_standardization
    x = np.random.default_rng(9).normal(size=(32, base.n_features)).astype(np.float32)
    served = shared.run("m07", x, ["probabilities"])[0]
    reference = base.predict_proba(x, weights)
    np.testing.assert_allclose(served, reference, atol=1e-5)
    np.testing.assert_allclose(base.predict_proba(x, loaded), reference, atol=1e-5)
    merged = merged_session(onnx.load(str(model_dir / "model.fp32.onnx")), loaded)
    np.testing.assert_allclose(merged.run(["probabilities"], {"features": x})[0], served, atol=1e-5)


@pytest.mark.parametrize("mode", ["shared", "merged"])
def test_machines_without_an_adapter_get_the_base_bit_for_bit(model_dir: Path, tmp_path: Path, mode: Mode) -> None:
    shared = MachineAdapters.from_model_dir(model_dir, mode=mode)
    weights = trained_like(shared.base, seed=1)
    write_adapter(tmp_path / "m01", weights, manifest_for(shared.identity, "m01", weights, shared.base))
    shared.add_adapter("m01", tmp_path / "m01")
    original = open_model(onnx.load(str(model_dir / "model.fp32.onnx")))
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    want = [o.tobytes() for o in original.run(None, {"features": x})]
    assert [o.tobytes() for o in shared.run("m02", x)] == want
    assert [o.tobytes() for o in shared.run(None, x)] == want
    assert [o.tobytes() for o in shared.run("m01", x)] != want


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("version", "1.1.0", "different version"),
        ("sha256", "f" * 64, "different sha256"),
        ("model_id", "other-model", "different model_id"),
    ],
)
def test_an_adapter_for_another_base_is_refused(
    model_dir: Path, tmp_path: Path, field: str, value: str, message: str
) -> None:
    shared = MachineAdapters.from_model_dir(model_dir)
    other = BaseIdentity(**{**shared.identity.to_dict(), field: value})
    weights = trained_like(shared.base, seed=2)
    write_adapter(tmp_path / "m03", weights, manifest_for(other, "m03", weights, shared.base))
    with pytest.raises(AdapterError, match=f"trained on base .*{message}.*train a new adapter"):
        shared.add_adapter("m03", tmp_path / "m03")
    assert shared.machines() == []


def test_a_changed_adapter_file_is_refused(model_dir: Path, tmp_path: Path) -> None:
    shared = MachineAdapters.from_model_dir(model_dir)
    weights = trained_like(shared.base, seed=4)
    write_adapter(tmp_path / "m04", weights, manifest_for(shared.identity, "m04", weights, shared.base))
    path = tmp_path / "m04" / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="sha256 mismatch"):
        shared.add_adapter("m04", tmp_path / "m04")


def test_an_adapter_for_another_machine_is_refused(model_dir: Path, tmp_path: Path) -> None:
    shared = MachineAdapters.from_model_dir(model_dir)
    weights = trained_like(shared.base, seed=5)
    write_adapter(tmp_path / "m05", weights, manifest_for(shared.identity, "m05", weights, shared.base))
    with pytest.raises(AdapterError, match="for machine 'm05', not 'm06'"):
        shared.add_adapter("m06", tmp_path / "m05")


def test_unknown_manifest_keys_are_refused(model_dir: Path, tmp_path: Path) -> None:
    shared = MachineAdapters.from_model_dir(model_dir)
    weights = trained_like(shared.base, seed=6)
    write_adapter(tmp_path / "m08", weights, manifest_for(shared.identity, "m08", weights, shared.base))
    path = tmp_path / "m08" / MANIFEST_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    data["surprise"] = 1
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(AdapterError, match=r"unknown key\(s\) \['surprise'\]"):
        shared.add_adapter("m08", tmp_path / "m08")


def test_adapt_machine_trains_writes_and_serves_an_autoencoder_adapter(tmp_path: Path) -> None:
    from agent.adaptation.adapt import adapt_machine
    from agent.adaptation.lora import LoraConfig
    from pdm_tools.models.autoencoder import AutoencoderConfig, fit_autoencoder
    from pdm_tools.models.export import build_onnx

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(2, 6))
    fleet = (rng.normal(size=(600, 2)) @ mixing + 0.05 * rng.normal(size=(600, 6))).astype(np.float32)
    ae, _ = fit_autoencoder(fleet[:500], fleet[500:], seed=0, config=AutoencoderConfig(hidden=(6, 2, 6)))
    model_dir = tmp_path / "ae"
    model_dir.mkdir()
    (model_dir / "model.fp32.onnx").write_bytes(build_onnx(ae).SerializeToString())
    (model_dir / "manifest.json").write_text(
        json.dumps(
            {
                "model_id": "tiny-ae",
                "version": "2.0.0",
                "file": "model.fp32.onnx",
                "sha256": sha256_path(model_dir / "model.fp32.onnx"),
            }
        ),
        encoding="utf-8",
    )
    own = (rng.normal(size=(300, 2)) @ (mixing + rng.normal(size=(2, 6))) + 0.05 * rng.normal(size=(300, 6))).astype(
        np.float32
    )
    manifest = adapt_machine(model_dir, "m09", own, tmp_path / "m09", config=LoraConfig(rank=1, alpha=2.0), seed=1)
    assert manifest.base == {
        "model_id": "tiny-ae",
        "version": "2.0.0",
        "sha256": sha256_path(model_dir / "model.fp32.onnx"),
    }
    assert manifest.metrics["after"]["held_out_loss"] < manifest.metrics["before"]["held_out_loss"]
    assert manifest.threshold is not None and manifest.data["count"] == 300
    assert manifest.training["peak_memory_bytes"] > 0
    shared = MachineAdapters.from_model_dir(model_dir, mode="shared")
    shared.add_adapter("m09", tmp_path / "m09")
    _, weights = load_adapter(tmp_path / "m09", shared.identity)
    np.testing.assert_allclose(
        shared.run("m09", own, ["score"])[0], shared.base.score(own, weights), rtol=1e-4, atol=1e-5
    )


def test_a_shared_session_refuses_an_adapter_it_has_no_branch_for(model_dir: Path, tmp_path: Path) -> None:
    shared = MachineAdapters.from_model_dir(model_dir, mode="shared", layers=["layer0_matmul"])
    weights = trained_like(shared.base, seed=7)
    write_adapter(tmp_path / "m10", weights, manifest_for(shared.identity, "m10", weights, shared.base))
    with pytest.raises(AdapterError, match="no overridable"):
        shared.add_adapter("m10", tmp_path / "m10")
