"""Shared fixtures: a small contract-conforming model, its engine, settings and a ready client."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from engine_build.build import build_engine
from service.config import Settings, load_settings
from tests.images import conjunctiva_rgba, encode, rgb_photo
from tests.model_factory import make_test_model
from tests.support import wait_ready


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
