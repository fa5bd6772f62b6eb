"""InfluxDB points of camera images: the ``image`` reference (at ingest) and the ``inspection`` (at scoring).

Names from ``agent.schema``; the line format from ``agent.storage.line_protocol``, like every other point.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent import schema
from agent.records import ImageFrame
from agent.storage.line_protocol import FieldValue, format_point


def image_lines(frame: ImageFrame, stored: bool) -> list[str]:
    """One ``image`` point at the image's time: what it was and where its bytes are (the store, by sha256)."""
    fields: dict[str, FieldValue] = {
        schema.IMAGE_SHA256_FIELD: frame.sha256,
        schema.IMAGE_FORMAT_FIELD: frame.format,
        schema.IMAGE_WIDTH_FIELD: frame.width,
        schema.IMAGE_HEIGHT_FIELD: frame.height,
        schema.IMAGE_BYTES_FIELD: len(frame.payload),
        schema.IMAGE_STORED_FIELD: stored,
    }
    fields.update({f"{schema.IMAGE_METADATA_PREFIX}{k}": v for k, v in frame.metadata.items()})
    return [format_point(schema.IMAGE, dict(frame.source.tags), fields, frame.time_ns)]


def inspection_lines(
    frame: ImageFrame,
    model_id: str,
    model_version: str,
    class_name: str,
    probabilities: Mapping[str, float],
    defect: bool,
) -> list[str]:
    """One ``inspection`` point at the image's time: the class as a tag, its probability and one per class."""
    fields: dict[str, FieldValue] = {schema.DEFECT_PROBABILITY_FIELD: float(probabilities[class_name])}
    fields.update({f"{schema.DEFECT_PROBABILITY_PREFIX}{name}": float(p) for name, p in probabilities.items()})
    fields[schema.IMAGE_SHA256_FIELD] = frame.sha256
    fields[schema.INSPECTION_DEFECT_FIELD] = defect
    tags = dict(frame.source.tags)
    tags.update(
        {
            schema.TAG_MODEL_ID: model_id,
            schema.TAG_MODEL_VERSION: model_version,
            schema.INSPECTION_CLASS_TAG: class_name,
        }
    )
    return [format_point(schema.INSPECTION, tags, fields, frame.time_ns)]
