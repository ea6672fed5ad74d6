"""deploy/systemd/anemia.service passes `systemd-analyze verify` (paths pointed at this checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.promql import DEPLOY_DIR

UNIT = DEPLOY_DIR / "systemd" / "anemia.service"
ENV_FILE = DEPLOY_DIR / "systemd" / "anemia.env"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    # verify checks that executables exist: point the venv's python at this interpreter.
    unit = tmp_path / "anemia.service"
    unit.write_text(text.replace("/opt/anemia/.venv/bin/python", sys.executable).replace("/etc/anemia/anemia.env", str(ENV_FILE)))
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path: Path) -> None:
    result = _verify(tmp_path, UNIT.read_text())
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_verify_reports_a_bad_directive(tmp_path: Path) -> None:
    result = _verify(tmp_path, UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    assert "sometimes" in result.stdout + result.stderr


def test_unit_runs_prepare_then_the_server() -> None:
    text = UNIT.read_text()
    assert "ExecStartPre=/opt/anemia/.venv/bin/python -m service prepare" in text
    assert "ExecStart=/opt/anemia/.venv/bin/python -m service\n" in text
    assert "User=anemia" in text and "ReadWritePaths=/var/lib/anemia" in text
    env = dict(line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if line and not line.startswith("#"))
    assert env["ANEMIA_ENGINE_DIR"].startswith("/var/lib/anemia")
    # HTTPS with a generated key by default, in a directory the unit may write
    assert env["ANEMIA_CREDENTIALS_DIR"].startswith("/var/lib/anemia/")
    assert "ANEMIA_API_KEY" not in env
    # descriptors above the server's connection cap (service/edge.py derives it from this limit)
    (limit,) = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("LimitNOFILE=")]
    assert int(limit) >= 4096
