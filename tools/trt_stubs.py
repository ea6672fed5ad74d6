"""Prepare a scratch stub directory so mypy can check the TensorRT modules against ``tensorrt-stubs``.

``tensorrt-stubs`` (``pip install --no-deps tensorrt-stubs``) ships the TensorRT 10 Python API as
``.pyi`` files, but a few of its lines are not valid Python (parameters called ``in``, a parameter
without a default after ones with defaults) and it imports a ``tensorrt_libs`` package it does
not ship. This copies the stubs to a scratch directory and patches exactly those lines; mypy then
runs with ``MYPYPATH`` pointing there (``ignore_errors`` for the stub modules is in pyproject.toml).

    python tools/trt_stubs.py --run-mypy        # prepare a temporary dir and type-check
    python tools/trt_stubs.py --out .trt-stubs  # only prepare
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The modules that touch the TensorRT API; mypy checks these (pyproject [tool.mypy] files).
TENSORRT_MODULES = (
    "service/runtime/trt_compat.py",
    "service/runtime/tensorrt_backend.py",
    "engine_build/tensorrt_builder.py",
)


def find_installed_stubs() -> Optional[Path]:
    """The site-packages directory holding ``tensorrt_bindings/tensorrt.pyi``, if installed."""
    candidates = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] + list(sys.path)
    for entry in candidates:
        if entry and (Path(entry) / "tensorrt_bindings" / "tensorrt.pyi").is_file():
            return Path(entry)
    return None


def patch_bindings(text: str) -> str:
    # ``in`` is a keyword: ``def f(self, in: X)`` is a syntax error in a .pyi as in a .py.
    text = re.sub(r"\bin: ", "in_: ", text)
    # A parameter without a default after parameters with defaults is a syntax error.
    text = re.sub(r"channel_axis: int(?=[,)])", "channel_axis: int = ...", text)
    return text


def prepare(target: Path, site: Optional[Path] = None) -> Path:
    site = site or find_installed_stubs()
    if site is None:
        raise FileNotFoundError("tensorrt-stubs is not installed; run `pip install --no-deps tensorrt-stubs`")
    target = Path(target)
    for package in ("tensorrt", "tensorrt_bindings"):
        destination = target / package
        if destination.exists():
            shutil.rmtree(str(destination))
        shutil.copytree(str(site / package), str(destination), ignore=shutil.ignore_patterns("*.py", "__pycache__", "*.so"))
    bindings = target / "tensorrt_bindings" / "tensorrt.pyi"
    bindings.write_text(patch_bindings(bindings.read_text()))
    libs = target / "tensorrt_libs"
    libs.mkdir(parents=True, exist_ok=True)
    (libs / "__init__.pyi").write_text("")
    return target


def run_mypy(stub_dir: Path, files: List[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, MYPYPATH=str(stub_dir))
    command = [sys.executable, "-m", "mypy", "--config-file", str(REPO_ROOT / "pyproject.toml"), "--no-incremental"] + files
    return subprocess.run(command, cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="stub directory to (re)create; default: a temporary one")
    parser.add_argument("--run-mypy", action="store_true", help="type-check the TensorRT modules against the stubs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trt-stubs-") as scratch:
        stub_dir = prepare(args.out or Path(scratch))
        print("stubs prepared in {}".format(stub_dir))
        if not args.run_mypy:
            return 0
        result = run_mypy(stub_dir, list(TENSORRT_MODULES))
        print(result.stdout, end="")
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
