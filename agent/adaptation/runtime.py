"""Serving adapters: per-machine merged models, or one shared base session with an adapter chosen per run.

``MachineAdapters`` holds one base model (the shipped file of a model directory) and the adapters of the
machines that have one. Machines without an adapter always run on the original base session, so their
outputs are the base model's bit for bit, and can be batched together as before. An adapted machine runs:

* ``mode="shared"`` (the default, and the only option for an INT8 QDQ base, whose weights cannot absorb
  the update without requantizing it away): on one session of the adaptable base graph
  (``graph.build_adaptable``) shared by every machine, with that machine's ``ort.LoraAdapter`` made active
  through ``RunOptions.add_active_adapter``. Measured on the classifier: +2.5 µs per run at batch 1
  (+0.1 µs per window at batch 32), 4 kB and 0.02 ms to load per machine;
* ``mode="merged"`` (FP32 bases): on its own session of ``W + (alpha/rank)·A·B`` (``graph.merge``): no
  per-run cost, but 204 kB and 1.8 ms to build per machine.

Why shared is the default: both costs are far below the 10 µs budget and the ~4 ms of feature extraction
per window, so memory decides (50x less per machine), and the same code then serves INT8 bases.
``docs/adaptation.md`` has the measurements. Lifecycle: built by the composition root at
start (from the base's model directory); ``add_adapter`` verifies an adapter against the base and raises
``AdapterError`` (an adapter of another base is never served); ``add_adapter``/``remove_adapter`` and ``run``
are called from the inference worker thread only (adapters are loaded at start or between batches).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from agent.adaptation.adapter import AdapterError, AdapterManifest, BaseIdentity, load_adapter, sha256_bytes
from agent.adaptation.graph import build_adaptable, merge, param_names
from agent.adaptation.lora import BaseMlp, LoraWeights
from agent.inference.session import session_options as agent_session_options

logger = logging.getLogger(__name__)

INPUT_NAME = "features"
Mode = Literal["shared", "merged"]


def session_options(threads: int = 1) -> ort.SessionOptions:
    """The agent's session settings (``agent.inference.session``), with ORT's initializer-in-inputs warning muted.

    The LoRA parameters are graph inputs with initializers on purpose (that is how adapters override them);
    ONNX Runtime logs a warning for each at load, which says nothing here.
    """
    options = agent_session_options(threads)
    options.log_severity_level = 3
    return options


def open_model(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    """A CPU session of an in-memory model with the agent's settings."""
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )


def merged_session(base_model: onnx.ModelProto, weights: LoraWeights, threads: int = 1) -> ort.InferenceSession:
    """A session of the per-machine model with the adapter folded into the weights (FP32 bases only)."""
    return open_model(merge(base_model, weights), threads)


class MachineAdapters:
    """One base model and the adapters of the machines that have one (see the module docstring).

    ``layers``/``standardization`` (shared mode only) fix which branches the shared graph has: an adapter
    must not need more. ``standardization=True`` lets adapters carry their own input mean and scale, at a
    measured per-run cost for every adapted machine; merged mode needs neither.
    """

    def __init__(
        self,
        base_model: Path,
        identity: BaseIdentity,
        *,
        mode: Mode = "shared",
        layers: Sequence[str] | None = None,
        standardization: bool = False,
        threads: int = 1,
    ) -> None:
        data = Path(base_model).read_bytes()
        if sha256_bytes(data) != identity.sha256:
            raise AdapterError(f"{base_model}: sha256 is not the one of base {identity.describe()}")
        self._identity = identity
        self._proto = onnx.load_from_string(data)
        self._mlp = BaseMlp.from_onnx(self._proto)
        if mode == "merged" and self._mlp.quantized:
            raise AdapterError(f"{base_model}: an INT8 base cannot be merged with adapters; use mode='shared'")
        self._mode: Mode = mode
        self._threads = threads
        self._base = open_model(self._proto, threads)
        self._outputs = [o.name for o in self._base.get_outputs()]
        self._shared: ort.InferenceSession | None = None
        self._shared_inputs: set[str] = set()
        if mode == "shared":
            graph = build_adaptable(self._proto, layers, standardization=standardization)
            self._shared = open_model(graph, threads)
            self._shared_inputs = {i.name for i in graph.graph.input}
        # machine -> (manifest, weights, what to run: a merged session, or (LoraAdapter, RunOptions))
        self._machines: dict[str, tuple[AdapterManifest, LoraWeights, object]] = {}

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        *,
        mode: Mode = "shared",
        layers: Sequence[str] | None = None,
        standardization: bool = False,
        threads: int = 1,
    ) -> MachineAdapters:
        """The shipped model of ``model_dir`` (the file its ``manifest.json`` names) as the base."""
        identity = BaseIdentity.from_model_dir(model_dir)
        file = json.loads((Path(model_dir) / "manifest.json").read_text(encoding="utf-8"))["file"]
        return cls(
            Path(model_dir) / file,
            identity,
            mode=mode,
            layers=layers,
            standardization=standardization,
            threads=threads,
        )

    @property
    def identity(self) -> BaseIdentity:
        return self._identity

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def base(self) -> BaseMlp:
        """The base as numpy (dequantized weights): what adapters are trained on."""
        return self._mlp

    def machines(self) -> list[str]:
        return sorted(self._machines)

    def adapter(self, machine: str) -> AdapterManifest | None:
        entry = self._machines.get(machine)
        return None if entry is None else entry[0]

    def add_adapter(self, machine: str, directory: Path) -> AdapterManifest:
        """Verify the adapter in ``directory`` against this base and serve it for ``machine`` from now on."""
        manifest, weights = load_adapter(directory, self._identity, self._mlp)
        if manifest.machine != machine:
            raise AdapterError(f"{directory}: adapter is for machine {manifest.machine!r}, not {machine!r}")
        runner: object
        if self._mode == "merged":
            runner = merged_session(self._proto, weights, self._threads)
        else:
            needed = [n for layer in weights.layers for n in param_names(layer)]
            if weights.standardization is not None:
                needed += ["mean", "scale"]
            missing = [n for n in needed if n not in self._shared_inputs]
            if missing:
                raise AdapterError(f"{directory}: the shared session has no overridable {missing} for this adapter")
            adapter = ort.LoraAdapter()
            adapter.Load(str(Path(directory) / manifest.file))
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
            runner = (adapter, options)  # the adapter must outlive the RunOptions that point at it
        self._machines[machine] = (manifest, weights, runner)
        logger.info(
            "adapter for machine %s on %s (%s): rank %d, layers %s",
            machine,
            self._identity.describe(),
            self._mode,
            manifest.rank,
            ",".join(manifest.layers),
        )
        return manifest

    def remove_adapter(self, machine: str) -> None:
        self._machines.pop(machine, None)

    def run(self, machine: str | None, x: np.ndarray, outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Outputs for feature rows ``x`` (float32 ``(n, F)``) of ``machine`` (its adapter if it has one)."""
        names = list(outputs) if outputs is not None else self._outputs
        feeds = {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}
        entry = None if machine is None else self._machines.get(machine)
        if entry is None:
            result = self._base.run(names, feeds)
        elif isinstance(entry[2], ort.InferenceSession):
            result = entry[2].run(names, feeds)
        else:
            assert self._shared is not None and isinstance(entry[2], tuple)
            result = self._shared.run(names, feeds, entry[2][1])
        return [np.asarray(r) for r in result]
