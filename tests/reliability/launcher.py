"""``python -m tests.reliability.launcher``: the service with a slowed or failing backend.

The same app and uvicorn settings as ``python -m service``, but the real ONNX Runtime backend
is wrapped in tests/backends.py's InstrumentedBackend, so overload and shutdown can be provoked
without any test-only code in service/. Knobs (besides every ANEMIA_* setting):

- ``RELIABILITY_DELAY_SECONDS``: sleep this long in every backend call (warm-up included).
- ``RELIABILITY_FAIL_WHITE``: ``1`` makes every batch containing an all-white image fail.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from service.app import create_app
from service.config import load_settings
from service.edge import run_server
from service.logging_setup import configure_logging
from service.model_info import ModelInfo
from service.startup import backend_factory, resolve_engine
from tests.backends import InstrumentedBackend


def all_white_image(batch: np.ndarray) -> bool:
    # Normalized with mean = std = 127.5, pixel 255 is 1.0; warm-up's zeros never match.
    return bool(np.any(batch.reshape(len(batch), -1).min(axis=1) >= 0.999))


def main() -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    delay_seconds = float(os.environ.get("RELIABILITY_DELAY_SECONDS", "0"))
    fail_white = os.environ.get("RELIABILITY_FAIL_WHITE") == "1"
    real_factory = backend_factory(settings, resolve_engine(settings, ModelInfo.from_onnx(settings.model)))

    def factory(worker: int = 0) -> InstrumentedBackend:
        return InstrumentedBackend(real_factory(worker), delay_seconds=delay_seconds, fail_if=all_white_image if fail_white else None)

    app = create_app(settings, factory=factory)
    # The same edge (deadlines, caps) as python -m service.
    run_server(app, settings, os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
