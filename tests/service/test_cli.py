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


def test_init_makes_credentials_once_and_shows_the_key_once(tmp_path: Path) -> None:
    import stat

    assert run_service(["init"], {"ANEMIA_CREDENTIALS_DIR": ""}).returncode == 2  # no directory: says so
    directory = tmp_path / "credentials"
    env = {"ANEMIA_CREDENTIALS_DIR": str(directory)}
    first = run_service(["init"], env)
    assert first.returncode == 0, first.stderr
    key = (directory / "api-key").read_text().strip()
    assert len(key) >= 32 and key in first.stdout and "shown only this once" in first.stdout
    fingerprint = [line for line in first.stdout.splitlines() if "sha256 fingerprint" in line][0].split("fingerprint ")[1].split()[0]
    assert len(fingerprint.split(":")) == 32
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()} == {
        "api-key": 0o600, "metrics-token": 0o600, "tls-key.pem": 0o600, "tls-cert.pem": 0o644,
    }
    second = run_service(["init"], env)
    assert second.returncode == 0 and key not in second.stdout and "not shown again" in second.stdout
    assert fingerprint in second.stdout  # the same certificate
