"""FP16 for ONNX Runtime: float16 weights and compute, float32 input and output (``keep_io_types``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from service.model_info import file_sha256
from engine_build.quantization import graph as g


def convert_fp16(fp32_path: Path, target: Path, prepared: Optional[onnx.ModelProto] = None) -> Tuple[Path, float, Dict[str, Any]]:
    """Write the float16 twin of ``fp32_path``; the server still feeds float32 and reads float32."""
    started = time.perf_counter()
    source = onnx.load(str(fp32_path))
    model = onnx.ModelProto()
    model.CopyFrom(prepared if prepared is not None else source)
    # keep_io_types: the server's batch and the probability stay float32, casts sit at the edges.
    converted = convert_float_to_float16(model, keep_io_types=True)
    info: Dict[str, Any] = {
        "precision": "fp16",
        "format": "float16 weights and compute, float32 I/O (onnxruntime.transformers.float16, keep_io_types)",
        "source_sha256": file_sha256(Path(fp32_path)),
    }
    g.copy_metadata(source, converted, info)
    g.save_model(converted, Path(target))
    return Path(target), time.perf_counter() - started, info
