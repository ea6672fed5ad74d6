"""`python -m service` as `make serve` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import PROJECT_ROOT


def run_service(args: list, env_overrides: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-m", "service"] + args, cwd=str(PROJECT_ROOT), env=env, capture_output=True, text=True, timeout=120
    )


def test_without_a_model_it_stops_and_says_how_to_get_one(tmp_path: Path) -> None:
    result = run_service([], {"ANEMIA_MODEL": str(tmp_path / "none.onnx"), "ANEMIA_ENGINE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "not found" in result.stderr and "make train" in result.stderr


def test_bad_setting_stops_naming_the_variable(tmp_path: Path) -> None:
    result = run_service([], {"ANEMIA_PRECISION": "fp64"})
    assert result.returncode == 2 and "ANEMIA_PRECISION" in result.stderr


def test_prepare_builds_the_engine_once(tmp_path: Path, model_path: Path) -> None:
    env = {"ANEMIA_MODEL": str(model_path), "ANEMIA_ENGINE_DIR": str(tmp_path / "engines")}
    first = run_service(["prepare"], env)
    assert first.returncode == 0, first.stderr
    assert "engine ready" in first.stdout
    built = sorted(p.name for p in (tmp_path / "engines").iterdir())
    second = run_service(["prepare"], env)
    assert second.returncode == 0 and sorted(p.name for p in (tmp_path / "engines").iterdir()) == built
    assert any(name.endswith(".onnx") for name in built) and "manifest.json" in built
