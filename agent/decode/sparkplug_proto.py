"""The Sparkplug B payload (Eclipse Tahu ``sparkplug_b.proto``, package ``org.eclipse.tahu.protobuf``), built
from a descriptor written here instead of a ``protoc``-generated module.

Why hand-written: the host reads only ``Payload`` and ``Payload.Metric``. Their nested messages that the agent
never stores (``DataSet``, ``Template``, ``PropertySet``, ``MetaData``, extensions) are declared as ``bytes``:
on the wire a message and a byte string are both length-delimited, so the payloads parse the same, and a
value of those kinds is recognised (to be dead-lettered) without parsing it. ``name`` and ``string_value`` are
``bytes`` too, so that invalid UTF-8 becomes a specific ``DecodeError`` instead of a parser failure. No
generated file to keep in step with the protobuf runtime, no ``protoc`` in the build; parsing is still the
runtime's C implementation (upb). ``tests/unit/test_sparkplug_decode.py`` checks the field numbers and wire
types against the Tahu schema as ``pysparkplug`` ships it.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto

# DataType enum of sparkplug_b.proto (the numbers are the wire values).
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT = 9, 10, 11, 12, 13, 14
DATASET, TEMPLATE = 16, 19

DATATYPE_NAMES: Final = {
    0: "Unknown", 1: "Int8", 2: "Int16", 3: "Int32", 4: "Int64", 5: "UInt8", 6: "UInt16", 7: "UInt32",
    8: "UInt64", 9: "Float", 10: "Double", 11: "Boolean", 12: "String", 13: "DateTime", 14: "Text",
    15: "UUID", 16: "DataSet", 17: "Bytes", 18: "File", 19: "Template", 20: "PropertySet",
    21: "PropertySetList", 22: "Int8Array", 23: "Int16Array", 24: "Int32Array", 25: "Int64Array",
    26: "UInt8Array", 27: "UInt16Array", 28: "UInt32Array", 29: "UInt64Array", 30: "FloatArray",
    31: "DoubleArray", 32: "BooleanArray", 33: "StringArray", 34: "DateTimeArray",
}  # fmt: skip

# (name, number, type, label, oneof index or None)
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_METRIC_FIELDS: Final = (
    ("name", 1, _F.TYPE_BYTES, None),
    ("alias", 2, _F.TYPE_UINT64, None),
    ("timestamp", 3, _F.TYPE_UINT64, None),
    ("datatype", 4, _F.TYPE_UINT32, None),
    ("is_historical", 5, _F.TYPE_BOOL, None),
    ("is_transient", 6, _F.TYPE_BOOL, None),
    ("is_null", 7, _F.TYPE_BOOL, None),
    ("metadata", 8, _F.TYPE_BYTES, None),
    ("properties", 9, _F.TYPE_BYTES, None),
    ("int_value", 10, _F.TYPE_UINT32, 0),
    ("long_value", 11, _F.TYPE_UINT64, 0),
    ("float_value", 12, _F.TYPE_FLOAT, 0),
    ("double_value", 13, _F.TYPE_DOUBLE, 0),
    ("boolean_value", 14, _F.TYPE_BOOL, 0),
    ("string_value", 15, _F.TYPE_BYTES, 0),
    ("bytes_value", 16, _F.TYPE_BYTES, 0),
    ("dataset_value", 17, _F.TYPE_BYTES, 0),
    ("template_value", 18, _F.TYPE_BYTES, 0),
    ("extension_value", 19, _F.TYPE_BYTES, 0),
)
_PAYLOAD_FIELDS: Final = (
    ("timestamp", 1, _F.TYPE_UINT64, _OPT),
    ("metrics", 2, _F.TYPE_MESSAGE, _REP),
    ("seq", 3, _F.TYPE_UINT64, _OPT),
    ("uuid", 4, _F.TYPE_BYTES, _OPT),
    ("body", 5, _F.TYPE_BYTES, _OPT),
)


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="pdm_agent/sparkplug_b_host.proto", package="pdm.sparkplug_b")
    f.syntax = "proto2"
    payload = f.message_type.add(name="Payload")
    for name, number, kind, label in _PAYLOAD_FIELDS:
        field = payload.field.add(name=name, number=number, type=kind, label=label)
        if kind == _F.TYPE_MESSAGE:
            field.type_name = ".pdm.sparkplug_b.Payload.Metric"
    payload.extension_range.add(start=6, end=536_870_912)
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    for name, number, kind, oneof in _METRIC_FIELDS:
        field = metric.field.add(name=name, number=number, type=kind, label=_OPT)
        if oneof is not None:
            field.oneof_index = oneof
    return f


_POOL: Final = descriptor_pool.DescriptorPool()
_POOL.Add(_file())
Payload: Final[Any] = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("pdm.sparkplug_b.Payload"))
"""The message class of a Sparkplug B payload (``Payload.FromString(bytes)``; ``Payload.Metric`` inside)."""
