"""What the server needs from an ONNX file, read straight from its protobuf bytes.

The server needs the model's ``metadata_props`` and its graph's input and output names, never its
weights: ``onnx.load`` would parse every initializer into Python objects and importing ``onnx``
alone costs about 16 MB of resident memory and a second of start-up (docs/benchmarks.md, memory).
This reader walks the protobuf wire format of ``ModelProto`` and skips every field it does not
need without copying it (initializers, nodes), on a memory map of the file.

Field numbers are ONNX's (onnx/onnx.proto, stable since IR version 3): ModelProto.graph = 7,
ModelProto.metadata_props = 14; GraphProto.input = 11, GraphProto.output = 12;
ValueInfoProto.name = 1; StringStringEntryProto.key = 1, .value = 2.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

_MODEL_GRAPH = 7
_MODEL_METADATA_PROPS = 14
_GRAPH_INPUT = 11
_GRAPH_OUTPUT = 12
_VALUE_INFO_NAME = 1
_ENTRY_KEY = 1
_ENTRY_VALUE = 2

_VARINT, _FIXED64, _LENGTH_DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5


class OnnxHeaderError(ValueError):
    """The bytes are not a well-formed ONNX ModelProto."""


@dataclass
class OnnxHeader:
    metadata_props: Dict[str, str] = field(default_factory=dict)
    inputs: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)


def _varint(data: memoryview, offset: int, end: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= end or shift > 63:
            raise OnnxHeaderError("truncated or malformed varint at byte {}".format(offset))
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _fields(data: memoryview, start: int, end: int) -> Iterator[Tuple[int, int, int, int]]:
    """(field number, wire type, payload start, payload end) for each field of one message;
    a varint's payload is its value's bytes."""
    offset = start
    while offset < end:
        key, offset = _varint(data, offset, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise OnnxHeaderError("field number 0 at byte {}".format(offset))
        if wire == _VARINT:
            _, after = _varint(data, offset, end)
        elif wire == _FIXED64:
            after = offset + 8
        elif wire == _FIXED32:
            after = offset + 4
        elif wire == _LENGTH_DELIMITED:
            length, offset = _varint(data, offset, end)
            after = offset + length
        else:  # groups are not used by ONNX
            raise OnnxHeaderError("unsupported wire type {} at byte {}".format(wire, offset))
        if after > end:
            raise OnnxHeaderError("field {} runs past the end of its message".format(number))
        yield number, wire, offset, after
        offset = after


def _text(data: memoryview, start: int, end: int) -> str:
    try:
        return bytes(data[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxHeaderError("a string field is not UTF-8") from None


def _string_field(data: memoryview, start: int, end: int, wanted: int) -> str:
    for number, wire, payload_start, payload_end in _fields(data, start, end):
        if number == wanted and wire == _LENGTH_DELIMITED:
            return _text(data, payload_start, payload_end)
    return ""


def parse_header(data: memoryview) -> OnnxHeader:
    header = OnnxHeader()
    end = len(data)
    for number, wire, start, stop in _fields(data, 0, end):
        if wire != _LENGTH_DELIMITED:
            continue
        if number == _MODEL_METADATA_PROPS:
            key, value = "", ""
            for entry_number, entry_wire, s, e in _fields(data, start, stop):
                if entry_wire == _LENGTH_DELIMITED and entry_number == _ENTRY_KEY:
                    key = _text(data, s, e)
                elif entry_wire == _LENGTH_DELIMITED and entry_number == _ENTRY_VALUE:
                    value = _text(data, s, e)
            header.metadata_props[key] = value
        elif number == _MODEL_GRAPH:
            for graph_number, graph_wire, s, e in _fields(data, start, stop):
                if graph_wire != _LENGTH_DELIMITED:
                    continue
                if graph_number == _GRAPH_INPUT:
                    header.inputs.append(_string_field(data, s, e, _VALUE_INFO_NAME))
                elif graph_number == _GRAPH_OUTPUT:
                    header.outputs.append(_string_field(data, s, e, _VALUE_INFO_NAME))
    return header


def read_header(path: Path) -> OnnxHeader:
    """The metadata and graph input/output names of the ONNX file at ``path``; OnnxHeaderError
    (a ValueError) when it is not a ModelProto, OSError when it cannot be read."""
    with open(str(path), "rb") as handle:
        if handle.seek(0, 2) == 0:
            raise OnnxHeaderError("the file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return parse_header(view)
            finally:
                view.release()
