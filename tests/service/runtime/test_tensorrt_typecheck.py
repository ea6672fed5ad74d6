"""mypy on the TensorRT modules against tensorrt-stubs (the TensorRT 10 API).

The stubs are prepared in a scratch directory by tools/trt_stubs.py (copied from site-packages
and patched: ``in`` parameters renamed, a missing default added, an empty ``tensorrt_libs``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import trt_stubs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(trt_stubs.find_installed_stubs() is None, reason="tensorrt-stubs not installed (pip install --no-deps tensorrt-stubs)"),
]
pytest.importorskip("mypy", reason="mypy not installed")


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trt_stubs.prepare(tmp_path_factory.mktemp("trt-stubs"))


def test_tensorrt_modules_type_check_against_the_stubs(stub_dir: Path, tmp_path: Path) -> None:
    """One mypy run (it takes ~10-20 s): the modules must be clean, and a probe using ``num_bindings``
    (TensorRT 8.x, removed in 10) must be flagged, proving the stubs are really in use."""
    probe = tmp_path / "probe_removed_api.py"
    probe.write_text(
        "from __future__ import annotations\n"
        "import tensorrt as trt\n\n\n"
        "def count(engine: trt.ICudaEngine) -> int:\n"
        "    return int(engine.num_bindings)\n"
    )
    result = trt_stubs.run_mypy(stub_dir, list(trt_stubs.TENSORRT_MODULES) + [str(probe)])
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert errors and all(line.startswith(str(probe)) for line in errors), result.stdout
    assert '"ICudaEngine" has no attribute "num_bindings"' in errors[0]
