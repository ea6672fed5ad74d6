"""Build one engine: key it, reuse the manifest's intact one, else write it, move it in atomically
and record it in the manifest. Every backend's artifact goes through :func:`build_engine`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Union

from engine_build.artifact import ArtifactJob
from engine_build.backends import Backend, get_backend
from service.config import PRECISIONS
from service.engines import EngineEntry, EngineManifest, engine_key, make_entry, reusable_entry
from service.errors import EngineError
from service.model_info import ModelInfo


def build_engine(
    model_path: Path,
    precision: str,
    backend: Union[str, Backend],
    engine_dir: Path,
    options: Optional[Any] = None,
    force: bool = False,
) -> EngineEntry:
    """The engine of ``model_path`` at ``precision`` for ``backend``: the manifest's intact one
    (unless ``force``), else built with ``options`` (the backend's options type; its defaults
    when None)."""
    chosen = backend if isinstance(backend, Backend) else get_backend(backend)
    if options is None:
        options = chosen.options_type()
    if not isinstance(options, chosen.options_type):
        raise EngineError(
            "{} engines are built with {}, not {}".format(chosen.name, chosen.options_type.__name__, type(options).__name__)
        )
    if precision not in PRECISIONS:
        raise EngineError("unknown precision {!r}; use one of {}".format(precision, ", ".join(PRECISIONS)))
    model_path, engine_dir = Path(model_path), Path(engine_dir)
    model = ModelInfo.from_onnx(model_path)
    key = engine_key(model, precision, chosen)
    manifest = EngineManifest.load(engine_dir)
    existing = reusable_entry(manifest, key, force)
    if existing is not None:
        return existing
    engine_dir.mkdir(parents=True, exist_ok=True)
    target = engine_dir / key.file_name(chosen.suffix)
    started = time.perf_counter()
    # Write beside the target and rename: a server reading the directory never sees half a file.
    with tempfile.TemporaryDirectory(dir=str(engine_dir), prefix=".build-") as scratch:
        staged = Path(scratch) / target.name
        info = chosen.write_artifact(ArtifactJob(model, precision, key, staged, Path(scratch), engine_dir), options)
        staged.replace(target)
    entry = make_entry(key, target, time.perf_counter() - started, info)
    manifest.record(entry)
    return entry
