"""The TensorRT builder against the fake TensorRT (8.2 bindings generation and 10.x named tensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Tuple

import numpy as np
import pytest

from engine_build.backends import TENSORRT
from engine_build.build import build_engine
from engine_build.quantization.int8 import Int8Options, quantize_int8
from service.engines import EngineEntry, EngineManifest
from service.errors import EngineError
from service.model_info import file_sha256
from tests.fakes import install_fakes
from tests.model_factory import make_test_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("trt_build")
    path = make_test_model(directory / "m.onnx", width=8, input_size=32)
    calibration = np.random.default_rng(0).uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32)
    quantize_int8(path, directory / "m.int8.onnx", calibration, Int8Options(method="minmax"))
    return path


def build_tensorrt_engine(model: Path, precision: str, engine_dir: Path, force: bool = False, **options: Any) -> EngineEntry:
    return build_engine(model, precision, TENSORRT, engine_dir, TENSORRT.options(**options), force=force)


def _header(engine: Path) -> dict:
    from tests.fakes.fake_tensorrt import ENGINE_MAGIC

    data = engine.read_bytes()
    return json.loads(data[len(ENGINE_MAGIC) :].split(b"\n", 1)[0])


@pytest.mark.parametrize("generation", ["10", "8"])
@pytest.mark.parametrize("precision,flags", [("fp32", []), ("fp16", ["FP16"]), ("int8", ["FP16", "INT8"])])
def test_builds_each_precision_with_profile_workspace_and_manifest(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, generation: str, precision: str, flags: list
) -> None:
    trt, _ = install_fakes(monkeypatch, generation)
    entry = build_tensorrt_engine(model, precision, tmp_path, max_batch=6)
    header = _header(tmp_path / entry.file)
    assert header["flags"] == flags
    assert header["workspace"] == 256 * 1024 * 1024
    assert header["profile"] == [[1, 3, 32, 32], [3, 3, 32, 32], [6, 3, 32, 32]]
    assert entry.backend == "tensorrt" and entry.device == "Fake Orin sm_87" and entry.tool_version == "tensorrt-" + trt.__version__
    assert entry.build_info["api"] == ("named tensors" if generation == "10" else "bindings")
    if precision == "int8":
        assert entry.build_info["calibration_method"] == "minmax" and entry.build_info["source"].endswith("m.int8.onnx")
    assert EngineManifest.load(tmp_path).find(entry.key) == entry


@pytest.mark.parametrize("generation", ["10", "8"])
def test_parser_errors_name_the_node(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, generation: str) -> None:
    """TensorRT 10 reports node names; 8.2 only an index, which the builder maps back to the name."""
    install_fakes(monkeypatch, generation, unsupported_ops=("GlobalAveragePool",))
    with pytest.raises(EngineError, match=r"could not parse .*m\.onnx:\n  node 'pool'.*No importer registered for op: GlobalAveragePool"):
        build_tensorrt_engine(model, "fp32", tmp_path)


def test_int8_refused_without_fast_int8(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fakes(monkeypatch, "8", fast_int8=False, device_name="NVIDIA Tegra X2", compute_capability=(6, 2))
    with pytest.raises(EngineError, match=r"INT8 refused: NVIDIA Tegra X2 sm_62 has no fast INT8.*use --precision fp16"):
        build_tensorrt_engine(model, "int8", tmp_path)
    assert not list(tmp_path.glob("*.engine"))


def test_int4_refused_before_tensorrt_10_and_built_on_10(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fakes(monkeypatch, "8", device_name="NVIDIA Tegra X2", compute_capability=(6, 2))
    with pytest.raises(EngineError, match=r"INT4 is not available with TensorRT 8\.2.*from TensorRT 10"):
        build_tensorrt_engine(model, "int4", tmp_path)

    install_fakes(monkeypatch, "10")
    entry = build_tensorrt_engine(model, "int4", tmp_path)
    assert entry.build_info["int4_layers"] == ["classifier"]
    assert _header(tmp_path / entry.file)["flags"] == ["FP16", "INT4"]


def test_timing_cache_is_written_and_reused(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fakes(monkeypatch, "10")
    cache = tmp_path / "timing.cache"
    build_tensorrt_engine(model, "fp32", tmp_path, timing_cache=cache)
    first = cache.read_bytes()
    build_tensorrt_engine(model, "fp16", tmp_path, timing_cache=cache)
    assert int(cache.read_bytes().split(b":")[1]) > int(first.split(b":")[1])  # loaded, then extended


def test_existing_engine_reused_unless_forced(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trt, _ = install_fakes(monkeypatch, "10")
    first = build_tensorrt_engine(model, "fp16", tmp_path)
    assert build_tensorrt_engine(model, "fp16", tmp_path) == first and len(trt._builds) == 1
    build_tensorrt_engine(model, "fp16", tmp_path, force=True)
    assert len(trt._builds) == 2


def test_int8_from_a_foreign_calibration_is_refused(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fakes(monkeypatch, "10")
    other = make_test_model(tmp_path / "other.onnx", seed=5, width=8, input_size=32)
    x = np.zeros((2, 3, 32, 32), np.float32)
    quantize_int8(other, tmp_path / "other.int8.onnx", x, Int8Options(method="minmax"))
    before = file_sha256(tmp_path / "other.int8.onnx")
    with pytest.raises(EngineError, match="was calibrated from model .* recalibrate"):
        build_tensorrt_engine(model, "int8", tmp_path / "engines", int8_model=tmp_path / "other.int8.onnx")
    assert file_sha256(tmp_path / "other.int8.onnx") == before  # the foreign artifact is left as it was
    assert not list((tmp_path / "engines").glob("*.engine")) and not EngineManifest.load(tmp_path / "engines").entries


def test_unknown_or_bad_options_are_refused_when_made() -> None:
    with pytest.raises(EngineError, match="unknown TensorRTBuildOptions option.*max_batchsize"):
        TENSORRT.options(max_batchsize=8)
    with pytest.raises(EngineError, match="max_batch must be at least 1"):
        TENSORRT.options(max_batch=0)
