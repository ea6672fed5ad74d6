"""Micro-batching: one thread owns the backend and groups waiting requests into one call.

Handlers call :meth:`MicroBatcher.submit` from the event loop; a bounded queue hands work to
the worker, which collects against a ``time.monotonic()`` deadline, runs one batched inference,
and answers every request — with its result, or with an error when the batch failed — and then
keeps running. The backend is created inside the worker thread, so with TensorRT the CUDA
context belongs to that thread alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from service.config import BATCHING_MODES
from service.errors import InferenceFailed, NotReady, Overloaded, ServiceError
from service.logging_setup import request_id_var
from service.runtime.base import InferenceBackend

logger = logging.getLogger("service.batching")

_STOP = object()


@dataclass
class InferenceResult:
    probability: float
    queue_seconds: float
    inference_seconds: float
    batch_size: int


@dataclass
class _Pending:
    tensor: np.ndarray
    future: "concurrent.futures.Future[InferenceResult]"
    enqueued_at: float
    request_id: str = "-"


BatchObserver = Callable[[int, float], None]

# Timed warm-up rounds, after one untimed call per shape: each round times one block per shape
# (an untimed call, then about WARMUP_IMAGES_PER_BLOCK images, at least 2 calls).
WARMUP_TIMED_ROUNDS = 3
WARMUP_IMAGES_PER_BLOCK = 5
# "auto" keeps batching only when the largest batch is at least 5 % cheaper per image than one
# image alone: below that, waiting for company adds latency and buys no throughput.
BATCH_PAYS_RATIO = 0.95


def release_freed_memory() -> bool:
    """Give the heap that warm-up freed back to the OS (glibc ``malloc_trim``); False elsewhere.

    Warm-up's batch-8 calls allocate ~100 MB of activations that are freed after it, but glibc
    keeps freed heap pages resident: without this the server sits ~30 MB higher for its whole
    life (docs/benchmarks.md, memory). Costs a few milliseconds, once.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


