"""deploy/jetson/acceptance.sh end to end, with the fake TensorRT/pycuda standing in for JetPack.

Shim ``tensorrt`` and ``pycuda.driver`` modules on PYTHONPATH load the fakes in every Python the
script starts, so the script's real commands (build, evaluate, benchmark) run unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.preprocess import PreprocessSpec
from engine_build.quantization.int8 import Int8Options, quantize_int8
from tests.images import conjunctiva_rgba, encode
from tests.model_factory import make_test_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "deploy" / "jetson" / "acceptance.sh"

SHIM_TENSORRT = """
import os, sys
import pycuda.driver as _cuda
from tests.fakes import fake_tensorrt
sys.modules[__name__] = fake_tensorrt.make_module(
    _cuda, os.environ["FAKE_TRT_GENERATION"], fast_int8=os.environ.get("FAKE_TRT_FAST_INT8") == "1")
"""
SHIM_DRIVER = """
import os, sys
from tests.fakes import fake_pycuda
sys.modules[__name__] = fake_pycuda.make_module(os.environ["FAKE_GPU_NAME"], (6, 2))
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "generation,fast_int8,gpu,built,refused",
    [
        ("8", "0", "NVIDIA Tegra X2", {"fp32", "fp16"}, {"int8": "no fast INT8", "int4": "INT4 is not available with TensorRT 8.2"}),
        ("10", "1", "Orin", {"fp32", "fp16", "int8", "int4"}, {}),
    ],
    ids=["tx2-trt8.2", "orin-trt10"],
)
def test_acceptance_script_builds_evaluates_and_benchmarks(tmp_path: Path, generation: str, fast_int8: str, gpu: str, built: set, refused: dict) -> None:
    shim = tmp_path / "shim"
    (shim / "pycuda").mkdir(parents=True)
    (shim / "tensorrt.py").write_text(SHIM_TENSORRT)
    (shim / "pycuda" / "__init__.py").write_text("")
    (shim / "pycuda" / "driver.py").write_text(SHIM_DRIVER)
    spec = PreprocessSpec(input_size=32)
    model = make_test_model(tmp_path / "model" / "anemia.onnx", width=8, spec=spec)
    quantize_int8(model, tmp_path / "model" / "anemia.int8.onnx", np.zeros((4, 3, 32, 32), np.float32), Int8Options(method="minmax"))
    data = tmp_path / "data"
    for folder, label in (("Anemic", 1), ("Non-anemic", 0)):
        (data / folder).mkdir(parents=True)
        for i in range(3):
            (data / folder / "Image_{}{}.png".format(label, i)).write_bytes(encode(conjunctiva_rgba(width=40, height=20, seed=i + 10 * label)))
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([str(shim), str(REPO_ROOT)]),
        FAKE_TRT_GENERATION=generation,
        FAKE_TRT_FAST_INT8=fast_int8,
        FAKE_GPU_NAME=gpu,
        ANEMIA_MODEL=str(model),
        ANEMIA_ENGINE_DIR=str(tmp_path / "engines"),
        DATA_DIR=str(data),
        OUT_DIR=str(tmp_path / "out"),
        OMP_NUM_THREADS="1",
        BENCH_ARGS="--smoke --threads 1",
    )
    result = subprocess.run(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    output = result.stdout
    assert result.returncode == 0, output
    assert "tensorrt {}".format("10.3.0.26" if generation == "10" else "8.2.1.8") in output
    for precision, reason in refused.items():
        assert reason in output
    assert "| variant | batch 1 median (ms)" in output  # the benchmark table
    for precision in built:
        assert "| {} |".format(precision) in output
    for precision in set(refused):
        assert "{}: not evaluated".format(precision) in output
    assert (tmp_path / "out" / "evaluation" / "report.json").is_file() and (tmp_path / "out" / "benchmark.json").is_file()
    # the project's inference benchmark ran the TensorRT engines through the service's backend factory
    assert "| fp32 | tensorrt |" in (tmp_path / "out" / "inference_benchmark.md").read_text()
