"""Shared fixtures: a small contract-conforming model, its engine, settings and a ready client."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from engine_build.build import build_engine
from service.config import Settings, load_settings
from tests.images import conjunctiva_rgba, encode, rgb_photo
from tests.model_factory import make_test_model

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = PROJECT_ROOT.parent / "shared"
CP_ANEMIC_DIR = SHARED_DIR / "data" / "cp-anemic"


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("model") / "test_model.onnx")


@pytest.fixture(scope="session")
def engine_dir(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("engines")
    build_engine(model_path, "fp32", "onnxruntime", directory)
    return directory


@pytest.fixture
def make_settings(model_path: Path, engine_dir: Path) -> Callable[..., Settings]:
    def factory(**overrides: object) -> Settings:
        values = {"model": model_path, "engine_dir": engine_dir}
        values.update(overrides)
        return load_settings(**values)

    return factory


def wait_ready(client, timeout_seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("the service did not become ready in {} s".format(timeout_seconds))


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(make_settings())) as test_client:
        wait_ready(test_client)
        yield test_client


# -- images built in code (tests/images.py) ---------------------------------------------------


@pytest.fixture
def crop_png() -> bytes:
    return encode(conjunctiva_rgba())


@pytest.fixture
def photo_jpeg() -> bytes:
    return encode(rgb_photo(), ".jpg")
