"""Helpers shared by test modules (tests import these from here, never from another test file or
conftest): project paths, the ready wait, the predict upload and a recorded tegrastats line.
Models, images and instrumented backends are built by tests/model_factory.py, tests/images.py
and tests/backends.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = PROJECT_ROOT.parent / "shared"
CP_ANEMIC_DIR = SHARED_DIR / "data" / "cp-anemic"

#: One line of ``tegrastats`` as JetPack 5.1 prints it on a Xavier NX.
XAVIER_NX_JP51 = (
    "11-22-2026 05:10:02 RAM 3021/6854MB (lfb 12x4MB) SWAP 0/3427MB (cached 0MB) "
    "CPU [12%@1420,8%@1420,10%@1420,9%@1420,off,off] EMC_FREQ 7%@1600 GR3D_FREQ 46%@[1100] "
    "NVENC off NVDEC off NVJPG off NVJPG1 off VIC_FREQ 0%@115 APE 150 AUX@36.5C CPU@38C "
    "thermal@37.45C AO@36.5C GPU@38.5C PMIC@50C VDD_IN 6245mW/5120mW VDD_CPU_GPU_CV 2130mW/1480mW "
    "VDD_SOC 1392mW/1301mW"
)


def wait_ready(client: Any, timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("the service did not become ready in {} s".format(timeout_seconds))


def post_image(client: Any, data: bytes, roi: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> Any:
    form = {"roi": roi} if roi is not None else None
    return client.post("/v1/predict", files={"image": ("upload", data, "application/octet-stream")}, data=form, headers=headers)
