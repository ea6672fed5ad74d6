"""The ONNX Runtime backend's session options come from the settings."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from service.config import Settings
from service.model_info import ModelInfo
from service.startup import backend_factory, resolve_engine
from service.runtime.onnxruntime_backend import OnnxRuntimeBackend

SPINNING_KEY = "session.intra_op.allow_spinning"


@pytest.mark.parametrize("spinning", [True, False])
def test_settings_decide_whether_idle_threads_spin(make_settings: Callable[..., Settings], spinning: bool) -> None:
    settings = make_settings(intra_op_spinning=spinning, intra_op_threads=2)
    model = ModelInfo.from_onnx(settings.model)
    backend = backend_factory(settings, resolve_engine(settings, model))()
    assert isinstance(backend, OnnxRuntimeBackend)
    try:
        options = backend._session.get_session_options()  # type: ignore[union-attr]
        if spinning:  # unset: ONNX Runtime's default, which spins
            with pytest.raises(RuntimeError, match="does not have configuration"):
                options.get_session_config_entry(SPINNING_KEY)
        else:
            assert options.get_session_config_entry(SPINNING_KEY) == "0"
        assert options.intra_op_num_threads == 2
        probabilities = backend.infer(np.zeros((2, 3, 224, 224), np.float32))
        assert probabilities.shape[0] == 2
    finally:
        backend.close()


def test_spinning_setting_reads_the_environment(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANEMIA_INTRA_OP_SPINNING", "false")
    assert make_settings().intra_op_spinning is False


def two_session_backend(settings: Settings) -> OnnxRuntimeBackend:
    from service.thread_budget import plan_threads

    plan = plan_threads(settings, engine="cpu", cores=2)
    model = ModelInfo.from_onnx(settings.model)
    backend = backend_factory(settings, resolve_engine(settings, model), plan)()
    assert isinstance(backend, OnnxRuntimeBackend)
    return backend


def test_a_lone_image_runs_on_the_idle_session_anything_else_on_the_load_session(make_settings: Callable[..., Settings]) -> None:
    backend = two_session_backend(make_settings())
    try:
        assert backend.sessions == ["load", "idle"]
        assert backend._load.get_session_options().intra_op_num_threads == 1  # type: ignore[union-attr]
        assert backend._load.get_session_options().get_session_config_entry(SPINNING_KEY) == "0"  # type: ignore[union-attr]
        assert backend._idle.get_session_options().intra_op_num_threads == 2  # type: ignore[union-attr]
        image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
        backend.set_waiting(0)
        alone = backend.infer(image)
        assert backend.calls == {"load": 0, "idle": 1}
        backend.set_waiting(3)
        loaded = backend.infer(image)
        assert backend.calls == {"load": 1, "idle": 1}
        backend.set_waiting(0)
        backend.infer(np.concatenate([image, image]))  # a batch is load work even when nothing waits
        assert backend.calls == {"load": 2, "idle": 1}
        np.testing.assert_allclose(alone, loaded, rtol=1e-5, atol=1e-6)
    finally:
        backend.close()


@pytest.mark.parametrize("ratio, kept", [(0.0, False), (1e9, True)])
def test_warm_up_keeps_the_idle_session_only_when_it_is_faster(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, ratio: float, kept: bool
) -> None:
    from service.runtime import onnxruntime_backend

    monkeypatch.setattr(onnxruntime_backend, "IDLE_SESSION_PAYS_RATIO", ratio)
    backend = two_session_backend(make_settings())
    try:
        backend.warm_up((3, 224, 224))
        assert backend.plan is not None and backend.plan.idle_session is kept
        assert set(backend.plan.warmup_ms) == {"load_session_ms", "idle_session_ms"}
        assert backend.sessions == (["load", "idle"] if kept else ["load"])
        backend.set_waiting(0)
        backend.infer(np.zeros((1, 3, 224, 224), np.float32))
        assert backend.calls["idle" if kept else "load"] == 1
    finally:
        backend.close()


def test_only_worker_0_opens_the_idle_session_and_records_the_warm_up_decision(make_settings: Callable[..., Settings]) -> None:
    from service.thread_budget import plan_threads

    settings = make_settings(precision="fp32")
    plan = plan_threads(settings, engine="cpu", cores=2)
    assert plan.engine_workers == 2 and plan.two_sessions
    factory = backend_factory(settings, resolve_engine(settings, ModelInfo.from_onnx(settings.model)), plan)
    first, second = factory(0), factory(1)
    try:
        assert isinstance(first, OnnxRuntimeBackend) and isinstance(second, OnnxRuntimeBackend)
        assert first.sessions == ["load", "idle"] and second.sessions == ["load"]
        assert second._load.get_session_options().intra_op_num_threads == 1  # type: ignore[union-attr]
        first.warm_up((3, 224, 224))
        decided = plan.idle_session
        assert decided in (True, False)
        second.warm_up((3, 224, 224))  # a follower's warm-up leaves worker 0's decision alone
        assert plan.idle_session is decided and set(plan.warmup_ms) == {"load_session_ms", "idle_session_ms"}
        second.set_waiting(0)
        second.infer(np.zeros((1, 3, 224, 224), np.float32))
        assert second.calls == {"load": 1, "idle": 0}  # no idle session to run a lone image on
    finally:
        first.close()
        second.close()


def test_load_session_keeps_the_arena_and_a_batch_shrinks_it(make_settings: Callable[..., Settings]) -> None:
    """Without the arena every tensor is a fresh allocation (an mmap under the server's 64 KiB
    threshold: 11.3 vs 6.2 ms a call, docs/benchmarks.md 0.11); a batch hands its buffers back."""
    settings = make_settings(intra_op_threads=1)
    backend = backend_factory(settings, resolve_engine(settings, ModelInfo.from_onnx(settings.model)))()
    assert isinstance(backend, OnnxRuntimeBackend)
    try:
        session = backend._session
        assert session is not None and session.get_session_options().enable_cpu_mem_arena
        seen = []

        class Recording:
            def __init__(self, inner: object) -> None:
                self.inner = inner

            def run(self, outputs: object, feed: dict, run_options: object = None) -> object:
                seen.append(run_options)
                return self.inner.run(outputs, feed, run_options)  # type: ignore[attr-defined]

        backend._load = Recording(session)  # type: ignore[assignment]
        backend.infer(np.zeros((1, 3, 224, 224), np.float32))
        backend.infer(np.zeros((3, 3, 224, 224), np.float32))
        assert seen[0] is None
        assert seen[1] is not None and seen[1].get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    finally:
        backend.close()
