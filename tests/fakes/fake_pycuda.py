"""A fake ``pycuda.driver``: device memory is host memory, contexts are per-thread stacks.

It enforces what the real driver enforces and the backend must get right: every memory call
needs a CUDA context current on the *calling* thread, and freed memory cannot be used. It also
records what the tests assert on: allocations, page-locked host buffers, async copies.
"""

from __future__ import annotations

import itertools
import threading
import types
from typing import Any, Dict, List, Tuple

import numpy as np


class LogicError(RuntimeError):
    pass


class _State:
    def __init__(self) -> None:
        self.memory: Dict[int, np.ndarray] = {}
        self.addresses = itertools.count(0x7F0000000000, 0x100000)
        self.local = threading.local()
        self.events: List[Tuple[str, Any]] = []
        self.initialized = False
        self.contexts_created = 0
        self.contexts_alive = 0


def make_module(device_name: str = "Fake GPU", compute_capability: Tuple[int, int] = (8, 7)) -> types.ModuleType:
    state = _State()
    module = types.ModuleType("pycuda.driver")

    def stack() -> List["Context"]:
        if not hasattr(state.local, "stack"):
            state.local.stack = []
        return state.local.stack

    def require_context(what: str) -> "Context":
        if not state.initialized:
            raise LogicError("cuInit has not been called")
        current = stack()
        if not current:
            raise LogicError("{} failed: invalid device context (no context current on thread {})".format(what, threading.get_ident()))
        return current[-1]

    class Context:
        def __init__(self) -> None:
            self.thread = threading.get_ident()
            self.detached = False
            state.contexts_created += 1
            state.contexts_alive += 1

        def pop(self) -> None:
            current = stack()
            if not current or current[-1] is not self:
                raise LogicError("context.pop: this context is not current on this thread")
            current.pop()

        def push(self) -> None:
            stack().append(self)

        def detach(self) -> None:
            if not self.detached:
                self.detached = True
                state.contexts_alive -= 1

    class Device:
        def __init__(self, index: int) -> None:
            if not state.initialized:
                raise LogicError("cuInit has not been called")
            if index != 0:
                raise LogicError("invalid device ordinal {}".format(index))

        def name(self) -> str:
            return device_name

        def compute_capability(self) -> Tuple[int, int]:
            return compute_capability

        def make_context(self) -> Context:
            context = Context()
            stack().append(context)
            return context

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            self.address = next(state.addresses)
            self.nbytes = nbytes
            state.memory[self.address] = np.zeros(nbytes, np.uint8)

        def __int__(self) -> int:
            if self.address not in state.memory:
                raise LogicError("use of freed device memory")
            return self.address

        def free(self) -> None:
            state.memory.pop(self.address, None)

    class PagelockedArray(np.ndarray):
        pass

    class Stream:
        def __init__(self) -> None:
            require_context("cuStreamCreate")
            self.handle = next(state.addresses)
            self.synchronized = 0

        def synchronize(self) -> None:
            require_context("cuStreamSynchronize")
            self.synchronized += 1

    def init() -> None:
        state.initialized = True

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        require_context("cuMemAlloc")
        state.events.append(("mem_alloc", nbytes))
        return DeviceAllocation(int(nbytes))

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        require_context("cuMemHostAlloc")
        state.events.append(("pagelocked_empty", tuple(np.atleast_1d(shape))))
        return np.empty(shape, dtype).view(PagelockedArray)

    def _is_pagelocked(array: np.ndarray) -> bool:
        while array is not None:
            if isinstance(array, PagelockedArray):
                return True
            array = array.base  # type: ignore[assignment]
        return False

    def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Stream) -> None:
        require_context("cuMemcpyHtoDAsync")
        if not src.flags.c_contiguous:
            raise LogicError("memcpy_htod_async: host buffer must be contiguous")
        state.events.append(("htod", _is_pagelocked(src)))
        raw = np.frombuffer(src.tobytes(), np.uint8)
        state.memory[int(dest)][: raw.size] = raw

    def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Stream) -> None:
        require_context("cuMemcpyDtoHAsync")
        state.events.append(("dtoh", _is_pagelocked(dest)))
        nbytes = dest.nbytes
        data = state.memory[int(src)][:nbytes]
        dest[...] = np.frombuffer(data.tobytes(), dest.dtype).reshape(dest.shape)

    # --- helpers for the fake TensorRT (not part of pycuda's API)
    def _read(address: int, shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
        require_context("kernel launch")
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(state.memory[address][:count].tobytes(), dtype).reshape(shape)

    def _write(address: int, value: np.ndarray) -> None:
        require_context("kernel launch")
        raw = np.frombuffer(np.ascontiguousarray(value).tobytes(), np.uint8)
        state.memory[address][: raw.size] = raw

    for name, value in list(locals().items()):
        if not name.startswith("__") and name not in ("module", "state"):
            setattr(module, name, value)
    module._state = state  # type: ignore[attr-defined]
    return module
