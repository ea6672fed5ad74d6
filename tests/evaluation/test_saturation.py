from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.model_info import INPUT_NAME, OUTPUT_NAME
from evaluation.saturation import INT16_MAX, _im2col, _pair_sums, saturation_report


def _gemm_qdq(path: Path, weights: np.ndarray) -> Path:
    """x -> Q(s=1/127) -> DQ -> Gemm(DQ(int8 W)) -> out: activations are exactly round(127 x)."""
    nodes = [
        helper.make_node("QuantizeLinear", [INPUT_NAME, "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Gemm", ["xd", "wd"], [OUTPUT_NAME], transB=1, name="fc"),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 127, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.int8), "xz"),
        numpy_helper.from_array(weights.astype(np.int8), "w"),
        numpy_helper.from_array(np.full(len(weights), 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(len(weights), np.int8), "wz"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", len(weights)])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_pair_sums_saturate_where_vpmaddubsw_would_and_reduce_range_never_does(tmp_path: Path) -> None:
    # Activation 1.0 -> s8 127 -> u8 255. Weights 127,127 pair to 64770 > 32767; 1,1 to 510.
    weights = np.array([[127, 127, 1, 1], [1, 1, 1, 1]])
    path = _gemm_qdq(tmp_path / "g.onnx", weights)
    rows = saturation_report(path, np.ones((3, 4), np.float32))
    assert len(rows) == 1 and rows[0]["layer"] == "fc"
    assert rows[0]["saturated_pairs"] == 1 / 4  # one of the 4 (output, pair) sums per position
    assert rows[0]["affected_outputs"] == 1 / 2
    assert rows[0]["rel_error_max"] > 0.4  # 64770 clipped to 32767 out of 65280
    assert rows[0]["rr_saturated_pairs"] == 0.0


def test_only_full_range_weights_can_overflow_an_int16_pair_sum() -> None:
    assert INT16_MAX == np.iinfo(np.int16).max
    u8_max = np.array([[255, 255]], np.int16)
    assert int(_pair_sums(u8_max, np.array([[127, 127]], np.int8)).max()) > INT16_MAX  # 8-bit weights: 64770
    assert int(_pair_sums(u8_max, np.array([[64, 64]], np.int8)).max()) <= INT16_MAX  # reduce_range (7-bit): 32640


def test_im2col_orders_k_as_channel_then_kernel_position() -> None:
    x = np.arange(2 * 3 * 3).reshape(1, 2, 3, 3)
    cols = _im2col(x, (2, 2), (1, 1), (0, 0, 0, 0), 0)
    assert cols.shape == (4, 8)
    np.testing.assert_array_equal(cols[0], [0, 1, 3, 4, 9, 10, 12, 13])
    assert _pair_sums(np.array([[255, 255, 3]], np.int16), np.array([[127, 127, 2]], np.int8)).tolist() == [[[64770, 6]]]
