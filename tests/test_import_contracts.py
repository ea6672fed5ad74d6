"""Imports point one way (pyproject.toml's import-linter contracts), and the server process loads
nothing it does not run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import PROJECT_ROOT

LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")

#: Never in the server process: offline evaluation, training, their heavy libraries, ONNX
#: Runtime's quantizer and onnx itself (imported only when an engine is built; the server reads the
#: model's header with service/onnx_header.py: ~16 MB less resident memory).
SERVER_MUST_NOT_LOAD = ("evaluation", "training", "torch", "sklearn", "matplotlib", "scipy", "onnxruntime.quantization", "onnx")


def _lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(config), "--no-cache"], cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=300
    )


def test_the_import_contracts_hold() -> None:
    result = _lint(PROJECT_ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_contract_against_an_existing_import_is_reported_broken(tmp_path: Path) -> None:
    """The linter sees this tree's imports: forbidding one that exists (the backend registry loads
    the ONNX Runtime backend) breaks the contract."""
    config = tmp_path / "contracts.ini"
    config.write_text(
        "[importlinter]\nroot_packages =\n    service\n    engine_build\n\n"
        "[importlinter:contract:probe]\nname = probe\ntype = forbidden\n"
        "source_modules =\n    engine_build.backends\nforbidden_modules =\n    service.runtime.onnxruntime_backend\n"
    )
    result = _lint(config)
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout + result.stderr
    assert "engine_build.backends -> service.runtime.onnxruntime_backend" in result.stdout


def test_importing_the_app_loads_no_training_evaluation_or_plotting_module() -> None:
    code = "import json, sys; import service.app, service.__main__; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "service.app" in loaded and "engine_build.backends" in loaded  # the probe saw the imports
    offending = [m for m in loaded if any(m == name or m.startswith(name + ".") for name in SERVER_MUST_NOT_LOAD)]
    assert offending == []
