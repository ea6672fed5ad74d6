"""How the machine's cores are split between the event loop, preprocessing and the engine.

One module decides it for every backend, from the cores this process may run on
(``os.sched_getaffinity``), so nothing else guesses thread counts:

- **CPU engine (ONNX Runtime).** Under load every stage competes for the same cores: the event
  loop (HTTP, multipart, JSON), the preprocessing pool (decode, ROI, resize) and the engine. An
  intra-op pool over every core then spins while the other stages wait for a core (measured in
  issue 14: 10.6 ms of server CPU per request bought 2.7 ms of inference). So under load the
  engine runs with a small pool that does not spin, and the rest of the cores go to the loop and
  preprocessing. A lone request on an idle box gets every core instead: the engine keeps a second
  session for that, picked per call by the micro-batching worker when nothing else is queued or
  being prepared (``InferenceBackend.set_waiting``), and dropped at warm-up when it is not
  measurably faster.
- **GPU engine (TensorRT on a Jetson).** The engine thread mostly waits on CUDA; the CPU cores go
  to the event loop and preprocessing.

Every setting that names a count (``ANEMIA_INTRA_OP_THREADS``, ``ANEMIA_IDLE_INTRA_OP_THREADS``,
``ANEMIA_PREPROCESS_THREADS``, ``ANEMIA_INTRA_OP_SPINNING``) overrides its part of the plan, and
the plan says for each number where it came from and why; ``/v1/model`` (``threads``) and the
start-up log show it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from service.config import Settings

#: Per-request CPU of the stages around the engine and of the engine itself, INT8 MobileNetV2 on
#: one thread (issue 14's measurement, 2-core EPYC): decode + preprocess 2.6 ms, engine 2.7 ms.
#: With more than two cores, the cores left after the event loop are shared in this ratio.
ENGINE_SHARE = 2.7 / (2.7 + 2.6)
#: A single request uses the all-cores session only when warm-up measured it at least this much
#: faster than the load session (median of interleaved blocks): below that, the second session
#: costs memory and buys nothing.
IDLE_SESSION_PAYS_RATIO = 0.9
#: Beyond this many threads a batch-1 MobileNetV2 call gains nothing from more (its layers are too
#: small to split further), and the thread pool's synchronisation only adds latency.
MAX_IDLE_THREADS = 8
#: More preprocessing threads than this only queue on the GIL-held parts of a request.
MAX_PREPROCESS_THREADS = 16


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroup cpusets), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:  # pragma: no cover - platforms that refuse the call
            pass
    return max(1, os.cpu_count() or 1)


@dataclass
class ThreadPlan:
    """The split, with where each number came from (``machine`` or the setting's name) and why."""

    cores: int
    engine: str  # "cpu" or "gpu"
    #: Intra-op threads for a call while other requests wait (the load session).
    load_intra_op_threads: int
    #: Intra-op threads for a call on an idle box (the idle session); equal to the load count
    #: when there is one session only.
    idle_intra_op_threads: int
    #: Whether idle intra-op threads spin between parallel sections of the load session.
    load_spinning: bool
    #: The same for the idle session: it runs alone, so spinning takes no core from anyone.
    idle_spinning: bool
    preprocess_threads: int
    sources: Dict[str, str] = field(default_factory=dict)
    reasons: Dict[str, str] = field(default_factory=dict)
    #: Set at warm-up by the backend: whether the idle session is kept, and the timings.
    idle_session: Optional[bool] = None
    warmup_ms: Dict[str, float] = field(default_factory=dict)

    @property
    def two_sessions(self) -> bool:
        return self.engine == "cpu" and self.idle_intra_op_threads != self.load_intra_op_threads

    def describe(self) -> Dict[str, Any]:
        """What ``/v1/model`` shows as ``threads``."""
        described = asdict(self)
        described["two_sessions"] = self.two_sessions
        return described


def plan_threads(settings: Settings, engine: str = "cpu", cores: Optional[int] = None) -> ThreadPlan:
    """The thread split for ``engine`` (``cpu``: ONNX Runtime; ``gpu``: TensorRT) on ``cores``
    cores (default: this process's affinity), with every explicit setting taking precedence."""
    cores = usable_cores() if cores is None else max(1, int(cores))
    sources: Dict[str, str] = {}
    reasons: Dict[str, str] = {}
    if engine == "gpu":
        load = idle = 1
        reasons["intra_op_threads"] = "the engine runs on the GPU: its thread waits on CUDA and needs no pool"
        preprocess = max(1, cores - 1)
        reasons["preprocess_threads"] = "every core but the event loop's decodes and preprocesses ({} of {})".format(preprocess, cores)
    else:
        if cores <= 2:
            load = 1
            preprocess = 1
            reasons["intra_op_threads"] = (
                "{} core(s): under load the event loop, one preprocessing thread and the engine thread already "
                "fill them; a larger pool would only wait for a core".format(cores)
            )
            reasons["preprocess_threads"] = "one thread keeps a core for the engine and the event loop"
        else:
            rest = cores - 1  # one core for the event loop
            load = min(MAX_IDLE_THREADS, max(1, int(round(rest * ENGINE_SHARE))))
            preprocess = min(MAX_PREPROCESS_THREADS, max(1, rest - load))
            reasons["intra_op_threads"] = (
                "{} cores: one for the event loop, the other {} shared between the engine and preprocessing "
                "by their measured cost per request".format(cores, rest)
            )
            reasons["preprocess_threads"] = reasons["intra_op_threads"]
        idle = max(load, min(cores, MAX_IDLE_THREADS))
        reasons["idle_intra_op_threads"] = (
            "a lone request on an idle box gets {} thread(s), every core up to {}".format(idle, MAX_IDLE_THREADS)
            if idle != load
            else "one core: there is no second pool to give a lone request"
        )
    load_spinning = False
    idle_spinning = True
    reasons["intra_op_spinning"] = (
        "the load session never spins (a spinning thread takes the core the event loop or a decode is waiting for); "
        "the idle session spins, as nothing else runs beside it"
    )
    for key in ("intra_op_threads", "idle_intra_op_threads", "preprocess_threads", "intra_op_spinning"):
        sources[key] = "machine"

    if settings.intra_op_threads:
        load = settings.intra_op_threads
        sources["intra_op_threads"] = "ANEMIA_INTRA_OP_THREADS"
        reasons["intra_op_threads"] = "set"
        if not settings.idle_intra_op_threads:
            # One explicit count means one session: what the operator asked for, every call.
            idle = load
            sources["idle_intra_op_threads"] = "ANEMIA_INTRA_OP_THREADS"
            reasons["idle_intra_op_threads"] = "ANEMIA_INTRA_OP_THREADS alone gives every call that many threads"
    if settings.idle_intra_op_threads:
        idle = settings.idle_intra_op_threads
        sources["idle_intra_op_threads"] = "ANEMIA_IDLE_INTRA_OP_THREADS"
        reasons["idle_intra_op_threads"] = "set"
    if settings.preprocess_threads:
        preprocess = settings.preprocess_threads
        sources["preprocess_threads"] = "ANEMIA_PREPROCESS_THREADS"
        reasons["preprocess_threads"] = "set"
    if settings.intra_op_spinning is not None:
        load_spinning = idle_spinning = settings.intra_op_spinning
        sources["intra_op_spinning"] = "ANEMIA_INTRA_OP_SPINNING"
        reasons["intra_op_spinning"] = "set"
    return ThreadPlan(
        cores=cores,
        engine=engine,
        load_intra_op_threads=load,
        idle_intra_op_threads=idle,
        load_spinning=load_spinning,
        idle_spinning=idle_spinning,
        preprocess_threads=preprocess,
        sources=sources,
        reasons=reasons,
    )
