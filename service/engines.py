"""Engine naming and the manifest: every built artifact is keyed by what it was built from and for.

An engine is valid only for one (model sha256, precision, backend, device, tool version). The
manifest (``engines/manifest.json``) records each artifact's size, sha256, build time and build
information so the server can refuse a stale or foreign engine with a message naming the fix.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from typing_extensions import Protocol

from service.errors import EngineError
from service.model_info import ModelInfo, file_sha256

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class EngineKey:
    model_sha256: str
    precision: str
    backend: str
    device: str
    tool_version: str

    def file_name(self, suffix: str) -> str:
        return "anemia-{}-{}-{}-{}-{}{}".format(
            self.model_sha256[:12], self.precision, self.backend, slug(self.device), slug(self.tool_version), suffix
        )


class KeyedBackend(Protocol):
    """What a backend tells the key: its name, the device it runs on and its tool's version."""

    name: str

    def device(self) -> str: ...

    def tool_version(self) -> str: ...


def engine_key(model: ModelInfo, precision: str, backend: KeyedBackend) -> EngineKey:
    """The key of ``model``'s engine at ``precision`` for ``backend`` on this machine."""
    return EngineKey(model.sha256, precision, backend.name, backend.device(), backend.tool_version())


@dataclass
class EngineEntry:
    file: str
    model_sha256: str
    precision: str
    backend: str
    device: str
    tool_version: str
    file_size_bytes: int
    sha256: str
    built_at: str
    build_seconds: float = 0.0
    build_info: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> EngineKey:
        return EngineKey(self.model_sha256, self.precision, self.backend, self.device, self.tool_version)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class EngineManifest:
    """``engines/manifest.json``: the list of built engines in one engine directory."""

    def __init__(self, engine_dir: Path, entries: Optional[List[EngineEntry]] = None) -> None:
        self.engine_dir = Path(engine_dir)
        self.entries: List[EngineEntry] = list(entries or [])

    @property
    def path(self) -> Path:
        return self.engine_dir / MANIFEST_NAME

    @classmethod
    def load(cls, engine_dir: Path) -> "EngineManifest":
        engine_dir = Path(engine_dir)
        path = engine_dir / MANIFEST_NAME
        if engine_dir.exists() and not os.access(str(engine_dir), os.R_OK | os.X_OK):
            raise EngineError(
                "engine directory {} is not readable; fix its permissions or set ANEMIA_ENGINE_DIR".format(engine_dir)
            )
        if not path.exists():
            return cls(engine_dir)
        try:
            payload = json.loads(path.read_text())
            entries = [EngineEntry(**entry) for entry in payload.get("engines", [])]
        except (OSError, ValueError, TypeError) as exc:
            raise EngineError(
                "engine manifest {} is unreadable ({}); delete it and rebuild with "
                "`python build_engines.py`".format(path, exc)
            )
        return cls(engine_dir, entries)

    def save(self) -> None:
        self.engine_dir.mkdir(parents=True, exist_ok=True)
        payload = {"manifest_version": MANIFEST_VERSION, "engines": [e.to_dict() for e in self.entries]}
        # Atomic replace: a server starting while the builder runs never reads half a manifest.
        fd, tmp = tempfile.mkstemp(dir=str(self.engine_dir), prefix=".manifest-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, str(self.path))

    def find(self, key: EngineKey) -> Optional[EngineEntry]:
        for entry in reversed(self.entries):
            if entry.key == key:
                return entry
        return None

    def candidates(self, precision: str, backend: str) -> List[EngineEntry]:
        return [e for e in self.entries if e.precision == precision and e.backend == backend]

    def record(self, entry: EngineEntry) -> None:
        self.entries = [e for e in self.entries if e.key != entry.key and e.file != entry.file]
        self.entries.append(entry)
        self.save()


def make_entry(key: EngineKey, path: Path, build_seconds: float, build_info: Dict[str, Any]) -> EngineEntry:
    return EngineEntry(
        file=path.name,
        model_sha256=key.model_sha256,
        precision=key.precision,
        backend=key.backend,
        device=key.device,
        tool_version=key.tool_version,
        file_size_bytes=path.stat().st_size,
        sha256=file_sha256(path),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(build_seconds, 3),
        build_info=build_info,
    )


def rebuild_hint(key: EngineKey, engine_dir: Path) -> str:
    return (
        "build it with `python build_engines.py --backend {} --precision {} --engine-dir {}` "
        "or start the server with ANEMIA_AUTO_BUILD=1".format(key.backend, key.precision, engine_dir)
    )


def locate_engine(manifest: EngineManifest, key: EngineKey) -> EngineEntry:
    """The manifest entry for ``key`` whose file is present and intact, else an EngineError."""
    entry = manifest.find(key)
    if entry is None:
        others = manifest.candidates(key.precision, key.backend)
        if others:
            other = others[-1]
            what = []
            if other.model_sha256 != key.model_sha256:
                what.append("model {}… (this server's model is {}…)".format(other.model_sha256[:12], key.model_sha256[:12]))
            if other.device != key.device:
                what.append("device {} (this is {})".format(other.device, key.device))
            if other.tool_version != key.tool_version:
                what.append("{} {} (this is {})".format(key.backend, other.tool_version, key.tool_version))
            raise EngineError(
                "engine {} in {} was built for {}; {}".format(
                    other.file, manifest.path, ", ".join(what) or "another configuration", rebuild_hint(key, manifest.engine_dir)
                )
            )
        raise EngineError(
            "no {} {} engine for model {}… in {}; {}".format(
                key.precision, key.backend, key.model_sha256[:12], manifest.path, rebuild_hint(key, manifest.engine_dir)
            )
        )
    verify_engine_file(manifest.engine_dir, entry)
    return entry


def verify_engine_file(engine_dir: Path, entry: EngineEntry) -> Path:
    path = Path(engine_dir) / entry.file
    hint = rebuild_hint(entry.key, engine_dir)
    if not path.is_file():
        raise EngineError("engine file {} listed in the manifest is missing; {}".format(path, hint))
    try:
        size = path.stat().st_size
        if size != entry.file_size_bytes:
            raise EngineError(
                "engine file {} is {} bytes, the manifest says {} (truncated?); {}".format(path, size, entry.file_size_bytes, hint)
            )
        digest = file_sha256(path)
    except OSError as exc:
        raise EngineError("engine file {} is unreadable ({}); {}".format(path, exc, hint))
    if digest != entry.sha256:
        raise EngineError("engine file {} does not match its manifest sha256 (corrupted?); {}".format(path, hint))
    return path


def reusable_entry(manifest: EngineManifest, key: EngineKey, force: bool = False) -> Optional[EngineEntry]:
    """The manifest's intact engine for ``key``, unless ``force``; missing or damaged means rebuild."""
    existing = manifest.find(key)
    if existing is None or force:
        return None
    try:
        verify_engine_file(manifest.engine_dir, existing)
    except EngineError:
        return None
    return existing
