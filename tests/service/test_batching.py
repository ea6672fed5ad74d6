"""The micro-batching loop as a unit, with a backend that records what it was asked."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

from service.batching import WARMUP_IMAGES_PER_BLOCK, WARMUP_TIMED_ROUNDS, MicroBatcher
from service.errors import InferenceFailed, NotReady, Overloaded
from service.runtime.base import InferenceBackend


class MeanBackend(InferenceBackend):
    """Probability = mean of the input, so results are checkable per request."""

    name = "fake"

    def __init__(self, delay_seconds: float = 0.0, fail_on_negative: bool = False) -> None:
        self.calls: List[int] = []
        self.thread_ids: List[int] = []
        self.delay_seconds = delay_seconds
        self.fail_on_negative = fail_on_negative
        self.closed_by: List[int] = []

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.thread_ids.append(threading.get_ident())
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        if self.fail_on_negative and float(batch.min()) < 0:
            raise RuntimeError("boom")
        self.calls.append(len(batch))
        return batch.reshape(len(batch), -1).mean(axis=1).astype(np.float32)

    def close(self) -> None:
        self.closed_by.append(threading.get_ident())


def started(backend: MeanBackend, **kwargs: object) -> MicroBatcher:
    batcher = MicroBatcher(lambda worker: backend, warmup_shape=(1, 2, 2), **kwargs)  # type: ignore[arg-type]
    batcher.start().result(5)
    assert batcher.warmed_up.wait(5)
    return batcher


def tensor(value: float) -> np.ndarray:
    return np.full((1, 1, 2, 2), value, dtype=np.float32)


def test_concurrent_submissions_share_backend_calls_and_get_their_own_result() -> None:
    backend = MeanBackend(delay_seconds=0.02)
    batcher = started(backend, max_batch=4, max_wait_seconds=0.05, queue_size=32)
    warmup_calls = len(backend.calls)
    futures = [batcher.submit_nowait(tensor(i / 10)) for i in range(10)]
    results = [f.result(5) for f in futures]
    batcher.stop()
    assert [r.probability for r in results] == pytest.approx([i / 10 for i in range(10)])
    calls = backend.calls[warmup_calls:]
    assert sum(calls) == 10 and len(calls) < 10 and max(calls) <= 4
    assert all(r.batch_size >= 1 for r in results)


def test_backend_is_used_and_closed_by_one_thread_only() -> None:
    backend = MeanBackend()
    batcher = started(backend, max_batch=2)
    batcher.submit_nowait(tensor(0.5)).result(5)
    batcher.stop()
    assert len(set(backend.thread_ids)) == 1
    assert backend.closed_by == [backend.thread_ids[0]]
    assert backend.thread_ids[0] != threading.get_ident()


def test_a_failed_batch_answers_each_request_and_the_loop_keeps_running() -> None:
    backend = MeanBackend(fail_on_negative=True)
    batcher = started(backend, max_batch=1)
    with pytest.raises(InferenceFailed):
        batcher.submit_nowait(tensor(-1.0)).result(5)
    assert batcher.submit_nowait(tensor(0.25)).result(5).probability == pytest.approx(0.25)
    batcher.stop()


def test_full_queue_is_overloaded() -> None:
    gate = threading.Event()

    class Gated(MeanBackend):
        def infer(self, batch: np.ndarray) -> np.ndarray:
            if warmed.is_set():
                gate.wait(5)
            return super().infer(batch)

    warmed = threading.Event()
    backend = Gated()
    batcher = MicroBatcher(lambda worker: backend, max_batch=1, max_wait_seconds=0.0, queue_size=2, warmup_shape=(1, 2, 2))
    batcher.start().result(5)
    batcher.warmed_up.wait(5)
    warmed.set()
    first = batcher.submit_nowait(tensor(0.1))
    deadline = time.monotonic() + 2
    while batcher.queue_depth and time.monotonic() < deadline:  # worker picks the first up
        time.sleep(0.005)
    queued = [batcher.submit_nowait(tensor(0.2)), batcher.submit_nowait(tensor(0.3))]
    with pytest.raises(Overloaded):
        batcher.submit_nowait(tensor(0.4))
    gate.set()
    assert [f.result(5).probability for f in [first] + queued] == pytest.approx([0.1, 0.2, 0.3])
    batcher.stop()


def test_stop_finishes_everything_admitted_then_refuses() -> None:
    backend = MeanBackend(delay_seconds=0.01)
    batcher = started(backend, max_batch=2, queue_size=64)
    futures = [batcher.submit_nowait(tensor(i / 100)) for i in range(20)]
    batcher.stop()
    assert all(f.done() for f in futures)
    assert [f.result().probability for f in futures] == pytest.approx([i / 100 for i in range(20)])
    with pytest.raises(NotReady):
        batcher.submit_nowait(tensor(0.5))


def test_not_ready_before_warm_up() -> None:
    release = threading.Event()

    class SlowWarmup(MeanBackend):
        def infer(self, batch: np.ndarray) -> np.ndarray:
            release.wait(5)
            return super().infer(batch)

    batcher = MicroBatcher(lambda worker: SlowWarmup(), warmup_shape=(1, 2, 2))
    batcher.start().result(5)
    assert not batcher.ready
    with pytest.raises(NotReady):
        batcher.submit_nowait(tensor(0.1))
    release.set()
    assert batcher.warmed_up.wait(5) and batcher.ready
    batcher.stop()


def test_load_failure_is_reported_to_whoever_waits_for_startup() -> None:
    def broken(worker: int) -> InferenceBackend:
        raise OSError("engine file unreadable")

    batcher = MicroBatcher(broken)
    with pytest.raises(OSError, match="unreadable"):
        batcher.start().result(5)
    assert not batcher.ready


def test_a_lone_request_does_not_wait_for_company() -> None:
    backend = MeanBackend()
    batcher = started(backend, max_batch=8, max_wait_seconds=0.5, incoming=lambda: 0)
    started_at = time.monotonic()
    batcher.submit_nowait(tensor(0.3)).result(5)
    elapsed = time.monotonic() - started_at
    batcher.stop()
    assert elapsed < 0.25  # far below the 0.5 s collection window


def test_cancelled_requests_are_not_computed() -> None:
    gate = threading.Event()

    class Gated(MeanBackend):
        def infer(self, batch: np.ndarray) -> np.ndarray:
            if batcher_ready.is_set():
                gate.wait(5)
            return super().infer(batch)

    batcher_ready = threading.Event()
    backend = Gated()
    batcher = started(backend, max_batch=1, max_wait_seconds=0.0)
    batcher_ready.set()
    warmup_calls = len(backend.calls)
    first = batcher.submit_nowait(tensor(0.1))
    abandoned = batcher.submit_nowait(tensor(0.9))
    assert abandoned.cancel()
    gate.set()
    first.result(5)
    batcher.stop()
    assert sum(backend.calls[warmup_calls:]) == 1


def test_async_submit() -> None:
    backend = MeanBackend()
    batcher = started(backend)

    async def go() -> float:
        return (await batcher.submit(tensor(0.75))).probability

    assert asyncio.run(go()) == pytest.approx(0.75)
    batcher.stop()


# -- ANEMIA_BATCHING: batch only where it pays ----------------------------------------------------


class CostBackend(MeanBackend):
    """Sleeps ``call_seconds`` per call plus ``image_seconds`` per image, times ``batch_penalty``
    for every image of a batch larger than one (activations that no longer fit in cache)."""

    def __init__(self, call_seconds: float, image_seconds: float, batch_penalty: float = 1.0) -> None:
        super().__init__()
        self.call_seconds = call_seconds
        self.image_seconds = image_seconds
        self.batch_penalty = batch_penalty

    def infer(self, batch: np.ndarray) -> np.ndarray:
        per_image = self.image_seconds * (self.batch_penalty if len(batch) > 1 else 1.0)
        time.sleep(self.call_seconds + per_image * len(batch))
        return super().infer(batch)


def decided(backend: MeanBackend, batching: str, max_batch: int = 4) -> MicroBatcher:
    return started(backend, max_batch=max_batch, max_wait_seconds=0.05, batching=batching)


def test_auto_turns_batching_off_when_a_batch_costs_more_per_image(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="service.batching")
    # 1 ms alone, 2 ms per image in a batch of 4.
    backend = CostBackend(call_seconds=0.0, image_seconds=0.001, batch_penalty=2.0)
    batcher = decided(backend, "auto")
    warmup_calls = len(backend.calls)
    futures = [batcher.submit_nowait(tensor(i / 10)) for i in range(6)]
    assert [f.result(5).probability for f in futures] == pytest.approx([i / 10 for i in range(6)])
    batcher.stop()
    assert batcher.batch_limit == 1 and batcher.max_batch == 4
    assert backend.calls[warmup_calls:] == [1] * 6
    # One untimed call per shape, then rounds of one block per shape (an untimed call + timed calls).
    block = [1] * (1 + WARMUP_IMAGES_PER_BLOCK) + [4] * (1 + max(2, WARMUP_IMAGES_PER_BLOCK // 4))
    assert backend.calls[:warmup_calls] == [1, 4] + block * WARMUP_TIMED_ROUNDS
    ms = batcher.warmup_ms_per_image
    assert set(ms) == {1, 4} and ms[4] > ms[1] >= 1.0
    record = next(r for r in caplog.records if r.getMessage() == "batching off")
    assert record.batch_limit == 1 and record.ms_per_image_batch_max == ms[4]  # type: ignore[attr-defined]


def test_auto_keeps_the_batch_when_it_is_cheaper_per_image() -> None:
    # 2.5 ms alone, 1 ms per image in a batch of 4: the per-call cost is shared.
    backend = CostBackend(call_seconds=0.002, image_seconds=0.0005)
    batcher = decided(backend, "auto")
    warmup_calls = len(backend.calls)
    futures = [batcher.submit_nowait(tensor(i / 10)) for i in range(8)]
    assert [f.result(5).probability for f in futures] == pytest.approx([i / 10 for i in range(8)])
    batcher.stop()
    assert batcher.batch_limit == 4
    assert batcher.warmup_ms_per_image[4] < 0.95 * batcher.warmup_ms_per_image[1]
    assert max(backend.calls[warmup_calls:]) > 1


@pytest.mark.parametrize("batching, limit, warmup_shapes", [("on", 4, [1, 4]), ("off", 1, [1])])
def test_on_and_off_are_honoured_without_timing(batching: str, limit: int, warmup_shapes: List[int]) -> None:
    # The penalized backend: "on" batches anyway, "off" never does, and neither times anything.
    backend = CostBackend(call_seconds=0.0, image_seconds=0.001, batch_penalty=2.0)
    batcher = decided(backend, batching)
    assert backend.calls == warmup_shapes  # one warm-up call per shape used
    futures = [batcher.submit_nowait(tensor(i / 10)) for i in range(8)]
    assert [f.result(5).probability for f in futures] == pytest.approx([i / 10 for i in range(8)])
    batcher.stop()
    assert batcher.batch_limit == limit and batcher.warmup_ms_per_image == {}
    served = backend.calls[len(warmup_shapes) :]
    # Eight requests submitted at once with a 50 ms window: batched whenever the limit allows.
    assert sum(served) == 8 and max(served) == limit


def test_the_backend_cap_bounds_the_limit() -> None:
    backend = CostBackend(call_seconds=0.002, image_seconds=0.0005)
    backend.max_batch_size = 2
    batcher = decided(backend, "on", max_batch=8)
    batcher.stop()
    assert batcher.batch_limit == 2 and backend.calls == [1, 2]


def test_unknown_batching_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="batching"):
        MicroBatcher(MeanBackend, batching="sometimes")


class CacheBackend(CostBackend):
    """A single image right after a batch runs slower (the batch evicted its caches), as on CPUs."""

    def __init__(self) -> None:
        super().__init__(call_seconds=0.0, image_seconds=0.001, batch_penalty=1.15)
        self._last_batch = 1

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 1 and self._last_batch > 1:
            time.sleep(0.0015)  # cold caches
        self._last_batch = len(batch)
        return super().infer(batch)


def test_auto_times_each_shape_in_steady_state_not_right_after_the_other() -> None:
    # Steady state: 1 ms alone, 1.15 ms per image in a batch; a lone call after a batch costs 2.5 ms.
    # Interleaved single calls would make the batch look cheaper; blocks see the steady state.
    batcher = decided(CacheBackend(), "auto")
    batcher.stop()
    assert batcher.batch_limit == 1
    assert batcher.warmup_ms_per_image[1] < 1.5


def test_each_call_is_told_how_many_requests_wait_behind_it() -> None:
    class Recording(MeanBackend):
        def __init__(self) -> None:
            super().__init__(delay_seconds=0.02)
            self.waiting: List[int] = []
            self.warm_shapes: List[tuple] = []

        def set_waiting(self, waiting: int) -> None:
            self.waiting.append(waiting)

        def warm_up(self, image_shape: tuple) -> None:
            self.warm_shapes.append(image_shape)

    backend = Recording()
    preparing = {"count": 2}
    batcher = started(backend, max_batch=1, queue_size=32, incoming=lambda: preparing["count"])
    assert backend.warm_shapes == [(1, 2, 2)]
    warm_calls = len(backend.waiting)
    futures = [batcher.submit_nowait(tensor(i / 10)) for i in range(4)]
    [f.result(5) for f in futures]
    preparing["count"] = 0
    batcher.submit_nowait(tensor(0.5)).result(5)
    batcher.stop()
    seen = backend.waiting[warm_calls:]
    # the first calls see the queue behind them plus the two being prepared; the lone last one sees none
    assert seen[0] >= 2 and seen[-1] == 0


def test_freed_warm_up_memory_is_handed_back_where_glibc_allows() -> None:
    import ctypes.util

    from service.batching import release_freed_memory

    assert release_freed_memory() is (ctypes.util.find_library("c") is not None)


# -- engine workers: N threads, each owning its backend, pulling from the one queue ---------------


class WorkerBackend(MeanBackend):
    """One engine worker's backend: records its index; after warm-up, may wait at a shared barrier
    (so a call returns only once another worker's call is in flight too) or a gate."""

    def __init__(self, index: int, serving: threading.Event, barrier: Optional[threading.Barrier] = None,
                 gate: Optional[threading.Event] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index
        self.serving = serving
        self.barrier = barrier
        self.gate = gate
        self.warm_calls = 0
        self.held = threading.Event()
        self.barrier_timeout = 5.0

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not self.serving.is_set():
            self.warm_calls += 1
            return super().infer(batch)
        if self.barrier is not None:
            self.barrier.wait(self.barrier_timeout)  # BrokenBarrierError when alone: the call fails
        if self.gate is not None:
            self.held.set()
            self.gate.wait(5)
        return super().infer(batch)


def workers_started(count: int, **kwargs: Any) -> Tuple[MicroBatcher, List[WorkerBackend], threading.Event]:
    """A batcher with ``count`` workers; requests are served after the returned event is set."""
    serving = threading.Event()
    backends: Dict[int, WorkerBackend] = {}
    backend_kwargs = {key: kwargs.pop(key) for key in ("barrier", "gate", "fail_on_negative", "delay_seconds") if key in kwargs}

    def factory(worker: int) -> WorkerBackend:
        backends[worker] = WorkerBackend(worker, serving, **backend_kwargs)
        return backends[worker]

    kwargs.setdefault("max_batch", 1)
    batcher = MicroBatcher(factory, warmup_shape=(1, 2, 2), workers=count, **kwargs)
    batcher.start().result(5)
    assert batcher.warmed_up.wait(5)
    serving.set()
    return batcher, [backends[index] for index in range(count)], serving


def served_by(backend: WorkerBackend) -> int:
    return len(backend.calls) - backend.warm_calls


def test_each_worker_opens_its_own_backend_on_its_own_thread() -> None:
    batcher, backends, _ = workers_started(3, max_wait_seconds=0.0)
    assert [b.index for b in backends] == [0, 1, 2] and batcher.workers == 3
    batcher.stop()
    for backend in backends:
        assert len(set(backend.thread_ids)) == 1 and backend.closed_by == backend.thread_ids[:1]
    assert len({b.thread_ids[0] for b in backends}) == 3  # three threads, one per backend


def test_two_workers_serve_two_requests_at_once() -> None:
    # Each call waits until a second call is in flight: one worker alone would fail both requests.
    barrier = threading.Barrier(2)
    batcher, backends, _ = workers_started(2, barrier=barrier, max_wait_seconds=0.0)
    futures = [batcher.submit_nowait(tensor(0.1)), batcher.submit_nowait(tensor(0.2))]
    assert sorted(f.result(10).probability for f in futures) == pytest.approx([0.1, 0.2])
    batcher.stop()
    assert [served_by(b) for b in backends] == [1, 1]
    assert batcher.backend_calls == 2


def test_one_worker_alone_cannot_pass_the_barrier() -> None:
    """The control for the test above: with one worker the barrier breaks and the requests fail."""
    barrier = threading.Barrier(2)
    batcher, backends, _ = workers_started(1, barrier=barrier, max_wait_seconds=0.0)
    backends[0].barrier_timeout = 0.5
    first = batcher.submit_nowait(tensor(0.1))
    with pytest.raises(InferenceFailed):
        first.result(10)
    batcher.stop()


def test_a_lone_request_goes_to_worker_0_and_worker_1_takes_over_when_it_is_busy() -> None:
    gate = threading.Event()
    batcher, backends, _ = workers_started(2, max_wait_seconds=0.0)
    for i in range(5):  # one at a time on an idle box: always worker 0 (the one with the idle session)
        batcher.submit_nowait(tensor(i / 10)).result(5)
    assert [served_by(b) for b in backends] == [5, 0]
    backends[0].gate = gate  # worker 0 now holds its next call
    held = batcher.submit_nowait(tensor(0.7))
    assert backends[0].held.wait(5)
    assert batcher.submit_nowait(tensor(0.8)).result(5).probability == pytest.approx(0.8)
    assert served_by(backends[1]) == 1
    gate.set()
    assert held.result(5).probability == pytest.approx(0.7)
    batcher.stop()


def test_a_call_is_told_about_other_workers_calls_in_flight() -> None:
    gate = threading.Event()
    seen: Dict[int, List[int]] = {0: [], 1: []}
    batcher, backends, _ = workers_started(2, max_wait_seconds=0.0)
    for backend in backends:
        backend.set_waiting = seen[backend.index].append  # type: ignore[method-assign]
    batcher.submit_nowait(tensor(0.1)).result(5)
    assert seen[0][-1] == 0  # alone: the idle configuration may run
    backends[0].gate = gate
    held = batcher.submit_nowait(tensor(0.2))
    assert backends[0].held.wait(5)
    batcher.submit_nowait(tensor(0.3)).result(5)
    assert seen[1][-1] == 1  # worker 0's call is running: not alone
    gate.set()
    held.result(5)
    batcher.stop()


def test_a_failing_worker_answers_only_its_batch_and_every_worker_keeps_serving() -> None:
    barrier = threading.Barrier(2)
    batcher, backends, _ = workers_started(2, barrier=barrier, fail_on_negative=True, max_wait_seconds=0.0)
    bad, good = batcher.submit_nowait(tensor(-1.0)), batcher.submit_nowait(tensor(0.4))
    with pytest.raises(InferenceFailed):
        bad.result(10)
    assert good.result(10).probability == pytest.approx(0.4)
    # both workers are still there: two more at once pass the barrier again
    again = [batcher.submit_nowait(tensor(0.5)), batcher.submit_nowait(tensor(0.6))]
    assert sorted(f.result(10).probability for f in again) == pytest.approx([0.5, 0.6])
    batcher.stop()
    # the failed call is not among a backend's answered calls: the failing worker answered one
    # more afterwards (the second pair at the barrier), the other two
    assert sorted(served_by(b) for b in backends) == [1, 2]
    assert batcher.backend_calls == 3  # the failed call answered its request, it is not counted


def test_stop_drains_every_worker_then_closes_each_backend() -> None:
    batcher, backends, _ = workers_started(2, delay_seconds=0.01, queue_size=64, max_wait_seconds=0.0)
    futures = [batcher.submit_nowait(tensor(i / 100)) for i in range(30)]
    batcher.stop()
    assert all(f.done() for f in futures)
    assert [f.result().probability for f in futures] == pytest.approx([i / 100 for i in range(30)])
    assert sum(served_by(b) for b in backends) == 30 and all(served_by(b) > 0 for b in backends)
    assert all(b.closed_by == b.thread_ids[:1] for b in backends)
    with pytest.raises(NotReady):
        batcher.submit_nowait(tensor(0.5))


def test_the_queue_bound_holds_with_several_workers() -> None:
    gate = threading.Event()
    batcher, backends, _ = workers_started(2, gate=gate, queue_size=2, max_wait_seconds=0.0)
    running = [batcher.submit_nowait(tensor(0.1))]
    assert backends[0].held.wait(5)
    running.append(batcher.submit_nowait(tensor(0.2)))
    assert backends[1].held.wait(5)  # one call per worker in flight, the queue empty again
    queued = [batcher.submit_nowait(tensor(0.3)), batcher.submit_nowait(tensor(0.4))]
    with pytest.raises(Overloaded):
        batcher.submit_nowait(tensor(0.5))
    gate.set()
    assert sorted(f.result(5).probability for f in running + queued) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    batcher.stop()


def test_worker_0_decides_before_the_others_run_anything() -> None:
    events: List[Tuple[int, str]] = []

    class Logged(CostBackend):
        def __init__(self, index: int) -> None:
            super().__init__(call_seconds=0.0, image_seconds=0.001, batch_penalty=2.0)
            self.index = index

        def warm_up(self, image_shape: tuple) -> None:
            events.append((self.index, "warm_up"))

        def infer(self, batch: np.ndarray) -> np.ndarray:
            events.append((self.index, "infer {}".format(len(batch))))
            return super().infer(batch)

    batcher = MicroBatcher(Logged, warmup_shape=(1, 2, 2), workers=2, max_batch=4, batching="auto")
    batcher.start().result(5)
    assert batcher.warmed_up.wait(10)
    batcher.stop()
    first_follower = next(i for i, (worker, _) in enumerate(events) if worker == 1)
    assert all(worker == 0 for worker, _ in events[:first_follower])
    assert any(what == "infer 4" for _, what in events[:first_follower])  # the timed batches
    # the follower warms up the shapes it will run: batching was found not to pay, so batch 1 only
    assert [what for worker, what in events if worker == 1] == ["warm_up", "infer 1"]
    assert batcher.batch_limit == 1


def test_a_worker_whose_backend_does_not_open_fails_the_start_and_the_others_close() -> None:
    opened: List[MeanBackend] = []

    def factory(worker: int) -> InferenceBackend:
        if worker == 1:
            raise OSError("second session: out of memory")
        opened.append(MeanBackend())
        return opened[-1]

    batcher = MicroBatcher(factory, warmup_shape=(1, 2, 2), workers=2)
    with pytest.raises(OSError, match="out of memory"):
        batcher.start().result(5)
    batcher.stop()
    assert not batcher.ready and not batcher.warmed_up.is_set()
    assert len(opened) == 1 and opened[0].closed_by and opened[0].calls == []  # closed, never ran


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(MeanBackend, workers=0)
