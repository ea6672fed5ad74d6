"""build_engine: one keyed, staged, atomically written and manifested artifact per call."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_build.backends import ONNXRUNTIME
from engine_build.build import build_engine
from service.engines import EngineManifest, engine_key
from service.errors import EngineError
from service.model_info import ModelInfo
from tests.model_factory import make_test_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("build") / "m.onnx", width=8, input_size=32)


def test_the_artifact_is_named_by_its_key_and_no_staging_is_left(model: Path, tmp_path: Path) -> None:
    entry = build_engine(model, "fp16", "onnxruntime", tmp_path)
    assert entry.key == engine_key(ModelInfo.from_onnx(model), "fp16", ONNXRUNTIME)
    assert entry.file == entry.key.file_name(".onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.file, "manifest.json"])
    assert EngineManifest.load(tmp_path).find(entry.key) == entry


def test_a_failed_build_leaves_neither_file_nor_manifest_entry(model: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no calibrated INT8 model"):
        build_engine(model, "int8", "onnxruntime", tmp_path)
    assert list(tmp_path.iterdir()) == []  # the staging folder went with the failure


def test_an_unknown_precision_is_refused(model: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unknown precision 'int2'; use one of fp32, fp16, int8, int4"):
        build_engine(model, "int2", "onnxruntime", tmp_path)
