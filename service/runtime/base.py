"""The one interface every inference backend implements."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Optional, Type

import numpy as np


class InferenceBackend(abc.ABC):
    """Runs the model on a batch. Created, used and closed by one thread only.

    With TensorRT the CUDA context belongs to the thread that creates the backend, so the
    micro-batching worker constructs it through a factory and nothing else touches it.
    """

    name: str = ""
    precision: str = ""
    #: The largest batch the engine accepts (TensorRT optimization profile; unbounded for ORT).
    max_batch_size: int = 1 << 16

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` is N x 3 x S x S float32; returns N anemia probabilities (float32)."""

    def set_waiting(self, waiting: int) -> None:
        """How many other requests are queued or being prepared as the next call starts, from the
        worker. A backend with a configuration that is faster for one image on an idle box (ONNX
        Runtime: a pool over every core) uses it only when this is 0; others ignore it."""

    def warm_up(self, image_shape: tuple) -> None:
        """Called once on the worker thread before serving, with one image's C x H x W shape: a
        backend may run and time its configurations here. The batcher does its own timing after."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release sessions, buffers and contexts; safe to call twice."""

    def __enter__(self) -> "InferenceBackend":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()
