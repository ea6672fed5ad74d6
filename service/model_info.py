"""The model's identity and preprocessing, read from the ONNX file's ``metadata_props``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import onnx

from service.errors import EngineError
from service.preprocess import PreprocessSpec

INPUT_NAME = "image"
OUTPUT_NAME = "anemia_probability"

# metadata_props keys written at export (besides the ``preprocess.*`` ones of PreprocessSpec)
KEY_NAME = "model_name"
KEY_VERSION = "model_version"
KEY_THRESHOLD = "threshold"

HOW_TO_GET_A_MODEL = (
    "The trained model ships in the repository as models/anemia_mobilenetv2.onnx; restore it with "
    "`git checkout -- models/`, train one with `make train` (see README, 'Training'), or point "
    "ANEMIA_MODEL at an ONNX model exported by training/export.py."
)


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    name: str
    version: str
    threshold: float
    spec: PreprocessSpec
    metadata: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_onnx(cls, path: Path) -> "ModelInfo":
        path = Path(path)
        if not path.is_file():
            raise EngineError("model file {} not found. {}".format(path, HOW_TO_GET_A_MODEL))
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and others for a damaged file
            raise EngineError("model file {} is not a readable ONNX model ({}). {}".format(path, exc, HOW_TO_GET_A_MODEL))
        props = {p.key: p.value for p in model.metadata_props}
        inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise EngineError(
                "model {} has inputs {} and outputs {}; the service needs input '{}' and output '{}'".format(
                    path, inputs, outputs, INPUT_NAME, OUTPUT_NAME
                )
            )
        try:
            spec = PreprocessSpec.from_metadata(props)
            threshold = float(props[KEY_THRESHOLD])
            name, version = props[KEY_NAME], props[KEY_VERSION]
        except (KeyError, ValueError, TypeError) as exc:
            raise EngineError(
                "model {} lacks the service's metadata ({}); export it with training/export.py".format(path, exc)
            )
        return cls(
            path=path,
            sha256=file_sha256(path),
            name=name,
            version=version,
            threshold=threshold,
            spec=spec,
            metadata=props,
        )

    def public_metadata(self) -> Dict[str, Any]:
        """Metadata for /v1/model, JSON values decoded where they are JSON."""
        decoded: Dict[str, Any] = {}
        for key, value in sorted(self.metadata.items()):
            try:
                decoded[key] = json.loads(value)
            except ValueError:
                decoded[key] = value
        return decoded
