from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from engine_build.quantization import graph as g
from engine_build.quantization import ort_layout
from engine_build.quantization.int8 import Int8Options, quantize_int8
from engine_build.quantization.ort_layout import committed_ranges, derive_ort_int8, non_negative_tensors
from evaluation import saturation
from tests.model_factory import make_test_model


def _weights(model: onnx.ModelProto) -> dict:
    inits = g.initializer_map(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] in producers:
            out[node.name] = numpy_helper.to_array(inits[producers[node.input[1]].input[0]])
    return out


def test_ort_form_keeps_calibration_and_weights_and_folds_relu6(tmp_path: Path) -> None:
    model = make_test_model(tmp_path / "m.onnx", width=16, input_size=32)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32)
    committed = quantize_int8(model, tmp_path / "m.int8.onnx", x, Int8Options(method="minmax")).path
    info = derive_ort_int8(model, committed, tmp_path / "ort.onnx")
    derived, source = onnx.load(str(tmp_path / "ort.onnx")), onnx.load(str(committed))
    # identical int8 weights
    for name, weight in _weights(source).items():
        np.testing.assert_array_equal(_weights(derived)[name], weight)
    # ReLU6 outputs are u8 over [0, amax] with amax from the committed calibration, and Clip is gone
    inits = g.initializer_map(derived)
    ranges = committed_ranges(source)
    q = {n.input[0]: n for n in derived.graph.node if n.op_type == "QuantizeLinear"}
    relu6_out = [name for name in q if name in ranges and name in non_negative_tensors(onnx.load(str(model)))]
    assert relu6_out, sorted(q)
    for name in relu6_out:
        zero, scale = (numpy_helper.to_array(inits[q[name].input[i]]) for i in (2, 1))
        assert inits[q[name].input[2]].data_type == TensorProto.UINT8 and int(zero) == 0
        assert abs(float(scale) * 255 - ranges[name]) < 1e-5 * max(1.0, ranges[name])
    assert "stem_act" in non_negative_tensors(onnx.load(str(model)))
    assert not any(n.op_type == "Clip" for n in derived.graph.node)
    assert info["calibration_method"] == "minmax" and "u8 activations" in info["ort_layout"]
    # ONNX Runtime fuses every convolution
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(tmp_path / "ort.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") == 3
    # and computes what the committed model computes, up to the finer ReLU6 grid
    a = g.run_batches(g.session(committed), x)
    b = g.run_batches(g.session(tmp_path / "ort.onnx"), x)
    assert np.max(np.abs(a - b)) < 0.05


def test_weight_modes_for_cpus_without_vnni(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_test_model(tmp_path / "m.onnx", width=16, input_size=32)
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32)
    committed = quantize_int8(model, tmp_path / "m.int8.onnx", x, Int8Options(method="minmax")).path
    monkeypatch.setattr(ort_layout, "x86_without_vnni", lambda *a: True)
    info = derive_ort_int8(model, committed, tmp_path / "auto.onnx")
    assert info["ort_weights"] == "s8" and info["x86_without_vnni"] and "saturate" in info["saturation_note"]
    u8 = derive_ort_int8(model, committed, tmp_path / "u8.onnx", weights="u8")
    assert "no int16 saturation" in u8["ort_weights_reason"]
    assert all(w.dtype == np.uint8 for w in _weights(onnx.load(str(tmp_path / "u8.onnx"))).values())
    assert saturation.saturation_report(tmp_path / "u8.onnx", x[:2]) == []  # no u8 x s8 layer left
    rr = derive_ort_int8(model, committed, tmp_path / "rr.onnx", weights="s8-reduce-range")
    assert rr["reduce_range"] and max(int(np.abs(w).max()) for w in _weights(onnx.load(str(tmp_path / "rr.onnx"))).values()) <= 64
    monkeypatch.setattr(ort_layout, "x86_without_vnni", lambda *a: False)
    assert derive_ort_int8(model, committed, tmp_path / "s8.onnx")["ort_weights"] == "s8"
    with pytest.raises(ValueError, match="weights must be one of"):
        derive_ort_int8(model, committed, tmp_path / "x.onnx", weights="s4")


def test_vnni_detection_from_cpu_flags() -> None:
    assert ort_layout.x86_without_vnni("flags\t: fpu sse avx2 avx512f avx512bw\n", "x86_64")  # Skylake-SP: affected
    assert not ort_layout.x86_without_vnni("flags\t: fpu avx2 avx512f avx512_vnni\n", "x86_64")  # Cascade Lake and later
    assert not ort_layout.x86_without_vnni("flags\t: fpu avx2 avx_vnni\n", "x86_64")  # Alder Lake
    assert not ort_layout.x86_without_vnni("", "aarch64")  # Jetson CPU: sdot, no int16 step
