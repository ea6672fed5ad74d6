"""ONNX Runtime on the CPU: the embedded default that runs on every machine.

Two sessions on one engine file when the thread plan (:mod:`service.thread_budget`) gives a lone
request more threads than a loaded server can afford: the *load* session (few threads, no
spinning) runs whenever other requests wait, the *idle* session (every core) when none do. The
micro-batching worker says which before each call (:meth:`set_waiting`); warm-up
(:meth:`warm_up`) keeps the idle session only if it measures faster. With several engine workers
only worker 0's backend opens the idle session (``lone_requests``); the others hold a load
session only, and the batcher hands a lone request to worker 0.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnxruntime as ort

from service.model_info import INPUT_NAME, OUTPUT_NAME
from service.runtime.base import InferenceBackend
from service.thread_budget import IDLE_SESSION_PAYS_RATIO, ThreadPlan

BACKEND_NAME = "onnxruntime"
#: Interleaved timed blocks per session at warm-up, and calls per block.
WARMUP_ROUNDS = 5
WARMUP_CALLS_PER_BLOCK = 4
#: The idle session keeps ONNX Runtime's CPU arena: with two threads, batch 1 took 3.42 ms with it
#: and 5.27 ms without (INT8, idle 2-core EPYC, docs/benchmarks.md); it only ever runs one image,
#: so the arena cannot grow with warm-up's batches.
IDLE_SESSION_ARENA = True
#: The load sessions keep it too. Without it every intermediate tensor is a fresh malloc, and the
#: server sets glibc's mmap threshold to 64 KiB (service/edge.py, so freed bodies go back to the
#: OS): each one becomes an mmap and page faults. Measured on the 2-core AVX2 EPYC (2026-12-06,
#: FP32 96x224 model, one thread, batch 1): 6.2 ms with the arena, 11.3 ms without; wrk c=16 went
#: from 109 to 162 req/s with the threshold left to glibc. A batch of more than one image runs with
#: arena shrinkage (below), so warm-up's batch 8 does not leave its high-water mark behind.
LOAD_SESSION_ARENA = True
#: Run option that hands the arena's unused chunks back to the system after the run.
_SHRINK_ARENA = ("memory.enable_memory_arena_shrinkage", "cpu:0")

logger = logging.getLogger("service.runtime.onnxruntime")


def device_name() -> str:
    return "cpu"


def tool_version() -> str:
    return str(ort.__version__)


def session_options(intra_op_threads: int = 0, spinning: bool = True, memory_arena: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # One inference thread owns the session; inter-op parallelism would only contend with it.
    options.inter_op_num_threads = 1
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 3
    # The CPU arena keeps the high-water mark of every shape it has run unless a run shrinks it
    # (see LOAD_SESSION_ARENA: batches run with shrinkage); without it every intermediate tensor
    # is a fresh allocation.
    options.enable_cpu_mem_arena = memory_arena
    options.enable_mem_pattern = True
    if not spinning:
        # Idle intra-op threads spin for a while after each parallel section; on a box whose cores
        # also decode, preprocess and serve HTTP, that spinning takes the CPU from them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend(InferenceBackend):
    name = BACKEND_NAME

    def __init__(
        self,
        engine_path: Path,
        precision: str,
        intra_op_threads: int = 0,
        spinning: bool = True,
        plan: Optional[ThreadPlan] = None,
        lone_requests: bool = True,
    ) -> None:
        """``plan`` (from :func:`service.thread_budget.plan_threads`) wins over the two counts,
        which remain for callers outside the server (evaluation, one session, as given).
        ``lone_requests``: this backend serves the lone requests of an idle box (engine worker 0),
        so it opens the plan's idle session and records warm-up's decision about it in the plan;
        the other workers' backends hold a load session only."""
        self.precision = precision
        self.engine_path = Path(engine_path)
        self.plan = plan
        self.lone_requests = lone_requests
        load_threads, load_spin = (plan.load_intra_op_threads, plan.load_spinning) if plan else (intra_op_threads, spinning)
        self._load: Optional[ort.InferenceSession] = self._open(load_threads, load_spin, LOAD_SESSION_ARENA)
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry(*_SHRINK_ARENA)
        self._idle: Optional[ort.InferenceSession] = None
        if plan is not None and plan.two_sessions and lone_requests:
            # The idle session only ever runs one image, so its arena never grows past batch 1.
            self._idle = self._open(plan.idle_intra_op_threads, plan.idle_spinning, IDLE_SESSION_ARENA)
        self._waiting = 0
        self.calls: Dict[str, int] = {"load": 0, "idle": 0}
        self._input_dtype = np.float16 if self._load.get_inputs()[0].type == "tensor(float16)" else np.float32

    def _open(self, threads: int, spinning: bool, memory_arena: bool = False) -> ort.InferenceSession:
        return ort.InferenceSession(
            str(self.engine_path),
            sess_options=session_options(threads, spinning, memory_arena),
            providers=["CPUExecutionProvider"],
        )

    @property
    def _session(self) -> Optional[ort.InferenceSession]:
        """The load session (the only one when the plan has one)."""
        return self._load

    @property
    def sessions(self) -> List[str]:
        return ["load"] + (["idle"] if self._idle is not None else [])

    def set_waiting(self, waiting: int) -> None:
        self._waiting = waiting

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._load is None:
            raise RuntimeError("the ONNX Runtime session is closed")
        # A lone single image on an idle box gets every core; anything else, the load session.
        use_idle = self._idle is not None and self._waiting == 0 and len(batch) == 1
        session = self._idle if use_idle else self._load
        assert session is not None
        self.calls["idle" if use_idle else "load"] += 1
        feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        # A batch's buffers go back after the run: the arena stays at batch 1's size (LOAD_SESSION_ARENA).
        (probabilities,) = session.run([OUTPUT_NAME], feed, self._shrink if len(batch) > 1 else None)
        return np.asarray(probabilities, dtype=np.float32).reshape(len(batch))

    def warm_up(self, image_shape: tuple) -> None:
        """Time one image on each session, interleaved; keep the idle session only if its median
        block is at least ``1 - IDLE_SESSION_PAYS_RATIO`` faster. Records the decision in the plan."""
        if self._load is None:
            return
        tensor: np.ndarray = np.zeros((1,) + tuple(image_shape), dtype=self._input_dtype)
        sessions = {"load": self._load}
        if self._idle is not None:
            sessions["idle"] = self._idle
        for session in sessions.values():
            session.run([OUTPUT_NAME], {INPUT_NAME: tensor})  # first call: allocations, kernels
        if self._idle is None:
            if self.plan is not None and self.lone_requests:
                self.plan.idle_session = False
            return
        blocks: Dict[str, List[float]] = {name: [] for name in sessions}
        for _ in range(WARMUP_ROUNDS):
            for name, session in sessions.items():
                session.run([OUTPUT_NAME], {INPUT_NAME: tensor})
                started = time.perf_counter()
                for _ in range(WARMUP_CALLS_PER_BLOCK):
                    session.run([OUTPUT_NAME], {INPUT_NAME: tensor})
                blocks[name].append((time.perf_counter() - started) / WARMUP_CALLS_PER_BLOCK)
        ms = {name: round(float(np.median(values)) * 1000.0, 3) for name, values in blocks.items()}
        keep = ms["idle"] <= IDLE_SESSION_PAYS_RATIO * ms["load"]
        if not keep:
            self._idle = None  # its threads and memory go with it
        if self.plan is not None:
            self.plan.idle_session = keep
            self.plan.warmup_ms = {"load_session_ms": ms["load"], "idle_session_ms": ms["idle"]}
        logger.info(
            "idle session {}".format("kept" if keep else "dropped"),
            extra={"load_session_ms": ms["load"], "idle_session_ms": ms["idle"]},
        )

    def close(self) -> None:
        self._load = None
        self._idle = None
