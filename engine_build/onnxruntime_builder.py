"""ONNX Runtime artifacts: FP32 is the model itself; FP16, INT8 and INT4 are its quantized twins.

INT8 is not calibrated here: the calibrated Q/DQ model is a committed file beside the FP32 model
(``<model>.int8.onnx``, made by ``python build_engines.py quantize``), so a build needs no
dataset. It is accepted only if its metadata says it was made from this very FP32 model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from engine_build.artifact import ArtifactJob
from engine_build.quantization.int8_artifact import check_int8_artifact, int8_artifact_path
from engine_build.quantization.modes import ROUNDING_MODES, WEIGHT_MODES
from service.errors import EngineError

#: INT4 everywhere it measures acceptably: the 1x1 convolutions. The stem, the depthwise layers
#: (9 weights per channel) and the classifier stay float (docs/quantization.md has the numbers).
DEFAULT_INT4_KEEP_FLOAT = ("first_conv", "classifier")


@dataclass(frozen=True)
class OnnxRuntimeBuildOptions:
    """How to build an ONNX Runtime artifact; a bad value is refused when the options are made."""

    int8_model: Optional[Path] = None
    int4_rounding: str = "gptq"
    #: Calibration inputs (N x 3 x S x S) for INT4's GPTQ rounding.
    int4_tensors: Optional[np.ndarray] = None
    int4_keep_float: Tuple[str, ...] = DEFAULT_INT4_KEEP_FLOAT
    int4_skip_depthwise: bool = True
    int8_weights: str = "auto"

    def __post_init__(self) -> None:
        if self.int4_rounding not in ROUNDING_MODES:
            raise EngineError("int4_rounding must be one of {}, got {!r}".format(", ".join(ROUNDING_MODES), self.int4_rounding))
        if self.int8_weights not in WEIGHT_MODES:
            raise EngineError("int8_weights must be one of {}, got {!r}".format(", ".join(WEIGHT_MODES), self.int8_weights))


def write_onnxruntime_artifact(job: ArtifactJob, options: OnnxRuntimeBuildOptions) -> Dict[str, Any]:
    """Write the ONNX Runtime model of ``job.model`` at ``job.precision`` to ``job.staged``; returns its build info."""
    # Imported here, not at the top: the server imports this module through the backend registry,
    # and ONNX Runtime's quantizer would add about 14 MB and 0.2 s to a server that only serves.
    from engine_build.quantization.fp16 import convert_fp16
    from engine_build.quantization.int4 import Int4Options, quantize_int4_ort
    from engine_build.quantization.ort_layout import derive_ort_int8

    model_path, precision, staged = job.model.path, job.precision, job.staged
    info: Dict[str, Any] = {"source": str(model_path)}
    if precision == "fp32":
        shutil.copyfile(str(model_path), str(staged))
        info["method"] = "copy of the FP32 model"
    elif precision == "fp16":
        _, _, meta = convert_fp16(model_path, staged)
        info.update(meta)
    elif precision == "int8":
        artifact = Path(options.int8_model) if options.int8_model else int8_artifact_path(model_path)
        check_int8_artifact(artifact, job.model)
        # Same calibration and int8 weights, in the u8 layout ONNX Runtime fuses (ort_layout.py).
        info.update(derive_ort_int8(model_path, artifact, staged, weights=options.int8_weights))
        info["source"] = str(artifact)
    else:
        tensors = options.int4_tensors
        if options.int4_rounding == "gptq" and (tensors is None or len(tensors) == 0):
            raise EngineError(
                "INT4 for {} needs calibration images for its GPTQ rounding (data-free INT4 loses most of this model's "
                "accuracy, see docs/quantization.md); build it with `python build_engines.py --backend onnxruntime "
                "--precision int4 --calibration-dir DIR --engine-dir {}`".format(model_path, job.engine_dir)
            )
        int4_options = Int4Options(
            rounding=options.int4_rounding, keep_float=tuple(options.int4_keep_float), skip_depthwise=options.int4_skip_depthwise
        )
        result = quantize_int4_ort(model_path, staged, int4_options, tensors)
        info.update({k: v for k, v in result.info.items() if k != "layers"})
    info.pop("options", None)
    info["size_vs_fp32"] = round(staged.stat().st_size / max(1, model_path.stat().st_size), 4)
    return info
