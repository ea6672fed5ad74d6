"""The backend registry: one entry per backend, names matching the settings, options typed."""

from __future__ import annotations

import pytest
from typing_extensions import get_args

from engine_build.backends import AUTO, BACKENDS, ONNXRUNTIME, TENSORRT, get_backend
from engine_build.onnxruntime_builder import OnnxRuntimeBuildOptions
from engine_build.tensorrt_builder import TensorRTBuildOptions
from service.config import BackendName, load_settings
from service.errors import EngineError


def test_the_registry_holds_every_backend_the_settings_accept() -> None:
    assert set(BACKENDS) | {AUTO} == set(get_args(BackendName))
    assert {b.suffix for b in BACKENDS.values()} == {".onnx", ".engine"}


def test_an_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(EngineError, match="unknown backend 'openvino'; use tensorrt, onnxruntime or auto"):
        get_backend("openvino")


def test_onnxruntime_runs_anywhere_and_keys_engines_by_its_version() -> None:
    import onnxruntime

    assert ONNXRUNTIME.available() and get_backend("onnxruntime") is ONNXRUNTIME
    assert (ONNXRUNTIME.device(), ONNXRUNTIME.tool_version()) == ("cpu", onnxruntime.__version__)


def test_the_server_builds_with_options_from_its_settings() -> None:
    settings = load_settings(max_batch=12)
    assert TENSORRT.server_options(settings) == TensorRTBuildOptions(max_batch=12)
    assert ONNXRUNTIME.server_options(settings) == OnnxRuntimeBuildOptions()


def test_flags_for_other_backends_are_left_out_and_unknown_options_refused() -> None:
    flags = {"int8_model": None, "int8_weights": "u8", "max_batch": 4, "workspace_mib": 64}
    assert ONNXRUNTIME.options_from_flags(flags) == OnnxRuntimeBuildOptions(int8_weights="u8")
    assert TENSORRT.options_from_flags(flags) == TensorRTBuildOptions(max_batch=4, workspace_mib=64)
    with pytest.raises(EngineError, match="unknown TensorRTBuildOptions option.*int8_weights"):
        TENSORRT.options(**flags)
