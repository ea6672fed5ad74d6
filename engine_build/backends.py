"""The backend registry: every inference backend the project knows, in one table.

Each entry says what the backend is called, what it runs on (device description and tool
version, which key its engines), whether it is installed, how to load an engine, and how to write
an artifact from its typed build options. A new backend (OpenVINO, say) is one more entry here:
nothing else compares backend names.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type

from engine_build.artifact import ArtifactJob, options_from
from engine_build.onnxruntime_builder import OnnxRuntimeBuildOptions, write_onnxruntime_artifact
from engine_build.tensorrt_builder import TensorRTBuildOptions, write_tensorrt_artifact
from service.config import Settings
from service.errors import EngineError
from service.runtime import onnxruntime_backend, tensorrt_backend
from service.runtime.base import InferenceBackend
from service.thread_budget import ThreadPlan, plan_threads

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """One inference backend as the rest of the project sees it: what it is, what it runs on, how
    to load an engine and how to build one."""

    name: str
    #: The artifact's file suffix in the engine directory.
    suffix: str
    #: Whether this machine can run it (its Python packages are installed).
    available: Callable[[], bool]
    #: What the engine is valid for: the device (``cpu``, ``Orin sm_87``) and the tool's version.
    device: Callable[[], str]
    tool_version: Callable[[], str]
    #: Where the engine computes, ``cpu`` or ``gpu``: what the thread budget splits the cores around.
    runs_on: str
    #: Open an engine file at a precision with a thread plan (:func:`thread_plan`) for one engine
    #: worker (its index; 0 serves the lone requests); called on the thread that will own the
    #: backend. Use :meth:`load` rather than this.
    open_engine: Callable[[Path, str, Settings, ThreadPlan, int], InferenceBackend]
    #: The typed build options, and the writer that builds an artifact from them.
    options_type: Type[Any]
    write_artifact: Callable[[ArtifactJob, Any], Dict[str, Any]]
    #: The options the server builds with at start-up (``ANEMIA_AUTO_BUILD``, ``prepare``).
    server_options: Callable[[Settings], Any]

    def thread_plan(self, settings: Settings) -> ThreadPlan:
        """How this machine's cores are split around this backend's engine (service/thread_budget.py)."""
        return plan_threads(settings, engine=self.runs_on)

    def load(
        self, path: Path, precision: str, settings: Settings, plan: Optional[ThreadPlan] = None, worker: int = 0
    ) -> InferenceBackend:
        """Open an engine file at a precision for engine worker ``worker``, configured by the
        settings and the thread plan (derived from the settings when not given); called on the
        thread that will own the backend."""
        return self.open_engine(path, precision, settings, plan if plan is not None else self.thread_plan(settings), worker)

    def options(self, **values: Any) -> Any:
        """This backend's build options from ``values``; an unknown option or a bad value is an EngineError."""
        return options_from(self.options_type, values)

    def options_from_flags(self, values: Mapping[str, Any]) -> Any:
        """Build options from the ``values`` this backend declares, ignoring the others (a CLI's flags
        for every backend); ``options`` is the strict form."""
        return self.options(**{name: value for name, value in values.items() if name in self.option_names})

    @property
    def option_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options_type))


def _importable(name: str) -> bool:
    # ``pip install tensorrt-stubs`` (for mypy) leaves a ``tensorrt/`` folder of .pyi files only,
    # which imports as an empty namespace package (origin None): that is not TensorRT.
    try:
        spec = importlib.util.find_spec(name)
    except ValueError:  # already imported without a spec (a test's fake module)
        return True
    return spec is not None and spec.origin not in (None, "namespace")


def tensorrt_available() -> bool:
    return _importable("tensorrt") and _importable("pycuda")


ONNXRUNTIME = Backend(
    name=onnxruntime_backend.BACKEND_NAME,
    suffix=".onnx",
    available=lambda: True,
    device=onnxruntime_backend.device_name,
    tool_version=onnxruntime_backend.tool_version,
    runs_on="cpu",
    open_engine=lambda path, precision, settings, plan, worker: onnxruntime_backend.OnnxRuntimeBackend(
        path, precision, plan=plan, lone_requests=worker == 0
    ),
    options_type=OnnxRuntimeBuildOptions,
    write_artifact=write_onnxruntime_artifact,
    server_options=lambda settings: OnnxRuntimeBuildOptions(),
)

TENSORRT = Backend(
    name=tensorrt_backend.BACKEND_NAME,
    suffix=".engine",
    available=tensorrt_available,
    device=tensorrt_backend.device_name,
    tool_version=tensorrt_backend.tool_version,
    runs_on="gpu",
    # One worker (the plan's for a GPU engine): the CUDA context has one owner.
    open_engine=lambda path, precision, settings, plan, worker: tensorrt_backend.TensorRTBackend(path, precision, settings.max_batch),
    options_type=TensorRTBuildOptions,
    write_artifact=write_tensorrt_artifact,
    # The engine's optimization profile must cover the server's largest batch.
    server_options=lambda settings: TensorRTBuildOptions(max_batch=settings.max_batch),
)

#: By preference: ``auto`` picks the first one available (TensorRT where installed, else the
#: portable ONNX Runtime, which is always available).
BACKENDS: Dict[str, Backend] = {backend.name: backend for backend in (TENSORRT, ONNXRUNTIME)}


def get_backend(name: str) -> Backend:
    """The registry's entry for ``name``, or for ``auto`` the first available one."""
    if name == AUTO:
        return next(backend for backend in BACKENDS.values() if backend.available())
    try:
        return BACKENDS[name]
    except KeyError:
        raise EngineError("unknown backend {!r}; use {} or {}".format(name, ", ".join(BACKENDS), AUTO)) from None
