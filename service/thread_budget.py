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
- **Engine workers (CPU).** A batch-1 MobileNetV2 call splits badly over intra-op threads (its
  convolutions are small), so when the engine needs more than one core the budget gives it more
  *workers* instead: each is one thread that owns its own single-thread session and pulls from the
  one bounded queue. How many: each request costs the engine ``ENGINE_MS[precision]`` and the
  stages around it ``AROUND_ENGINE_MS`` of CPU, so ``cores`` cores serve at most
  ``cores / (engine + around)`` requests per second and ``n`` single-thread workers at most
  ``n / engine``; the budget takes the fewest workers whose ceiling is within
  ``WORKER_PAYS_RATIO`` (99 %) of the cores' (each worker more costs a session's memory). On 2
  cores that is 2 workers for FP32 (one engine thread caps it at 76 % of what the cores allow) and
  for INT8 (98 %: measured, the second worker bought 34 %, docs/benchmarks.md 0.11).
- **GPU engine (TensorRT on a Jetson).** The engine thread mostly waits on CUDA; the CPU cores go
  to the event loop and preprocessing. Always one worker: it owns the CUDA context.

Every setting that names a count (``ANEMIA_ENGINE_WORKERS``, ``ANEMIA_INTRA_OP_THREADS``,
``ANEMIA_IDLE_INTRA_OP_THREADS``, ``ANEMIA_PREPROCESS_THREADS``, ``ANEMIA_INTRA_OP_SPINNING``)
overrides its part of the plan, and
the plan says for each number where it came from and why; ``/v1/model`` (``threads``) and the
start-up log show it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from service.config import Settings

#: One batch-1 call on one intra-op thread without the CPU arena (the load session), per precision,
#: on the 2-core AMD EPYC of docs/benchmarks.md section 0: FP32 6.9-7.0 ms (0.9), INT8 3.78 ms
#: (0.5). FP16 and INT4 were not timed there: FP32's time scaled by their measured ratio to FP32 on
#: one thread in section 1 (11.54 / 9.14 and 13.80 / 9.14 ms). Only the ratio to
#: AROUND_ENGINE_MS matters, so a faster or slower CPU of the same kind gets the same plan.
ENGINE_MS: Dict[str, float] = {"fp32": 7.0, "int8": 3.78, "fp16": 8.8, "int4": 10.6}
#: Server CPU per request outside the engine (HTTP, multipart, hand-offs, decode, ROI, resize,
#: normalisation, JSON, logging, metrics) at concurrency 16, same machine: 8.50 - 4.85 ms
#: (docs/benchmarks.md 0.3).
AROUND_ENGINE_MS = 3.65
#: A worker more whenever it raises the predicted ceiling by over 1 % (each is a session's memory,
#: about 10 MB). The ceiling assumes the cores are shared perfectly; they are not (hand-offs, the
#: GIL, a worker waiting while the event loop runs), and measured gains are larger than predicted:
#: on the 2-core AVX2 EPYC (2026-12-06, wrk c=16, 96x224 model) INT8 went from 140.7 req/s with
#: one worker to 188.6 with two, where the ceilings differ by 2 %; FP32 from 88.2 to 109.4-188.6.
WORKER_PAYS_RATIO = 0.99
#: More single-thread workers than this each cost a session's memory for little: beyond it, each
#: worker gets more intra-op threads instead.
MAX_ENGINE_WORKERS = 4
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
    #: Threads that each own one engine (session) and pull from the one queue; worker 0 also holds
    #: the idle session. A GPU engine has one (the CUDA context's owner).
    engine_workers: int
    #: Intra-op threads for a call while other requests wait (the load session, one per worker).
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
        """Whether worker 0 opens an idle session beside its load session."""
        return self.engine == "cpu" and self.idle_intra_op_threads != self.load_intra_op_threads

    @property
    def engine_threads(self) -> int:
        """Intra-op threads of every worker's load session together: the engine's cores under load."""
        return self.engine_workers * self.load_intra_op_threads

    def describe(self) -> Dict[str, Any]:
        """What ``/v1/model`` shows as ``threads``."""
        described = asdict(self)
        described["two_sessions"] = self.two_sessions
        return described


def _ceiling(cores: int, engine_ms: float, workers: int) -> float:
    """Requests per second that ``workers`` single-thread engine workers allow on ``cores`` cores:
    the engine's rate, or the cores' when every request's CPU (engine and around) fills them."""
    return min(workers * 1000.0 / engine_ms, cores * 1000.0 / (engine_ms + AROUND_ENGINE_MS))


def engine_cores_needed(cores: int, precision: str) -> int:
    """The fewest single-thread engine calls running at once that keep the predicted ceiling within
    ``WORKER_PAYS_RATIO`` of what the cores allow; at most ``cores`` (``cores - 1`` from 3 cores up,
    one is the event loop's)."""
    engine_ms = ENGINE_MS.get(precision, ENGINE_MS["fp32"])
    most = cores if cores <= 2 else cores - 1
    best = _ceiling(cores, engine_ms, most)
    for count in range(1, most + 1):
        if _ceiling(cores, engine_ms, count) >= WORKER_PAYS_RATIO * best:
            return count
    return most  # pragma: no cover - the loop always returns at ``most``


