"""Start-up policy: find the configured engine (or build it where allowed) and open its backend.

The server calls this before binding a port; ``python -m service prepare`` calls it with building
allowed. Which backend ``auto`` means, how an engine is keyed and how a backend is loaded come
from the backend registry (``engine_build/backends.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from engine_build.backends import get_backend
from engine_build.build import build_engine
from service.config import Settings
from service.engines import EngineEntry, EngineManifest, engine_key, locate_engine
from service.errors import EngineError
from service.model_info import ModelInfo
from service.runtime.base import InferenceBackend
from service.thread_budget import ThreadPlan

#: Opens the backend of one engine worker; called on that worker's own thread with its index
#: (0 = the worker that serves lone requests). Every index defaults to 0, so a caller outside the
#: server opens one backend with ``factory()``.
BackendFactory = Callable[..., InferenceBackend]


@dataclass
class ResolvedEngine:
    entry: EngineEntry
    path: Path
    backend: str


def resolve_engine(settings: Settings, model: ModelInfo) -> ResolvedEngine:
    """The engine for this model, precision, backend and device; built when it is missing or
    stale and ``ANEMIA_AUTO_BUILD`` allows it, else an EngineError that names the fix."""
    backend = get_backend(settings.backend)
    manifest = EngineManifest.load(settings.engine_dir)
    try:
        entry = locate_engine(manifest, engine_key(model, settings.precision, backend))
    except EngineError:
        if not settings.auto_build:
            raise
        entry = build_engine(model.path, settings.precision, backend, settings.engine_dir, backend.server_options(settings))
    return ResolvedEngine(entry=entry, path=Path(settings.engine_dir) / entry.file, backend=backend.name)


def thread_plan(settings: Settings, engine: ResolvedEngine) -> ThreadPlan:
    """The split of this machine's cores around ``engine``'s backend (service/thread_budget.py)."""
    return get_backend(engine.backend).thread_plan(settings)


def backend_factory(settings: Settings, engine: ResolvedEngine, plan: Optional[ThreadPlan] = None) -> BackendFactory:
    """A callable that opens the backend of engine worker ``worker``; each worker thread calls it,
    so it owns its session (and with TensorRT the context). Worker 0's backend records its warm-up
    decisions in ``plan`` (derived from the settings when not given)."""
    backend = get_backend(engine.backend)
    plan = plan if plan is not None else backend.thread_plan(settings)

    def open_backend(worker: int = 0) -> InferenceBackend:
        return backend.load(engine.path, settings.precision, settings, plan, worker)

    return open_backend
