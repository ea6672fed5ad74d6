"""The service runs on JetPack 5's Python 3.8 and up: vermin checks every module we ship."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.support import PROJECT_ROOT


def test_code_runs_on_python_3_8() -> None:
    vermin = shutil.which("vermin") or str(PROJECT_ROOT / ".venv" / "bin" / "vermin")
    if not shutil.which(vermin):
        pytest.skip("vermin is not installed (pip install -e '.[dev]')")
    targets = [str(PROJECT_ROOT / name) for name in ("service", "engine_build", "evaluation", "training", "build_engines.py", "benchmarks") if (PROJECT_ROOT / name).exists()]
    result = subprocess.run(
        [vermin, "-t=3.8-", "--no-tips", "--violations", "--eval-annotations", "--backport", "typing_extensions"] + targets,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
