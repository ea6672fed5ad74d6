"""The committed INT8 model: the calibrated Q/DQ ONNX beside the FP32 one (``<model>.int8.onnx``,
written by :func:`engine_build.quantization.int8.quantize_int8`), which every runtime's INT8
engine is built from, and the check that it was calibrated from this very FP32 model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from service.errors import EngineError
from service.model_info import ModelInfo


def int8_artifact_path(model_path: Path) -> Path:
    """``models/anemia_mobilenetv2.onnx`` -> ``models/anemia_mobilenetv2.int8.onnx``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".int8.onnx")


def check_int8_artifact(artifact: Path, model: ModelInfo) -> Dict[str, Any]:
    """The artifact's ``quantization.*`` metadata, after checking it belongs to ``model``."""
    if not artifact.is_file():
        raise EngineError(
            "no calibrated INT8 model {} for {}; make it with `python build_engines.py quantize --model {} "
            "--calibration-dir DIR` (or pass --int8-model)".format(artifact, model.path, model.path)
        )
    # Imported here: the server imports this module (through the backend registry) but never builds,
    # and onnx costs it ~16 MB of memory (docs/benchmarks.md, memory).
    import onnx

    from engine_build.quantization.graph import quantization_metadata

    meta = quantization_metadata(onnx.load(str(artifact), load_external_data=False))
    if meta.get("precision") != "int8":
        raise EngineError("{} is not an INT8 Q/DQ model made by build_engines.py quantize".format(artifact))
    if meta.get("source_sha256") != model.sha256:
        raise EngineError(
            "INT8 model {} was calibrated from model {}…, but the FP32 model {} is {}…; recalibrate with "
            "`python build_engines.py quantize --model {} --calibration-dir DIR`".format(
                artifact, str(meta.get("source_sha256"))[:12], model.path, model.sha256[:12], model.path
            )
        )
    return meta
