from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.model_info import INPUT_NAME, OUTPUT_NAME, file_sha256
from service.preprocess import PreprocessSpec
from engine_build.quantization import graph as g
from engine_build.quantization.calibration import ImageCalibrationReader, TensorCalibrationReader, pick_subset
from engine_build.quantization.int8 import Int8Options, quantize_int8
from tests.images import conjunctiva_rgba, encode
from tests.model_factory import make_test_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("int8") / "m.onnx", width=16, input_size=32)


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (24, 3, 32, 32)).astype(np.float32)


def _producers(model: onnx.ModelProto) -> dict:
    return {out: n for n in model.graph.node for out in n.output}


def test_qdq_format_is_what_tensorrt_and_ort_both_take(model: Path, inputs: np.ndarray, tmp_path: Path) -> None:
    result = quantize_int8(model, tmp_path / "q.onnx", inputs, Int8Options(method="minmax"))
    q = onnx.load(str(result.path))
    inits = g.initializer_map(q)
    producers = _producers(q)
    for node in q.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            weight = inits[dq.input[0]]
            assert weight.data_type == TensorProto.INT8  # stored as int8, not float + Q/DQ
            assert numpy_helper.to_array(inits[dq.input[1]]).size == weight.dims[0]  # per output channel
            assert len(node.input) > 2 and node.input[2] in inits and inits[node.input[2]].data_type == TensorProto.FLOAT
    quantize_nodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_nodes and all(n.input[0] not in inits for n in quantize_nodes)  # no Q on weights
    for node in quantize_nodes:  # per-tensor, symmetric int8 activations (zero point 0)
        zero = numpy_helper.to_array(inits[node.input[2]])
        assert zero.dtype == np.int8 and zero.size == 1 and int(zero) == 0
        assert numpy_helper.to_array(inits[node.input[1]]).size == 1
    # the probability is not put on an int8 grid
    assert producers[OUTPUT_NAME].op_type == "Sigmoid"


def _qdq_arithmetic_session(path: Path) -> "onnxruntime.InferenceSession":
    """The Q/DQ graph as written, graph optimisations off: float convs on dequantized int8 values,
    activations rounded at each QuantizeLinear. ONNX Runtime's fused integer kernels would add the
    CPU's own arithmetic (int16 pair sums saturate on x86 without VNNI, e.g. the 2-core AVX2 EPYC
    of this project's CI); this checks the calibration itself on any CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_int8_tracks_fp32_and_records_its_source(model: Path, inputs: np.ndarray, tmp_path: Path) -> None:
    result = quantize_int8(model, tmp_path / "q.onnx", inputs, Int8Options(method="percentile", percentile=99.99), calibration_note="test")
    reference = g.run_batches(g.session(model), inputs)
    quantized = g.run_batches(_qdq_arithmetic_session(result.path), inputs)
    assert np.max(np.abs(quantized - reference)) < 0.05
    meta = g.quantization_metadata(onnx.load(str(result.path)))
    assert meta["source_sha256"] == file_sha256(model)
    assert meta["calibration_method"] == "percentile" and meta["calibration_images"] == len(inputs)
    props = {p.key for p in onnx.load(str(result.path)).metadata_props}
    assert "preprocess.input_size" in props and "threshold" in props  # the service metadata travels along


def test_keep_float_aliases_leave_first_conv_and_classifier_unquantized(model: Path, inputs: np.ndarray, tmp_path: Path) -> None:
    result = quantize_int8(model, tmp_path / "q.onnx", inputs, Int8Options(method="minmax", keep_float=("first_conv", "classifier")))
    q = onnx.load(str(result.path))
    inits = g.initializer_map(q)
    by_name = {n.name: n for n in q.graph.node}
    assert by_name["stem_conv"].input[1] in inits and inits[by_name["stem_conv"].input[1]].data_type == TensorProto.FLOAT
    assert by_name["classifier"].input[1] in inits
    assert by_name["block_project"].input[1] not in inits  # quantized: fed by a DequantizeLinear
    assert result.info["kept_float"] == ["stem_conv", "classifier"]
    with pytest.raises(ValueError, match="no node named 'nope'"):
        quantize_int8(model, tmp_path / "r.onnx", inputs, Int8Options(keep_float=("nope",)))


def _conv_model(path: Path, seed: int = 0) -> Path:
    """image -> Conv (no padding, so the analytic correction is exact) -> pool -> Gemm -> Sigmoid."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.4, (6, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "w", "b"], ["conv_out"], name="conv"),
        helper.make_node("GlobalAveragePool", ["conv_out"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logit"], transB=1, name="fc"),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_NAME], name="sigmoid"),
    ]
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.zeros(6, np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.5, (1, 6)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(1, np.float32), "fc_b"),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, dict(PreprocessSpec(input_size=12).to_metadata(), model_name="t", model_version="t", threshold="0.5"))
    onnx.save(model, str(path))
    return path


def test_bias_correction_removes_the_mean_shift_of_weight_rounding(tmp_path: Path) -> None:
    model = _conv_model(tmp_path / "conv.onnx")
    # Inputs with a large common offset: weight rounding error times a nonzero mean is the bias.
    x = (np.random.default_rng(2).uniform(0, 1, (32, 3, 12, 12)) + 2.0).astype(np.float32)
    float_mean = g.channel_means(onnx.load(str(model)), ["conv_out"], x)["conv_out"]
    errors = {}
    for correct in (False, True):
        out = quantize_int8(model, tmp_path / "q{}.onnx".format(int(correct)), x, Int8Options(method="minmax", bias_correction=correct))
        quant_mean = g.channel_means(onnx.load(str(out.path)), ["conv_out"], x)["conv_out"]
        errors[correct] = np.abs(quant_mean - float_mean)
    assert errors[True].mean() < 0.5 * errors[False].mean()


def test_calibration_reader_batches_rewinds_and_honours_ranges() -> None:
    reader = TensorCalibrationReader(np.zeros((10, 3, 4, 4), np.float32), batch_size=4)
    assert [len(b[INPUT_NAME]) for b in iter(reader.get_next, None)] == [4, 4, 2]
    reader.rewind()
    assert reader.get_next() is not None
    reader.set_range(1, 2)
    assert [len(b[INPUT_NAME]) for b in iter(reader.get_next, None)] == [4]
    with pytest.raises(ValueError):
        TensorCalibrationReader(np.zeros((0, 3, 4, 4), np.float32))


def test_image_reader_uses_the_service_preprocessing(tmp_path: Path) -> None:
    paths = []
    for seed in range(3):
        path = tmp_path / "img{}.png".format(seed)
        path.write_bytes(encode(conjunctiva_rgba(seed=seed)))
        paths.append(path)
    reader = ImageCalibrationReader(paths, PreprocessSpec(input_size=32), batch_size=2)
    batch = reader.get_next()
    assert batch is not None and batch[INPUT_NAME].shape == (2, 3, 32, 32)
    # letterbox fill (127.5) normalizes to exactly 0 outside the alpha ROI
    assert np.isclose(batch[INPUT_NAME][0, :, 0, 0], 0.0).all()
    assert pick_subset(paths, 2, seed=0) == pick_subset(paths, 2, seed=0) and len(pick_subset(paths, 2)) == 2
