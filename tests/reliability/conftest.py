"""A real uvicorn process serving the test model, shared by a module's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator

import pytest

from tests.reliability.server import ServerProcess


@pytest.fixture(scope="session")
def base_env(model_path: Path, engine_dir: Path) -> Dict[str, str]:
    return {"ANEMIA_MODEL": str(model_path), "ANEMIA_ENGINE_DIR": str(engine_dir), "ANEMIA_LOG_LEVEL": "info"}


@pytest.fixture(scope="module")
def server(base_env: Dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess(base_env) as process:
        yield process


@pytest.fixture
def spawn(base_env: Dict[str, str]) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with extra settings; every one is stopped at the end of the test."""
    started = []

    def factory(module: str = "service", wait_ready: bool = True, **env: str) -> ServerProcess:
        values = dict(base_env)
        values.update(env)
        process = ServerProcess(values, module=module)
        started.append(process)
        return process.start(wait_ready=wait_ready)

    yield factory
    for process in started:
        process.close()
