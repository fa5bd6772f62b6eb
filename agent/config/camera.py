"""``camera``: images as a second input beside the readings: topics, limits, the image store, the classifier."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.config.base import (
    ConfigPath,
    EnvChoice,
    EnvStr,
    ListAsTuple,
    Section,
    StrList,
    registry_key,
    registry_schema,
)
from agent.config.errors import Problems
from agent.decode.image import DEFAULT_SENSOR, DEFAULT_TEMPLATE, camera_template
from agent.decode.registry import DECODERS

ImageFormatName = Literal["jpeg", "png", "bmp"]


class ImageStoreSection(Section):
    dir: ConfigPath | None = Field(
        None, description="Folder of the image files (named by sha256); null = images/ beside the spool."
    )
    max_bytes: int = Field(
        268_435_456,
        gt=0,
        description="Images kept at most (bytes on disk); the oldest are deleted first (counted evictions).",
    )
    max_age_s: float = Field(
        604_800.0,
        gt=0,
        description="Images older than this are deleted (7 days by default); an alert's image is fetched before.",
    )


class CameraModelSection(Section):
    type: Annotated[str, EnvChoice] = Field(
        "image-classifier",
        description="The kind of model, a registry key: image-classifier = class probabilities of one frame.",
    )
    path: ConfigPath | None = Field(
        None,
        description="Directory of the image classifier (manifest.json + ONNX); null = images are stored, not scored.",
    )


class CameraSection(Section):
    enabled: bool = Field(False, description="Take in camera images on topic_template (beside mqtt's readings).")
    decoder: Annotated[str, EnvChoice, registry_key(DECODERS), registry_schema(DECODERS)] = Field(
        "image",
        description="The decoder of the camera topics, a registry key: image = raw JPEG/PNG/BMP bytes or the "
        'JSON envelope {"v":1, "ts", "encoding", "data" (base64), "metadata"} (docs/camera.md).',
    )
    topic_template: EnvStr = Field(
        DEFAULT_TEMPLATE,
        description="Camera topics; each {name} is a tag, {machine} is required; without {sensor} the images get "
        "the sensor tag below.",
    )
    sensor: EnvStr = Field(DEFAULT_SENSOR, description="The sensor tag of images whose template has no {sensor} level.")
    max_bytes: int = Field(
        4_194_304, gt=0, description="An image payload larger than this is rejected (dead letter too_large)."
    )
    min_width: int = Field(8, gt=0, description="Narrower images are rejected (bad_dimensions).")
    min_height: int = Field(8, gt=0, description="Lower images are rejected (bad_dimensions).")
    max_width: int = Field(
        4096, gt=0, description="Wider images are rejected from their header, before decompression (bad_dimensions)."
    )
    max_height: int = Field(4096, gt=0, description="Taller images are rejected likewise (bad_dimensions).")
    formats: Annotated[tuple[ImageFormatName, ...], ListAsTuple] = Field(
        ("jpeg", "png", "bmp"), min_length=1, description="Accepted formats; others: unsupported_format."
    )
    store: ImageStoreSection = Field(
        default_factory=ImageStoreSection,
        description="The local content-addressed image store that alerts point to (GET /images/{sha256}).",
    )
    model: CameraModelSection = Field(
        default_factory=CameraModelSection, description="The image classifier that scores every image."
    )
    alert_type: EnvStr = Field(
        "surface-defect",
        description="The alert type of defect images; its debounce (raise_n of raise_m images ...) is "
        "alerts.types.<alert_type>.",
    )
    defect_classes: StrList = Field(
        (),
        description="Classes that are defects (alerted); empty = every class of the model (NEU has no 'ok' class).",
    )
    min_confidence: float = Field(
        0.5,
        gt=0,
        le=1,
        description="An image is a defect when its top class is a defect class with at least this probability.",
    )
    max_pending_bytes: int = Field(
        67_108_864,
        gt=0,
        description="Decoded pixels of the images waiting to be classified, at most (bytes; a 200x200 frame is "
        "40 kB); beyond it an image is stored but not classified (images.unscored, reason backlog).",
    )
    public_url: EnvStr | None = Field(
        None,
        description="Base URL alerts give for fetching an image (+ /images/{sha256}); null = "
        "http://{health.host}:{health.port}.",
    )

    @model_validator(mode="after")
    def _check(self) -> CameraSection:
        problems = Problems()
        try:
            camera_template(self.topic_template)
        except ValueError as exc:
            problems.add("topic_template", str(exc))
        if self.min_width > self.max_width:
            problems.add("min_width", "must be <= max_width")
        if self.min_height > self.max_height:
            problems.add("min_height", "must be <= max_height")
        if not self.sensor or any(c in self.sensor for c in "+#/"):
            problems.add("sensor", f"{self.sensor!r} must be one topic level (no '/', '+' or '#')")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            problems.add("public_url", f"{self.public_url!r} must start with http:// or https://")
        problems.check()
        return self
