"""Every registered plugin passes the same checks: decoders, sinks, modalities and model kinds.

A new registry entry without an example here fails ``test_every_*_has_an_example``: a plugin is not done
until it passes the contract of its seam.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.config import parse_config
from agent.config.mqtt import DecoderSection
from agent.decode import sparkplug_proto
from agent.decode.base import DecodeLimits, DecoderContext
from agent.decode.errors import CODES, DecodeError
from agent.decode.registry import DECODERS, build_decoder
from agent.decode.topic import TopicTemplate
from agent.features.base import Continues, Restart, Skip
from agent.features.extract import extract_matrix
from agent.features.registry import MODALITIES, modality
from agent.features.spec import FeatureSpec
from agent.features.windows import Windower
from agent.inference.kinds import MODEL_KINDS, model_class
from agent.metrics import Metrics
from agent.records import NS_PER_S, Decoded, ImageFrame, Message, Reading, SampleBlock, Source
from agent.storage.base import RetryableWriteError
from agent.storage.registry import SINKS, build_sink

REPO = Path(__file__).resolve().parents[2]
T0 = 1_790_000_000 * NS_PER_S
TEMPLATE = TopicTemplate("factory/{site}/{line}/{machine}/{sensor}")
SOURCE = Source.of(site="s1", line="l1", machine="m01", sensor="x")

# --- decoders -------------------------------------------------------------------------------------------


# A valid message of each decoder's format, and what it decodes to.
def _sparkplug_birth() -> bytes:
    payload = sparkplug_proto.Payload(timestamp=T0 // 1_000_000, seq=0)
    payload.metrics.add(name=b"bdSeq", datatype=sparkplug_proto.UINT64, long_value=0)
    payload.metrics.add(name=b"temperature", alias=1, datatype=sparkplug_proto.DOUBLE, double_value=61.5)
    return bytes(payload.SerializeToString())


def _png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


DECODER_EXAMPLES: dict[str, tuple[Message, int]] = {
    "json_v1": (Message("factory/s1/l1/m01/process", b'{"v":1,"ts":1790000000,"value":1.5}', 1, 1, T0), 1),
    "sparkplug_b": (Message("spBv1.0/g1/NBIRTH/m01", _sparkplug_birth(), 0, 1, T0), 1),
    "image": (Message("factory/s1/l1/m01/camera", _png(), 1, 1, T0), 1),
}
# The decoder's section of the config (mqtt.decoder), for the decoders that read more than its type.
DECODER_OPTIONS = {"sparkplug_b": DecoderSection(type="sparkplug_b", host_id="contract-host")}
GARBAGE = [b"", b"\xff\xfe", b"{", b"[]", b"null", b"\x00" * 64, b'{"v":99}', b"1e999", b"A" * 2_000_000]


def _decoder(kind: str):  # type: ignore[no-untyped-def]
    limits = DecodeLimits(max_payload_bytes=1_048_576)
    return build_decoder(kind, DecoderContext(TEMPLATE, limits, options=DECODER_OPTIONS.get(kind)))


def test_every_decoder_has_an_example() -> None:
    assert set(DECODERS) == set(DECODER_EXAMPLES)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_a_decoder_subscribes_and_decodes_its_example(kind: str) -> None:
    decoder = _decoder(kind)
    subscriptions = list(decoder.subscriptions())
    assert subscriptions and all(isinstance(s, str) and s for s in subscriptions)
    message, count = DECODER_EXAMPLES[kind]
    records = decoder.decode(message)
    assert len(records) == count
    assert all(isinstance(r, Reading | SampleBlock | ImageFrame) and r.source.machine == "m01" for r in records)


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize("payload", GARBAGE, ids=lambda p: repr(p[:12]))
def test_a_decoder_rejects_garbage_with_a_known_code_never_another_exception(kind: str, payload: bytes) -> None:
    message, _ = DECODER_EXAMPLES[kind]
    with pytest.raises(DecodeError) as caught:
        _decoder(kind).decode(Message(message.topic, payload, 1, 2, T0))
    assert caught.value.code in CODES and caught.value.detail


def test_an_unknown_decoder_type_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown decoder type 'xml'.*json_v1"):
        build_decoder("xml", DecoderContext(TEMPLATE))


# --- sinks ----------------------------------------------------------------------------------------------


@dataclass
class _Section:
    database: str = "pdm"
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = None
    create_database: bool = True
    org: str = "pdm"
    bucket: str = "pdm"
    token: str | None = None


@dataclass
class _StorageSettings:
    """What the sinks read from ``storage`` (the real config section has these and more)."""

    url: str
    timeout_s: float = 2.0
    v1: _Section = field(default_factory=_Section)
    v2: _Section = field(default_factory=_Section)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", sorted(SINKS))
def test_a_sink_that_cannot_reach_its_database_says_retry_and_closes(kind: str) -> None:
    sink = build_sink(kind, _StorageSettings(url=f"http://127.0.0.1:{_closed_port()}"))
    try:
        with pytest.raises(RetryableWriteError):
            sink.write(["reading,machine=m01 value=1 1790000000000000000"])
    finally:
        sink.close()


def test_an_unknown_sink_type_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown sink type 'csv'.*influx_v1, influx_v2"):
        build_sink("csv", _StorageSettings(url="http://127.0.0.1:1"))


# --- modalities -----------------------------------------------------------------------------------------


def _vibration_items(n: int) -> list[Decoded]:
    rng = np.random.default_rng(1)
    rate, size = 10240.0, 1024
    return [
        SampleBlock(SOURCE, T0 + round(i * size * NS_PER_S / rate), rate, rng.standard_normal(size).astype(np.float32))
        for i in range(n)
    ]


def _process_items(n: int) -> list[Decoded]:
    return [Reading(SOURCE, T0 + i * NS_PER_S, {"a": 1.0 + i % 3, "b": 0.5 * i}) for i in range(n)]


MODALITY_EXAMPLES: dict[str, tuple[FeatureSpec, Callable[[int], list[Decoded]], Decoded]] = {
    "vibration": (
        FeatureSpec(
            kind="vibration",
            window_samples=2048,
            hop_samples=1024,
            channels=("value",),
            band_edges_hz=(0.0, 100.0, 1000.0),
        ),
        _vibration_items,
        Reading(SOURCE, T0, {"value": 1.0}),
    ),
    "process": (
        FeatureSpec(kind="process", window_samples=10, hop_samples=5, channels=("a", "b")),
        _process_items,
        SampleBlock(SOURCE, T0, 100.0, np.zeros(4, dtype=np.float32)),
    ),
}


def test_every_modality_has_an_example() -> None:
    assert set(MODALITIES) == set(MODALITY_EXAMPLES)


@pytest.mark.parametrize("kind", sorted(MODALITIES))
def test_a_modality_windows_its_stream_and_extracts_finite_features_of_the_spec(kind: str) -> None:
    spec, items, _ = MODALITY_EXAMPLES[kind]
    assert modality(kind).kind == kind
    windower = Windower(lambda source: spec, Metrics())
    windows = [w for item in items(40) for w in windower.add(item)]
    assert len(windows) >= 3
    assert all(w.kind == kind and w.data.shape[-1] == spec.window_samples for w in windows)
    assert [w.start_ns for w in windows] == sorted(w.start_ns for w in windows)
    x = extract_matrix(spec, windows)
    assert x.shape == (len(windows), spec.n_features) and x.dtype == np.float32
    assert np.isfinite(x).all()


@pytest.mark.parametrize("kind", sorted(MODALITIES))
def test_a_modality_rejects_the_other_record_type_and_skips_a_repeated_item(kind: str) -> None:
    spec, items, foreign = MODALITY_EXAMPLES[kind]
    mod = modality(kind)
    assert mod.reject(spec, foreign) == "kind_mismatch"
    first, second = items(2)
    buffer = mod.new_buffer(spec, first)
    buffer.append(first)
    assert isinstance(buffer.follows(second), Continues)
    assert isinstance(buffer.follows(first), Skip | Restart)


def test_an_unknown_feature_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown feature kind 'image'"):
        modality("image")


# --- model kinds ----------------------------------------------------------------------------------------

MODEL_EXAMPLES: dict[str, Path] = {
    "anomaly": REPO / "models" / "vibration_anomaly",
    "classifier": REPO / "models" / "defect_classifier",
    "image-classifier": REPO / "models" / "surface_defect",
}


def test_every_model_kind_has_an_example() -> None:
    assert set(MODEL_KINDS) == set(MODEL_EXAMPLES)


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_a_model_kind_loads_its_shipped_model_and_refuses_another_kind(kind: str) -> None:
    model = model_class(kind).load(MODEL_EXAMPLES[kind])
    assert model.model_id and model.version
    for other, directory in MODEL_EXAMPLES.items():
        if other != kind:
            with pytest.raises(Exception, match=kind):
                model_class(kind).load(directory)


def test_the_anomaly_model_declares_its_abilities_and_they_work() -> None:
    model = model_class("anomaly").load(MODEL_EXAMPLES["anomaly"])
    x = np.zeros((2, model.spec.n_features), dtype=np.float32)
    assert model.explainable is not None and model.explainable.explain(x).shape == x.shape
    assert model.adaptable is not None and (model.adaptable.directory / "manifest.json").is_file()


# --- the config takes every registered type ---------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_the_config_accepts_every_registered_decoder_type(kind: str) -> None:
    options = DECODER_OPTIONS[kind].model_dump(exclude_defaults=True) if kind in DECODER_OPTIONS else {}
    section = {**options, "type": kind}
    assert parse_config({"mqtt": {"decoder": section}}, environ={}).mqtt.decoder.type == kind


@pytest.mark.parametrize("kind", sorted(SINKS))
def test_the_config_accepts_every_registered_sink_type(kind: str) -> None:
    assert parse_config({"storage": {"type": kind}}, environ={}).storage.type == kind
