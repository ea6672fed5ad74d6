"""What a backend's writer is handed to write one artifact, and the options check they share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Type, TypeVar

from service.engines import EngineKey
from service.errors import EngineError
from service.model_info import ModelInfo

OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True)
class ArtifactJob:
    """One artifact to write: ``staged`` is the file to write, inside the private ``scratch``
    folder; :func:`engine_build.build.build_engine` moves it into ``engine_dir`` atomically."""

    model: ModelInfo
    precision: str
    key: EngineKey
    staged: Path
    scratch: Path
    engine_dir: Path


def options_from(options_type: Type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
    """``options_type(**values)``, with an unknown option an EngineError that names it."""
    known = {f.name for f in dataclasses.fields(options_type)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise EngineError(
            "unknown {} option(s) {}; known: {}".format(options_type.__name__, ", ".join(unknown), ", ".join(sorted(known)))
        )
    return options_type(**values)
