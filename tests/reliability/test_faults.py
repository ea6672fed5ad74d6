"""Broken engines and manifests, through `python -m service`: a clear error naming the file and
the fix, exit code 2, and no port ever opened — or, with ANEMIA_AUTO_BUILD=1, a rebuild."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import pytest

from engine_build.build import build_engine
from service.engines import EngineManifest
from service.model_info import file_sha256
from tests.model_factory import make_test_model
from tests.reliability.corpus import valid_png
from tests.reliability.server import PROJECT_ROOT, ServerProcess, free_port


def run_service(env: Dict[str, str], prefix: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    values = dict(os.environ)
    values.update(env)
    values.update({"HOST": "127.0.0.1", "PORT": str(free_port())})
    return subprocess.run(
        (prefix or []) + [sys.executable, "-m", "service"],
        cwd=str(PROJECT_ROOT),
        env=values,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_refused(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    # Never half-ready: the port was never opened, the model never served.
    assert "Uvicorn running" not in result.stderr and "backend loaded" not in result.stderr


@pytest.fixture
def engines(tmp_path: Path, model_path: Path) -> Path:
    directory = tmp_path / "engines"
    build_engine(model_path, "fp32", "onnxruntime", directory)
    return directory


def engine_file(engine_dir: Path) -> Path:
    (entry,) = EngineManifest.load(engine_dir).entries
    return engine_dir / entry.file


def env_for(model_path: Path, engine_dir: Path, **extra: str) -> Dict[str, str]:
    values = {"ANEMIA_MODEL": str(model_path), "ANEMIA_ENGINE_DIR": str(engine_dir), "ANEMIA_INTRA_OP_THREADS": "1"}
    values.update(extra)
    return values


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupted"])
def test_damaged_engine_stops_startup_naming_the_file_and_the_fix(model_path: Path, engines: Path, damage: str) -> None:
    path = engine_file(engines)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x5A
        path.write_bytes(bytes(data))
    assert_refused(run_service(env_for(model_path, engines)), str(path), "ANEMIA_AUTO_BUILD=1", "build_engines.py")


def test_manifest_for_another_model_is_refused(model_path: Path, tmp_path: Path) -> None:
    other = make_test_model(tmp_path / "other.onnx", seed=11)
    foreign = tmp_path / "foreign"
    build_engine(other, "fp32", "onnxruntime", foreign)
    assert_refused(run_service(env_for(model_path, foreign)), str(foreign / "manifest.json"), "was built for model", "ANEMIA_AUTO_BUILD=1")


def test_manifest_for_another_device_is_refused(model_path: Path, engines: Path) -> None:
    manifest = engines / "manifest.json"
    payload = json.loads(manifest.read_text())
    payload["engines"][0]["device"] = "orin-nano-8gb"
    manifest.write_text(json.dumps(payload))
    assert_refused(run_service(env_for(model_path, engines)), "device orin-nano-8gb (this is cpu)", "ANEMIA_AUTO_BUILD=1")


def test_unreadable_manifest_is_refused(model_path: Path, engines: Path) -> None:
    (engines / "manifest.json").write_text('{"engines": [{"file": ')
    assert_refused(run_service(env_for(model_path, engines)), str(engines / "manifest.json"), "unreadable")


def test_unreadable_engine_directory_is_refused(model_path: Path, engines: Path) -> None:
    prefix: List[str] = []
    if os.geteuid() == 0:
        # root reads through chmod 000; drop the two capabilities that let it, as a service user lacks them.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: chmod 000 cannot make a directory unreadable to root")
        drop = "-dac_override,-dac_read_search"
        prefix = [setpriv, "--bounding-set=" + drop, "--inh-caps=" + drop]
    engines.chmod(0)
    try:
        result = run_service(env_for(model_path, engines), prefix)
    finally:
        engines.chmod(0o755)
    assert_refused(result, "engine directory {} is not readable".format(engines), "ANEMIA_ENGINE_DIR")


def test_engine_that_matches_its_manifest_but_does_not_load_stops_startup(model_path: Path, engines: Path) -> None:
    """Garbage with a consistent manifest (a bad build, a bad disk): the backend fails to open."""
    path = engine_file(engines)
    path.write_bytes(b"\x08\x07" + os.urandom(4000))
    manifest = engines / "manifest.json"
    payload = json.loads(manifest.read_text())
    payload["engines"][0].update(file_size_bytes=path.stat().st_size, sha256=file_sha256(path))
    manifest.write_text(json.dumps(payload))
    result = run_service(env_for(model_path, engines))
    assert result.returncode != 0 and "Uvicorn running" not in result.stderr, result.stderr[-3000:]
    assert str(path) in result.stderr, result.stderr[-3000:]
    assert "Application startup failed" in result.stderr, result.stderr[-3000:]
    assert "could not be opened" in result.stderr and "delete it and build it with" in result.stderr, result.stderr[-3000:]


def test_auto_build_replaces_a_truncated_engine_and_serves(model_path: Path, engines: Path) -> None:
    path = engine_file(engines)
    path.write_bytes(path.read_bytes()[:1000])
    with ServerProcess(env_for(model_path, engines, ANEMIA_AUTO_BUILD="1")) as server:
        response = httpx.post(server.url + "/v1/predict", files={"image": ("a.png", valid_png(), "image/png")}, timeout=30)
        assert response.status_code == 200
    assert engine_file(engines).stat().st_size > 1000
