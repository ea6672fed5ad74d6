"""TensorRT engines (8.2 .. 10.x) from the ONNX artifacts.

* FP32 / FP16: the FP32 model, FP16 via the builder flag.
* INT8: the committed calibrated Q/DQ model (explicit quantization; no calibrator, no dataset on
  the device). Refused on GPUs without fast INT8 (Jetson TX2): there INT8 would be emulated and
  slower than FP16, which is how the published study got a slower, worse INT8.
* INT4: weight-only, the classifier's MatMul only (TensorRT's INT4 exists only for MatMul/Gemm
  weights), everything else FP16. Refused on TensorRT < 10 (including JetPack 4.6 on TX2).

Workspace defaults to 256 MiB because a Jetson's GPU shares its memory with the CPU and the
server. A timing cache (one per device and TensorRT version) makes rebuilds fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional


from engine_build.artifact import ArtifactJob
from engine_build.quantization.int8_artifact import check_int8_artifact, int8_artifact_path
from engine_build.quantization.modes import ROUNDING_MODES
from service.engines import slug
from service.errors import EngineError
from service.model_info import INPUT_NAME, ModelInfo
from service.runtime import trt_compat as compat

DEFAULT_WORKSPACE_MIB = 256
DEFAULT_MAX_BATCH = 8
MIB = 1024 * 1024


@dataclass(frozen=True)
class TensorRTBuildOptions:
    """How to build a TensorRT engine; a bad value is refused when the options are made."""

    int8_model: Optional[Path] = None
    #: The optimization profile's largest batch: it must cover the server's ANEMIA_MAX_BATCH.
    max_batch: int = DEFAULT_MAX_BATCH
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    timing_cache: Optional[Path] = None
    int4_rounding: str = "mse"
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise EngineError("max_batch must be at least 1, got {}".format(self.max_batch))
        if self.workspace_mib < 1:
            raise EngineError("workspace_mib must be at least 1, got {}".format(self.workspace_mib))
        if self.int4_rounding not in ROUNDING_MODES:
            raise EngineError("int4_rounding must be one of {}, got {!r}".format(", ".join(ROUNDING_MODES), self.int4_rounding))


def refuse_reason(precision: str, trt_version: tuple, fast_fp16: bool, fast_int8: bool, device: str) -> Optional[str]:
    """Why ``precision`` cannot be built here, or None."""
    if precision == "int4" and trt_version < compat.INT4_MIN_VERSION:
        return (
            "INT4 is not available with TensorRT {}.{} on {}: TensorRT has INT4 only as weight-only quantization "
            "of MatMul/Gemm weights, from TensorRT 10 (JetPack 6); JetPack 4.6 on a Jetson TX2 ships TensorRT 8.2. "
            "Use --precision fp16 (or int8 where the GPU has fast INT8).".format(trt_version[0], trt_version[1], device)
        )
    if precision == "int8" and not fast_int8:
        return (
            "INT8 refused: {} has no fast INT8 (platform_has_fast_int8 is False; e.g. Jetson TX2, sm_62). TensorRT would "
            "run INT8 layers emulated, slower than FP16 and no smaller in effect; use --precision fp16.".format(device)
        )
    if precision == "fp16" and not fast_fp16:
        return "FP16 refused: {} has no fast FP16 (platform_has_fast_fp16 is False); use --precision fp32.".format(device)
    return None


def _source_model(model: ModelInfo, precision: str, int8_model: Optional[Path], scratch: Path, int4_rounding: str) -> Dict[str, Any]:
    """The ONNX file TensorRT parses for ``precision``, and what to record about it."""
    if precision in ("fp32", "fp16"):
        return {"path": model.path, "info": {"source": str(model.path)}}
    if precision == "int8":
        artifact = Path(int8_model) if int8_model else int8_artifact_path(model.path)
        meta = check_int8_artifact(artifact, model)
        meta.pop("options", None)
        return {"path": artifact, "info": dict(meta, source=str(artifact))}
    # Imported when needed, as in onnxruntime_builder: the server imports this module through the registry.
    from engine_build.quantization.int4 import Int4Options, quantize_int4_tensorrt

    result = quantize_int4_tensorrt(model.path, scratch / "int4_classifier.onnx", Int4Options(rounding=int4_rounding))
    return {"path": result.path, "info": dict(result.info)}


def write_tensorrt_artifact(job: ArtifactJob, options: TensorRTBuildOptions) -> Dict[str, Any]:
    """Build the TensorRT engine of ``job.model`` at ``job.precision`` into ``job.staged``; returns its build info."""
    import tensorrt as trt  # only on a device with TensorRT; the registry keeps it optional

    precision, key = job.precision, job.key
    logger = compat.make_logger(options.verbose)
    builder = trt.Builder(logger)
    fast_fp16, fast_int8 = compat.platform_has_fast_fp16(builder), compat.platform_has_fast_int8(builder)
    reason = refuse_reason(precision, compat.version(), fast_fp16, fast_int8, key.device)
    if reason is not None:
        raise EngineError(reason)

    cache_path = (
        Path(options.timing_cache)
        if options.timing_cache
        else job.engine_dir / "timing-{}-{}.cache".format(slug(key.device), slug(key.tool_version))
    )
    source = _source_model(job.model, precision, options.int8_model, job.scratch, options.int4_rounding)
    onnx_path = Path(source["path"])
    import onnx  # here, not at the top: the server imports this module but never builds

    graph = onnx.load(str(onnx_path))
    node_names: List[str] = [node.name or "{}#{}".format(node.op_type, i) for i, node in enumerate(graph.graph.node)]

    network = compat.create_network(builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = compat.parser_errors(parser, node_names)
        raise EngineError(
            "TensorRT {} could not parse {}:\n  {}".format(compat.version_string(), onnx_path, "\n  ".join(errors or ["unknown error"]))
        )
    config = builder.create_builder_config()
    compat.set_workspace(config, int(options.workspace_mib) * MIB)
    flags = compat.set_precision_flags(config, precision)
    chw = [int(d.dim_value) for d in graph.graph.input[0].type.tensor_type.shape.dim[1:]]
    profile = compat.add_profile(builder, config, INPUT_NAME, chw, int(options.max_batch))
    if cache_path.is_file():
        compat.load_timing_cache(config, cache_path.read_bytes())
    else:
        compat.load_timing_cache(config, b"")
    serialized = compat.build_serialized(builder, network, config)
    if serialized is None:
        raise EngineError(
            "TensorRT {} failed to build the {} engine from {} (see the TensorRT log above; try a larger "
            "--workspace-mib than {})".format(compat.version_string(), precision, onnx_path, options.workspace_mib)
        )
    job.staged.write_bytes(serialized)
    cache_bytes = compat.serialize_timing_cache(config)
    if cache_bytes:
        cache_path.write_bytes(cache_bytes)
    info: Dict[str, Any] = dict(source["info"])
    info.update(
        {
            "builder_flags": flags,
            "workspace_mib": int(options.workspace_mib),
            "optimization_profile": {"input": INPUT_NAME, "batch_min_opt_max": list(profile), "chw": chw},
            "platform_has_fast_fp16": fast_fp16,
            "platform_has_fast_int8": fast_int8,
            "timing_cache": str(cache_path),
            "api": "named tensors" if compat.version() >= (8, 5) else "bindings",
        }
    )
    return info
