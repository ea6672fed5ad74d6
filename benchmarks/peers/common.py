"""What every peer server shares with ours: the ONNX artifact, its preprocessing, the thread count.

The peers read their configuration from the environment that ``benchmarks/load.py`` sets, so
each serves exactly the engine file our server serves, through
:func:`service.preprocess.preprocess_roi` with the spec read from that file's metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import numpy as np
import onnxruntime as ort

from service.model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo
from service.preprocess import PreprocessSpec

ENV_MODEL = "BENCH_MODEL"
ENV_THREADS = "BENCH_ORT_THREADS"
ENV_MAX_BATCH = "BENCH_MAX_BATCH"
ENV_BATCH_WAIT_MS = "BENCH_BATCH_WAIT_MS"


def model_path() -> str:
    path = os.environ.get(ENV_MODEL)
    if not path:
        raise RuntimeError("set {} to the ONNX file to serve".format(ENV_MODEL))
    return path


def ort_threads() -> int:
    return int(os.environ.get(ENV_THREADS, "0"))


def max_batch() -> int:
    return int(os.environ.get(ENV_MAX_BATCH, "8"))


def batch_wait_ms() -> float:
    return float(os.environ.get(ENV_BATCH_WAIT_MS, "2"))


def load_session() -> Tuple[ort.InferenceSession, PreprocessSpec, float]:
    """An ONNX Runtime session on the CPU with the same intra-op thread count as ours."""
    path = model_path()
    options = ort.SessionOptions()
    threads = ort_threads()
    # The one setting every server gets alike: with the cores pinned, ONNX Runtime's default
    # (one thread per physical core of the machine) would oversubscribe the pinned core.
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    info = ModelInfo.from_onnx(Path(path))
    return session, info.spec, info.threshold


def run_batch(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    return np.asarray(probabilities, dtype=np.float32).reshape(len(batch))
