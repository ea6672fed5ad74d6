"""Engine lookup refuses what does not match, naming the file and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine_build.build import build_engine
from service.config import load_settings
from service.engines import EngineManifest
from service.errors import EngineError
from service.model_info import ModelInfo
from service.startup import resolve_engine
from tests.model_factory import make_test_model


@pytest.fixture
def built(tmp_path: Path, model_path: Path) -> Path:
    engine_dir = tmp_path / "engines"
    build_engine(model_path, "fp32", "onnxruntime", engine_dir)
    return engine_dir


def test_manifest_records_what_the_engine_was_built_from(built: Path, model_path: Path) -> None:
    (entry,) = EngineManifest.load(built).entries
    model = ModelInfo.from_onnx(model_path)
    assert entry.model_sha256 == model.sha256 and entry.precision == "fp32" and entry.backend == "onnxruntime"
    assert entry.device == "cpu" and entry.file_size_bytes == (built / entry.file).stat().st_size
    assert entry.file.startswith("anemia-" + model.sha256[:12] + "-fp32-onnxruntime-cpu-")


def test_missing_engine_names_the_build_command(tmp_path: Path, model_path: Path) -> None:
    settings = load_settings(model=model_path, engine_dir=tmp_path / "empty")
    with pytest.raises(EngineError, match="python build_engines.py --backend onnxruntime --precision fp32"):
        resolve_engine(settings, ModelInfo.from_onnx(model_path))


def test_engine_for_another_model_is_refused(built: Path, tmp_path: Path) -> None:
    other_model = make_test_model(tmp_path / "other.onnx", seed=7)
    settings = load_settings(model=other_model, engine_dir=built)
    with pytest.raises(EngineError, match="was built for model"):
        resolve_engine(settings, ModelInfo.from_onnx(other_model))


def test_engine_for_another_device_or_runtime_version_is_refused(built: Path, model_path: Path) -> None:
    manifest_path = built / "manifest.json"
    payload = json.loads(manifest_path.read_text())
    payload["engines"][0]["tool_version"] = "0.0.1"
    manifest_path.write_text(json.dumps(payload))
    settings = load_settings(model=model_path, engine_dir=built)
    with pytest.raises(EngineError, match="onnxruntime 0.0.1"):
        resolve_engine(settings, ModelInfo.from_onnx(model_path))


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupted"])
def test_damaged_engine_files_are_refused(built: Path, model_path: Path, damage: str) -> None:
    (entry,) = EngineManifest.load(built).entries
    path = built / entry.file
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    settings = load_settings(model=model_path, engine_dir=built)
    with pytest.raises(EngineError) as raised:
        resolve_engine(settings, ModelInfo.from_onnx(model_path))
    assert str(path) in raised.value.message and "ANEMIA_AUTO_BUILD=1" in raised.value.message


def test_unreadable_manifest_is_refused(built: Path, model_path: Path) -> None:
    (built / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="manifest.json is unreadable"):
        resolve_engine(load_settings(model=model_path, engine_dir=built), ModelInfo.from_onnx(model_path))


def test_model_without_service_metadata_is_refused(tmp_path: Path, model_path: Path) -> None:
    import onnx

    model = onnx.load(str(model_path))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(EngineError, match="lacks the service's metadata"):
        ModelInfo.from_onnx(bare)


def test_copy_of_engine_dir_elsewhere_still_resolves(built: Path, tmp_path: Path, model_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(str(built), str(moved))
    engine = resolve_engine(load_settings(model=model_path, engine_dir=moved), ModelInfo.from_onnx(model_path))
    assert engine.path.parent == moved
