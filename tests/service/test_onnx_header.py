"""The ONNX header reader agrees with onnx itself on metadata and names, and refuses garbage."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from service.onnx_header import OnnxHeaderError, read_header


def test_matches_onnx_on_the_test_model(model_path: Path) -> None:
    proto = onnx.load(str(model_path))
    header = read_header(model_path)
    assert header.metadata_props == {p.key: p.value for p in proto.metadata_props}
    assert header.inputs == [i.name for i in proto.graph.input]
    assert header.outputs == [o.name for o in proto.graph.output]


def test_initializers_and_unicode_are_skipped_and_kept(tmp_path: Path) -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1000], [0.5] * 1000)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000])],
        initializer=[weight],
    )
    model = helper.make_model(graph, producer_name="t")
    helper.set_model_props(model, {"note": "Hämoglobin < 11 g/dL", "empty": ""})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    header = read_header(path)
    assert header.metadata_props == {"note": "Hämoglobin < 11 g/dL", "empty": ""}
    assert (header.inputs, header.outputs) == (["x"], ["y"])


@pytest.mark.parametrize("data", [b"", b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"not an onnx model at all, just text"])
def test_garbage_is_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(OnnxHeaderError):
        read_header(path)