class MicroBatcher:
    def __init__(
        self,
        backend_factory: Callable[[], InferenceBackend],
        max_batch: int = 8,
        max_wait_seconds: float = 0.002,
        queue_size: int = 64,
        warmup_shape: Optional[tuple] = None,
        on_batch: Optional[BatchObserver] = None,
        incoming: Optional[Callable[[], int]] = None,
        batching: str = "auto",
    ) -> None:
        if batching not in BATCHING_MODES:
            raise ValueError("batching must be one of {}, got {!r}".format(BATCHING_MODES, batching))
        self._backend_factory = backend_factory
        self.max_batch = max_batch
        self.batching = batching
        # The most images per backend call that _serve uses; warm-up settles it (backend cap,
        # and in "auto" mode whether a batch is cheaper per image than a single image).
        self.batch_limit = 1 if batching == "off" else max_batch
        # Milliseconds per image measured at warm-up, by batch size ("auto" with a batch > 1 only).
        self.warmup_ms_per_image: Dict[int, float] = {}
        self.max_wait_seconds = max_wait_seconds
        self._queue: "queue.Queue[object]" = queue.Queue(maxsize=queue_size)
        self._warmup_shape = warmup_shape
        self._on_batch = on_batch
        # How many admitted requests are still being decoded; with none coming, waiting for
        # company only adds latency, so a lone request goes straight to the backend.
        self._incoming = incoming
        self._thread: Optional[threading.Thread] = None
        self._accepting = False
        self._admit_lock = threading.Lock()
        self.loaded = concurrent.futures.Future()  # type: concurrent.futures.Future[None]
        self.warmed_up = threading.Event()
        self.backend_calls = 0
        self.failure: Optional[BaseException] = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> "concurrent.futures.Future[None]":
        """Start the worker; the returned future resolves once the backend is open (or failed)."""
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._accepting = True
        self._thread.start()
        return self.loaded

    def stop(self, timeout_seconds: float = 30.0) -> None:
        """Stop admitting, let the worker finish everything queued, then close the backend."""
        with self._admit_lock:
            if not self._accepting and self._thread is None:
                return
            self._accepting = False
            # Blocking put: the sentinel queues behind every admitted request.
            self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout_seconds)
            self._thread = None

    @property
    def ready(self) -> bool:
        return self._accepting and self.warmed_up.is_set() and self.failure is None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- submission (event loop side) -----------------------------------------------------

    def submit_nowait(self, tensor: np.ndarray) -> "concurrent.futures.Future[InferenceResult]":
        if not self.ready:
            raise NotReady() if self._accepting else NotReady("The server is shutting down.")
        future: "concurrent.futures.Future[InferenceResult]" = concurrent.futures.Future()
        with self._admit_lock:
            if not self._accepting:
                raise NotReady("The server is shutting down.")
            try:
                self._queue.put_nowait(_Pending(tensor, future, time.monotonic(), request_id_var.get()))
            except queue.Full:
                raise Overloaded() from None
        return future

    async def submit(self, tensor: np.ndarray) -> InferenceResult:
        return await asyncio.wrap_future(self.submit_nowait(tensor))

    # -- worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            backend = self._backend_factory()
        except BaseException as exc:  # report any load failure to whoever awaits startup
            self.failure = exc
            self.loaded.set_exception(exc)
            return
        self.loaded.set_result(None)
        try:
            self._warm_up(backend)
            self._serve(backend)
        finally:
            backend.close()

    def _warm_up(self, backend: InferenceBackend) -> None:
        cap = 1 if self.batching == "off" else max(1, min(self.max_batch, backend.max_batch_size))
        if self._warmup_shape is None:
            self.batch_limit = cap
            self.warmed_up.set()
            return
        timed = self.batching == "auto" and cap > 1
        shape = tuple(self._warmup_shape)
        tensors: Dict[int, np.ndarray] = {batch: np.zeros((batch,) + shape, dtype=np.float32) for batch in sorted({1, cap})}
        block_seconds_per_image: Dict[int, List[float]] = {batch: [] for batch in tensors}
        try:
            backend.warm_up(shape)  # the backend's own choices first (ONNX Runtime: which sessions)
            # Batching only matters when requests wait: time it in the configuration that serves them.
            backend.set_waiting(cap)
            for tensor in tensors.values():
                backend.infer(tensor)  # first call: allocations, kernel selection
            # Blocks of one shape, as the server would run them: a single call right after a
            # batch pays for the batch's evicted caches (measured: 7.4 vs 6.1 ms, INT8, 1 thread),
            # which made interleaved timing favour batching. The blocks alternate, so a burst of
            # other load hits both shapes; the median block per shape decides.
            for _ in range(WARMUP_TIMED_ROUNDS if timed else 0):
                for batch, tensor in tensors.items():
                    backend.infer(tensor)  # back to this shape's steady state
                    calls = max(2, WARMUP_IMAGES_PER_BLOCK // batch)
                    started = time.perf_counter()
                    for _ in range(calls):
                        backend.infer(tensor)
                    block_seconds_per_image[batch].append((time.perf_counter() - started) / (calls * batch))
        except BaseException as exc:
            self.failure = exc
            logger.exception("warm-up failed; the server stays not-ready")
            return
        limit = cap
        if timed:
            seconds_per_image = {batch: float(np.median(blocks)) for batch, blocks in block_seconds_per_image.items()}
            self.warmup_ms_per_image = {batch: round(s * 1000.0, 3) for batch, s in seconds_per_image.items()}
            # On CPUs whose cache holds one image's activations but not a batch's (a 2-vCPU
            # Xeon), a batch costs more per image than single images: batching would only add
            # latency. A GPU, where batches are cheaper, keeps its batch.
            if seconds_per_image[cap] > BATCH_PAYS_RATIO * seconds_per_image[1]:
                limit = 1
            logger.info(
                "batching {}".format("kept" if limit > 1 else "off"),
                extra={
                    "batching": self.batching,
                    "batch_limit": limit,
                    "max_batch": cap,
                    "ms_per_image_batch_1": self.warmup_ms_per_image[1],
                    "ms_per_image_batch_max": self.warmup_ms_per_image[cap],
                },
            )
        self.batch_limit = limit
        release_freed_memory()
        self.warmed_up.set()

    def _collect(self, first: _Pending, limit: int) -> Tuple[List[_Pending], bool]:
        batch = [first]
        stop = False
        deadline = time.monotonic() + self.max_wait_seconds
        while len(batch) < limit:
            if self._incoming is not None and self._incoming() == 0 and self._queue.empty():
                break
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            assert isinstance(item, _Pending)
            batch.append(item)
        return batch, stop

    def _serve(self, backend: InferenceBackend) -> None:
        limit = self.batch_limit
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            assert isinstance(item, _Pending)
            batch, stop = self._collect(item, limit)
            # A request whose client went away is dropped here rather than computed.
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if live:
                self._infer(backend, live)
        # Drain whatever raced in behind the sentinel so no admitted request is left hanging.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Pending) and item.future.set_running_or_notify_cancel():
                self._infer(backend, [item])

    def waiting(self) -> int:
        """Requests queued or still being prepared, besides the batch about to run."""
        return self._queue.qsize() + (self._incoming() if self._incoming is not None else 0)

    def _infer(self, backend: InferenceBackend, batch: List[_Pending]) -> None:
        started = time.monotonic()
        try:
            backend.set_waiting(self.waiting())
            # One image (the usual case on a CPU) needs no copy; the copy held the GIL under load.
            tensors = batch[0].tensor if len(batch) == 1 else np.concatenate([p.tensor for p in batch], axis=0)
            probabilities = backend.infer(tensors)
            if probabilities.shape[0] != len(batch) or not np.all(np.isfinite(probabilities)):
                raise InferenceFailed("the backend returned {} for {} images".format(probabilities, len(batch)))
        except BaseException as exc:
            # The worker thread has no request context: name the batch's requests explicitly.
            logger.exception("batch of %d failed", len(batch), extra={"request_ids": [p.request_id for p in batch]})
            error = exc if isinstance(exc, ServiceError) else InferenceFailed("inference failed: {}".format(type(exc).__name__))
            for pending in batch:
                pending.future.set_exception(error)
            return
        finished = time.monotonic()
        self.backend_calls += 1
        inference_seconds = finished - started
        if self._on_batch is not None:
            self._on_batch(len(batch), inference_seconds)
        for pending, probability in zip(batch, probabilities):
            pending.future.set_result(
                InferenceResult(
                    probability=float(probability),
                    queue_seconds=started - pending.enqueued_at,
                    inference_seconds=inference_seconds,
                    batch_size=len(batch),
                )
            )