def _workers_reason(cores: int, precision: str, needed: int) -> str:
    engine_ms = ENGINE_MS.get(precision, ENGINE_MS["fp32"])
    best = _ceiling(cores, engine_ms, cores)
    text = (
        "{p} on {c} core(s): {e} ms in the engine and {a} ms around it per request (reference costs, "
        "docs/benchmarks.md section 0), so the cores serve at most {best:.0f} req/s; {n} single-thread engine call(s) "
        "at once reach {got:.0f} ({pct:.0f} %)".format(
            p=precision,
            c=cores,
            e=engine_ms,
            a=AROUND_ENGINE_MS,
            best=best,
            n=needed,
            got=_ceiling(cores, engine_ms, needed),
            pct=100.0 * _ceiling(cores, engine_ms, needed) / best,
        )
    )
    if needed > 1:
        text += ", {} only {:.0f} ({:.0f} %)".format(
            needed - 1, _ceiling(cores, engine_ms, needed - 1), 100.0 * _ceiling(cores, engine_ms, needed - 1) / best
        )
    elif cores > 1:
        text += ": a second worker would buy under {:.0f} % for a session's memory".format(100.0 * (1.0 - WORKER_PAYS_RATIO))
    return text


def plan_threads(settings: Settings, engine: str = "cpu", cores: Optional[int] = None) -> ThreadPlan:
    """The thread split for ``engine`` (``cpu``: ONNX Runtime; ``gpu``: TensorRT) on ``cores``
    cores (default: this process's affinity) at ``settings.precision``, with every explicit setting
    taking precedence."""
    cores = usable_cores() if cores is None else max(1, int(cores))
    precision = settings.precision
    sources: Dict[str, str] = {}
    reasons: Dict[str, str] = {}
    for key in ("engine_workers", "intra_op_threads", "idle_intra_op_threads", "preprocess_threads", "intra_op_spinning"):
        sources[key] = "machine"
    if engine == "gpu":
        workers = load = idle = 1
        reasons["engine_workers"] = "the engine runs on the GPU: one worker owns the CUDA context"
        if settings.engine_workers > 1:
            reasons["engine_workers"] += " (ANEMIA_ENGINE_WORKERS={} does not apply to a GPU engine)".format(settings.engine_workers)
        reasons["intra_op_threads"] = "the engine runs on the GPU: its thread waits on CUDA and needs no pool"
        preprocess = max(1, cores - 1)
        reasons["preprocess_threads"] = "every core but the event loop's decodes and preprocesses ({} of {})".format(preprocess, cores)
        reasons["idle_intra_op_threads"] = reasons["intra_op_threads"]
    else:
        needed = engine_cores_needed(cores, precision)
        workers = min(MAX_ENGINE_WORKERS, needed)
        reasons["engine_workers"] = _workers_reason(cores, precision, needed)
        if workers < needed:
            reasons["engine_workers"] += "; at most {} workers (memory), with more threads each".format(MAX_ENGINE_WORKERS)
        if settings.engine_workers:
            workers = settings.engine_workers
            sources["engine_workers"] = "ANEMIA_ENGINE_WORKERS"
            reasons["engine_workers"] = "set"
        elif settings.intra_op_threads:
            workers = 1
            sources["engine_workers"] = "ANEMIA_INTRA_OP_THREADS"
            reasons["engine_workers"] = "ANEMIA_INTRA_OP_THREADS alone means one session: one worker (ANEMIA_ENGINE_WORKERS adds more)"
        if cores <= 2:
            load = 1
            preprocess = 1
            reasons["intra_op_threads"] = (
                "{} core(s): each worker's call runs on one thread (a batch-1 call splits badly over threads; a second "
                "worker uses a second core better); under load the workers, the event loop and one preprocessing "
                "thread fill the cores, and a larger pool would only wait for a core".format(cores)
            )
            reasons["preprocess_threads"] = "one thread: the engine workers and the event loop take the rest"
        else:
            rest = cores - 1  # one core for the event loop
            load = min(MAX_IDLE_THREADS, max(1, needed // workers))
            preprocess = min(MAX_PREPROCESS_THREADS, max(1, rest - workers * load))
            reasons["intra_op_threads"] = (
                "{} cores: one for the event loop; of the other {}, the engine needs {} at {}'s cost: {} worker(s) x {} "
                "thread(s)".format(cores, rest, needed, precision, workers, load)
            )
            reasons["preprocess_threads"] = "the cores the event loop and the engine leave ({} of {})".format(preprocess, cores)
        idle = max(load, min(cores, MAX_IDLE_THREADS))
        reasons["idle_intra_op_threads"] = (
            "a lone request on an idle box gets {} thread(s), every core up to {}, on worker 0's idle session".format(
                idle, MAX_IDLE_THREADS
            )
            if idle != load
            else "no more cores than a loaded call uses: no second session"
        )
    load_spinning = False
    idle_spinning = True
    reasons["intra_op_spinning"] = (
        "the load session never spins (a spinning thread takes the core the event loop or a decode is waiting for); "
        "the idle session spins, as nothing else runs beside it"
    )

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
        engine_workers=workers,
        load_intra_op_threads=load,
        idle_intra_op_threads=idle,
        load_spinning=load_spinning,
        idle_spinning=idle_spinning,
        preprocess_threads=preprocess,
        sources=sources,
        reasons=reasons,
    )
