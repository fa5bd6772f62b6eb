"""``inference``: the anomaly models, the defect classifier and the model registry they may come from."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.config.base import ConfigPath, EnvStr, ListAsTuple, Section, StrList
from agent.config.errors import Problems


class ModelEntry(Section):
    type: Literal["anomaly"] = Field(
        "anomaly",
        description="The kind of model, a registry key: anomaly = a window score (higher = more anomalous) "
        "and its threshold.",
    )
    path: ConfigPath | None = Field(
        None,
        description="Directory holding manifest.json and the ONNX file it names (pinned: loaded once, at start).",
    )
    model_id: EnvStr | None = Field(
        None,
        description="Instead of path: the model id, whose newest usable version in inference.models_dir runs.",
    )
    sensors: StrList = Field(
        min_length=1, description="Glob patterns on the {sensor} tag of the sources this model scores."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelEntry:
        problems = Problems()
        if self.path is None and self.model_id is None:
            problems.add("path", "is required (or model_id, to use inference.models_dir)")
        if self.path is not None and self.model_id is not None:
            problems.add("model_id", "give either path or model_id, not both")
        if self.model_id is not None and not self.model_id.strip():
            problems.add("model_id", "must not be empty")
        problems.check()
        return self


class DefectSection(Section):
    type: Literal["classifier"] = Field(
        "classifier",
        description="The kind of model, a registry key: classifier = class probabilities of a vibration window.",
    )
    path: ConfigPath | None = Field(
        None,
        description="Directory of the defect classifier (manifest.json + ONNX); null = no defect classification.",
    )
    model_id: EnvStr | None = Field(
        None,
        description="Instead of path: the classifier's model id, whose newest usable version in "
        "inference.models_dir runs.",
    )
    sensors: StrList = Field(
        ("vibration*",),
        description="Glob patterns on the {sensor} tag of the vibration sources whose anomalous windows are "
        "classified.",
    )
    speed_field: EnvStr = Field(
        "rpm",
        description="Field of the machine's process readings with the shaft speed in rpm (its latest value is "
        "used); bearing frequencies follow it.",
    )
    default_rpm: float | None = Field(
        None,
        gt=0,
        description="Shaft speed used until a speed reading arrives; null = do not classify a machine of "
        "unknown speed.",
    )

    @model_validator(mode="after")
    def _check(self) -> DefectSection:
        problems = Problems()
        if self.path is not None and self.model_id is not None:
            problems.add("model_id", "give either inference.defect.path or model_id, not both")
        problems.check()
        return self


class InferenceSection(Section):
    models: Annotated[tuple[ModelEntry, ...], ListAsTuple] = Field(
        (),
        description="The anomaly models: each a model directory (path) or a model id (model_id), and the "
        "sensors it scores.",
    )
    defect: DefectSection = Field(
        default_factory=DefectSection,
        description="Which defect an anomalous vibration window shows (class and probabilities go into the "
        "alert and InfluxDB).",
    )
    models_dir: ConfigPath | None = Field(
        None,
        description="A models directory watched for new versions: each subdirectory with a manifest.json is "
        "one version of one model; entries that name a model_id run its highest usable version.",
    )
    reload_interval_s: float = Field(
        10.0, ge=0, description="How often models_dir is checked for new versions; 0 = never."
    )
    threads: int = Field(1, gt=0, description="ONNX Runtime intra-op threads per model.")
    max_batch: int = Field(
        256, gt=0, description="Windows ready at the same time are scored together, up to this many per run."
    )

    @model_validator(mode="after")
    def _check(self) -> InferenceSection:
        problems = Problems()
        if self.models_dir is not None and not self.models_dir.is_dir():
            problems.add("models_dir", f"{self.models_dir} is not a directory")
        if self.models_dir is None:
            for i, entry in enumerate(self.models):
                if entry.model_id is not None:
                    problems.add(f"models[{i}].model_id", "needs inference.models_dir to look it up in")
            if self.defect.model_id is not None:
                problems.add("defect.model_id", "needs inference.models_dir to look it up in")
        problems.check()
        return self
