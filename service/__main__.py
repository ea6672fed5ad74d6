"""``python -m service``: check the configuration, then serve with one uvicorn worker.

One process by design: the inference thread owns the backend (and on a Jetson the CUDA context
and the GPU's memory); several workers would each load a copy and fight over one small GPU.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import uvicorn

from service.config import Settings, SettingsError, load_settings
from service.errors import EngineError
from service.logging_setup import configure_logging


def prepare(settings: "Settings") -> int:
    """Build the engine for the configured model, precision and backend unless one matches."""
    from service.model_info import ModelInfo
    from service.startup import resolve_engine

    try:
        model = ModelInfo.from_onnx(settings.model)
        engine = resolve_engine(settings.model_copy(update={"auto_build": True}), model)
    except EngineError as exc:
        print("error: {}".format(exc.message), file=sys.stderr)
        return 2
    entry = engine.entry
    print(
        "engine ready: {} ({} {}, {:.1f} MB, built {})".format(
            engine.path, entry.backend, entry.precision, entry.file_size_bytes / 1e6, entry.built_at
        )
    )
    return 0


def main(argv: "Optional[List[str]]" = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings()
    except SettingsError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    if args[:1] == ["prepare"]:
        return prepare(settings)
    if args:
        print("usage: python -m service [prepare]", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    from service.app import create_app

    try:
        app = create_app(settings)
    except EngineError as exc:
        print("error: {}".format(exc.message), file=sys.stderr)
        return 2
    host = os.environ.get("HOST", "0.0.0.0")
    port = int(os.environ.get("PORT", "8000"))
    uvicorn.run(
        app, host=host, port=port, workers=1, log_config=None, timeout_graceful_shutdown=30, server_header=False
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
