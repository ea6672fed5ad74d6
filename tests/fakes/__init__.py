"""Fake ``tensorrt`` and ``pycuda`` for testing the TensorRT code paths on machines without a GPU.

``install_fakes(monkeypatch, generation)`` puts both into ``sys.modules`` for one test. They run
the ONNX graph with ONNX Runtime behind the API the service uses, in TensorRT 10 (named
tensors) or TensorRT 8.2 (bindings) form. What they prove: the control flow, the API
generation handling, buffer and context ownership, and the error paths. What they cannot: that
real TensorRT builds or runs these engines, or how fast (see README, "What ran on real TensorRT").
"""

from __future__ import annotations

import sys
import types
from typing import Any, Sequence, Tuple

from tests.fakes import fake_pycuda, fake_tensorrt


def install_fakes(
    monkeypatch: Any,
    generation: str = "10",
    fast_fp16: bool = True,
    fast_int8: bool = True,
    unsupported_ops: Sequence[str] = (),
    device_name: str = "Fake Orin",
    compute_capability: Tuple[int, int] = (8, 7),
) -> Tuple[types.ModuleType, types.ModuleType]:
    driver = fake_pycuda.make_module(device_name, compute_capability)
    trt = fake_tensorrt.make_module(driver, generation, fast_fp16, fast_int8, unsupported_ops)
    package = types.ModuleType("pycuda")
    package.driver = driver  # type: ignore[attr-defined]
    package.__path__ = []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return trt, driver
