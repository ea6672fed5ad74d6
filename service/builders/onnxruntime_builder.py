"""ONNX Runtime artifacts: FP32 is the model itself; FP16, INT8 and INT4 are its quantized twins.

INT8 is not calibrated here: the calibrated Q/DQ model is a committed file beside the FP32 model
(``<model>.int8.onnx``, made by ``python build_engines.py quantize``), so a build needs no
dataset. It is accepted only if its metadata says it was made from this very FP32 model.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import onnx

from service.builders import start_build
from service.engines import EngineEntry, make_entry
from service.errors import EngineError
from service.model_info import ModelInfo

#: INT4 everywhere it measures acceptably: the 1x1 convolutions. The stem, the depthwise layers
#: (9 weights per channel) and the classifier stay float (docs/quantization.md has the numbers).
DEFAULT_INT4_KEEP_FLOAT = ("first_conv", "classifier")


def int8_artifact_path(model_path: Path) -> Path:
    """``models/anemia_mobilenetv2.onnx`` -> ``models/anemia_mobilenetv2.int8.onnx``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".int8.onnx")


def check_int8_artifact(artifact: Path, model: ModelInfo) -> Dict[str, Any]:
    """The artifact's ``quantization.*`` metadata, after checking it belongs to ``model``."""
    from service.quantization.graph import quantization_metadata

    if not artifact.is_file():
        raise EngineError(
            "no calibrated INT8 model {} for {}; make it with `python build_engines.py quantize --model {} "
            "--calibration-dir DIR` (or pass --int8-model)".format(artifact, model.path, model.path)
        )
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


def build_onnxruntime_engine(
    model_path: Path,
    precision: str,
    engine_dir: Path,
    force: bool = False,
    int8_model: Optional[Path] = None,
    int4_rounding: str = "gptq",
    int4_tensors: Optional[np.ndarray] = None,
    int4_keep_float: Sequence[str] = DEFAULT_INT4_KEEP_FLOAT,
    int4_skip_depthwise: bool = True,
    int8_weights: str = "auto",
    **_ignored: object,
) -> EngineEntry:
    """Build (or reuse, unless ``force``) the ONNX Runtime artifact of ``model_path`` at ``precision``."""
    model_path, engine_dir = Path(model_path), Path(engine_dir)
    start = start_build(model_path, precision, "onnxruntime", engine_dir, force)
    if start.existing is not None:
        return start.existing
    model, key, manifest = start.model, start.key, start.manifest
    engine_dir.mkdir(parents=True, exist_ok=True)
    target = engine_dir / key.file_name(".onnx")
    started = time.perf_counter()
    info: Dict[str, Any] = {"source": str(model_path)}
    # Write beside the target and rename: a server reading the directory never sees half a file.
    with tempfile.TemporaryDirectory(dir=str(engine_dir), prefix=".build-") as scratch:
        staged = Path(scratch) / target.name
        if precision == "fp32":
            shutil.copyfile(str(model_path), str(staged))
            info["method"] = "copy of the FP32 model"
        elif precision == "fp16":
            from service.quantization.fp16 import convert_fp16

            _, _, meta = convert_fp16(model_path, staged)
            info.update(meta)
        elif precision == "int8":
            artifact = Path(int8_model) if int8_model else int8_artifact_path(model_path)
            from service.quantization.ort_layout import derive_ort_int8

            check_int8_artifact(artifact, model)
            # Same calibration and int8 weights, in the u8 layout ONNX Runtime fuses (ort_layout.py).
            info.update(derive_ort_int8(model_path, artifact, staged, weights=int8_weights))
            info["source"] = str(artifact)
        else:
            from service.quantization.int4 import Int4Options, quantize_int4_ort

            if int4_rounding == "gptq" and (int4_tensors is None or len(int4_tensors) == 0):
                raise EngineError(
                    "INT4 for {} needs calibration images for its GPTQ rounding (data-free INT4 loses most of this model's "
                    "accuracy, see docs/quantization.md); build it with `python build_engines.py --backend onnxruntime "
                    "--precision int4 --calibration-dir DIR --engine-dir {}`".format(model_path, engine_dir)
                )
            int4_options = Int4Options(rounding=int4_rounding, keep_float=tuple(int4_keep_float), skip_depthwise=int4_skip_depthwise)
            result = quantize_int4_ort(model_path, staged, int4_options, int4_tensors)
            info.update({k: v for k, v in result.info.items() if k != "layers"})
        info.pop("options", None)
        info["size_vs_fp32"] = round(staged.stat().st_size / max(1, model_path.stat().st_size), 4)
        staged.replace(target)
    entry = make_entry(key, target, time.perf_counter() - started, info)
    manifest.record(entry)
    return entry
