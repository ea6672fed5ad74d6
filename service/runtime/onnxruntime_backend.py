"""ONNX Runtime on the CPU: the embedded default that runs on every machine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort

from service.model_info import INPUT_NAME, OUTPUT_NAME
from service.runtime.base import InferenceBackend

BACKEND_NAME = "onnxruntime"


def device_name() -> str:
    return "cpu"


def tool_version() -> str:
    return str(ort.__version__)


def session_options(intra_op_threads: int = 0, spinning: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # One inference thread owns the session; inter-op parallelism would only contend with it.
    options.inter_op_num_threads = 1
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 3
    if not spinning:
        # Idle intra-op threads spin for a while after each run; on a box whose cores also decode,
        # preprocess and serve HTTP, that spinning takes the CPU from them (see docs/benchmarks.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend(InferenceBackend):
    name = BACKEND_NAME

    def __init__(self, engine_path: Path, precision: str, intra_op_threads: int = 0, spinning: bool = True) -> None:
        self.precision = precision
        self.engine_path = Path(engine_path)
        self._session: Optional[ort.InferenceSession] = ort.InferenceSession(
            str(self.engine_path), sess_options=session_options(intra_op_threads, spinning), providers=["CPUExecutionProvider"]
        )
        self._input_dtype = np.float16 if self._session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise RuntimeError("the ONNX Runtime session is closed")
        feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        (probabilities,) = self._session.run([OUTPUT_NAME], feed)
        return np.asarray(probabilities, dtype=np.float32).reshape(len(batch))

    def close(self) -> None:
        self._session = None
