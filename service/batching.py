"""Micro-batching: engine workers, each one thread that owns its backend and groups waiting
requests into one call.

Handlers call :meth:`MicroBatcher.submit` from the event loop; one bounded queue hands work to
the workers (``workers``: the thread budget's ``engine_workers``; one for a GPU engine). Each
worker collects against a ``time.monotonic()`` deadline, runs one batched inference on its own
backend, and answers every request — with its result, or with an error when the batch failed —
and then keeps running. Each backend is created inside its worker's thread, so a session (with
TensorRT, the CUDA context) belongs to that thread alone. Worker 0 takes work whenever there is
some; worker k only while workers 0..k-1 are all busy, so a lone request on an idle box reaches
worker 0, whose backend holds the session for lone requests (ONNX Runtime's idle session).
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
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

from service.config import BATCHING_MODES
from service.errors import InferenceFailed, NotReady, Overloaded, ServiceError
from service.logging_setup import request_id_var
from service.runtime.base import InferenceBackend

logger = logging.getLogger("service.batching")


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
#: Opens one engine worker's backend, called on that worker's thread with its index.
WorkerFactory = Callable[[int], InferenceBackend]


class WorkQueue:
    """The one bounded queue every engine worker pulls from.

    Worker 0 takes an item whenever there is one; worker k only while workers 0..k-1 are all busy
    (in a call, collecting, or gone), so a lone request on an idle box reaches worker 0 and the
    workers fill up in order under load. After :meth:`close` nothing more is put, any worker takes
    what is left, and :meth:`take` answers None once it is empty.
    """

    def __init__(self, maxsize: int, workers: int = 1) -> None:
        self.maxsize = maxsize
        self._items: Deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._busy = [False] * workers
        self._closed = False

    def put_nowait(self, item: _Pending) -> None:
        with self._cond:
            if len(self._items) >= self.maxsize:
                raise queue.Full
            self._items.append(item)
            # every waiter: the first one woken may be a worker not allowed to take it
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def busy_besides(self, worker: int) -> int:
        """How many other workers are busy now."""
        return sum(busy for index, busy in enumerate(self._busy) if index != worker)

    def _may_take(self, worker: int) -> bool:
        return self._closed or all(self._busy[:worker])

    def take(self, worker: int) -> Optional[_Pending]:
        """Wait for the next item ``worker`` may take and mark it busy; None once closed and empty."""
        with self._cond:
            while True:
                if self._items and self._may_take(worker):
                    self._busy[worker] = True
                    item = self._items.popleft()
                    if self._items:
                        self._cond.notify_all()  # this worker is busy now: the next one may take the rest
                    return item
                if self._closed and not self._items:
                    return None
                self._cond.wait()

    def more(self, worker: int, timeout: float) -> Optional[_Pending]:
        """For a busy worker collecting a batch: the next item within ``timeout`` seconds (0: only
        one already queued), else None."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while not self._items:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._cond.wait(remaining)
            return self._items.popleft()

    def done(self, worker: int) -> None:
        """``worker`` answered its batch and is free again."""
        with self._cond:
            self._busy[worker] = False

    def leave(self, worker: int) -> None:
        """``worker`` stopped for good: it counts as busy, so the next one takes its share."""
        with self._cond:
            self._busy[worker] = True
            self._cond.notify_all()

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
        backend_factory: WorkerFactory,
        max_batch: int = 8,
        max_wait_seconds: float = 0.002,
        queue_size: int = 64,
        warmup_shape: Optional[tuple] = None,
        on_batch: Optional[BatchObserver] = None,
        incoming: Optional[Callable[[], int]] = None,
        batching: str = "auto",
        workers: int = 1,
    ) -> None:
        """``backend_factory(index)`` opens worker ``index``'s backend on that worker's thread;
        ``workers`` engine workers pull from the one queue of ``queue_size``."""
        if batching not in BATCHING_MODES:
            raise ValueError("batching must be one of {}, got {!r}".format(BATCHING_MODES, batching))
        if workers < 1:
            raise ValueError("workers must be at least 1, got {}".format(workers))
        self._backend_factory = backend_factory
        self.workers = workers
        self.max_batch = max_batch
        self.batching = batching
        # The most images per backend call that _serve uses; warm-up settles it (backend cap,
        # and in "auto" mode whether a batch is cheaper per image than a single image).
        self.batch_limit = 1 if batching == "off" else max_batch
        # Milliseconds per image measured at warm-up, by batch size ("auto" with a batch > 1 only).
        self.warmup_ms_per_image: Dict[int, float] = {}
        self.max_wait_seconds = max_wait_seconds
        self._queue = WorkQueue(queue_size, workers)
        self._warmup_shape = warmup_shape
        self._on_batch = on_batch
        # How many admitted requests are still being decoded; with none coming, waiting for
        # company only adds latency, so a lone request goes straight to the backend.
        self._incoming = incoming
        self._threads: List[threading.Thread] = []
        self._accepting = False
        self._admit_lock = threading.Lock()
        # Start-up: every worker opens its backend, then worker 0 warms up and decides (timed, with
        # nothing else running), then the others warm up; ready once all have.
        self._start_lock = threading.Lock()
        self._opened = 0
        self._all_opened = threading.Event()
        self._decided = threading.Event()
        self._warmed = 0
        self.loaded = concurrent.futures.Future()  # type: concurrent.futures.Future[None]
        self.warmed_up = threading.Event()
        self._calls = [0] * workers
        self.failure: Optional[BaseException] = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> "concurrent.futures.Future[None]":
        """Start the workers; the returned future resolves once every backend is open (or one failed)."""
        name = "inference" if self.workers == 1 else "inference-{}"
        self._threads = [
            threading.Thread(target=self._run, args=(index,), name=name.format(index), daemon=True) for index in range(self.workers)
        ]
        self._accepting = True
        for thread in self._threads:
            thread.start()
        return self.loaded

    def stop(self, timeout_seconds: float = 30.0) -> None:
        """Stop admitting, let the workers finish everything queued, then close the backends."""
        with self._admit_lock:
            if not self._accepting and not self._threads:
                return
            self._accepting = False
            # Under the admission lock: nothing is put after this, and the workers drain the rest.
            self._queue.close()
        deadline = time.monotonic() + timeout_seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    @property
    def backend_calls(self) -> int:
        """Backend calls that answered their batch, all workers together."""
        return sum(self._calls)

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

    def _run(self, worker: int) -> None:
        try:
            backend = self._backend_factory(worker)
        except BaseException as exc:  # report any load failure to whoever awaits startup
            with self._start_lock:
                if self.failure is None:
                    self.failure = exc
                    self.loaded.set_exception(exc)
                self._all_opened.set()
            self._queue.leave(worker)
            return
        with self._start_lock:
            self._opened += 1
            if self._opened == self.workers and self.failure is None:
                self.loaded.set_result(None)
                self._all_opened.set()
        try:
            self._all_opened.wait()
            if self.loaded.exception() is not None:
                return  # another worker's backend did not open: no half-started engine
            if worker == 0:
                try:
                    warmed = self._warm_up(backend)
                finally:
                    self._decided.set()
            else:
                self._decided.wait()
                warmed = self.failure is None and self._warm_up_follower(backend)
            if warmed:
                with self._start_lock:
                    self._warmed += 1
                    if self._warmed == self.workers:
                        release_freed_memory()
                        self.warmed_up.set()
            self._serve(backend, worker)
        finally:
            self._queue.leave(worker)
            backend.close()

    def _warm_up(self, backend: InferenceBackend) -> bool:
        """Worker 0: the backend's own choices, then the batch limit every worker uses (timed in
        "auto" mode, before the other workers run anything). False when it failed."""
        cap = 1 if self.batching == "off" else max(1, min(self.max_batch, backend.max_batch_size))
        if self._warmup_shape is None:
            self.batch_limit = cap
            return True
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
            return False
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
        return True

    def _warm_up_follower(self, backend: InferenceBackend) -> bool:
        """Workers 1..N-1, after worker 0 decided: their first call per shape they will run
        (allocations, kernel selection), nothing timed. False when it failed."""
        if self._warmup_shape is None:
            return True
        shape = tuple(self._warmup_shape)
        try:
            backend.warm_up(shape)
            backend.set_waiting(self.batch_limit)
            for batch in sorted({1, self.batch_limit}):
                backend.infer(np.zeros((batch,) + shape, dtype=np.float32))
        except BaseException as exc:
            self.failure = exc
            logger.exception("warm-up failed; the server stays not-ready")
            return False
        return True

    def _collect(self, first: _Pending, limit: int, worker: int) -> List[_Pending]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_seconds
        while len(batch) < limit:
            if self._incoming is not None and self._incoming() == 0 and self._queue.empty():
                break
            item = self._queue.more(worker, deadline - time.monotonic())
            if item is None:
                break
            batch.append(item)
        return batch

    def _serve(self, backend: InferenceBackend, worker: int) -> None:
        limit = self.batch_limit
        while True:
            item = self._queue.take(worker)
            if item is None:
                break  # closed and drained
            try:
                batch = self._collect(item, limit, worker)
                # A request whose client went away is dropped here rather than computed.
                live = [p for p in batch if p.future.set_running_or_notify_cancel()]
                if live:
                    self._infer(backend, live, worker)
            finally:
                self._queue.done(worker)

    def waiting(self, worker: int = 0) -> int:
        """Requests queued or still being prepared, and other workers' batches running, besides the
        batch ``worker`` is about to run."""
        incoming = self._incoming() if self._incoming is not None else 0
        return self._queue.qsize() + incoming + self._queue.busy_besides(worker)

    def _infer(self, backend: InferenceBackend, batch: List[_Pending], worker: int = 0) -> None:
        started = time.monotonic()
        try:
            # Another worker's call counts too: the box is not idle while it runs.
            backend.set_waiting(self.waiting(worker))
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
        self._calls[worker] += 1
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
