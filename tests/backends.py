"""Backends for tests: wrap a real one to count calls, slow it down, gate it or make it fail."""

from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional

import numpy as np

from service.runtime.base import InferenceBackend


class InstrumentedBackend(InferenceBackend):
    def __init__(
        self,
        inner: InferenceBackend,
        delay_seconds: float = 0.0,
        gate: Optional[threading.Event] = None,
        fail_if: Optional[Callable[[np.ndarray], bool]] = None,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.precision = inner.precision
        self.delay_seconds = delay_seconds
        self.gate = gate
        self.fail_if = fail_if
        self.batch_sizes: List[int] = []
        self.closed = False
        self.held = 0  # calls waiting at the gate now
        self.waiting_seen: List[int] = []  # set_waiting values, one per call

    def set_waiting(self, waiting: int) -> None:
        self.waiting_seen.append(waiting)
        self.inner.set_waiting(waiting)

    def warm_up(self, image_shape: tuple) -> None:
        self.inner.warm_up(image_shape)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.held += 1
            self.gate.wait(10.0)
            self.held -= 1
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        if self.fail_if is not None and self.fail_if(batch):
            raise RuntimeError("injected backend failure")
        self.batch_sizes.append(len(batch))
        return self.inner.infer(batch)

    def close(self) -> None:
        self.closed = True
        self.inner.close()
