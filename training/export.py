"""Export a trained model to ONNX with the service's contract and its metadata.

Contract (read by :class:`service.model_info.ModelInfo`): input ``image`` float32 ``[N,3,H,W]``,
output ``anemia_probability`` float32 ``[N,1]`` with the sigmoid inside, opset 17, dynamic batch;
``metadata_props`` holds the preprocessing (``preprocess.*``), ``model_name``, ``model_version``,
``threshold``, ``training_data_sha256`` and ``cv_metrics`` (JSON), and where known
``operating_point`` and ``calibration`` (JSON, :class:`service.model_info.OperatingPoint` and
:class:`~service.model_info.Calibration`; ``python -m training.calibration apply`` writes them).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.model_info import (
    INPUT_NAME,
    KEY_CALIBRATION,
    KEY_NAME,
    KEY_OPERATING_POINT,
    KEY_THRESHOLD,
    KEY_VERSION,
    OUTPUT_NAME,
    Calibration,
    OperatingPoint,
)
from service.preprocess import PreprocessSpec
from training.mobilenetv2 import WithSigmoid

OPSET = 17
MODEL_NAME = "anemia-mobilenetv2"
KEY_DATA_SHA256 = "training_data_sha256"
KEY_CV_METRICS = "cv_metrics"
ORT_TOLERANCE = 1e-4


def export_onnx(
    model: nn.Module,
    path: Path,
    spec: PreprocessSpec,
    threshold: float,
    version: str,
    data_sha256: str,
    cv_metrics: Optional[Mapping[str, object]] = None,
    extra_metadata: Optional[Mapping[str, str]] = None,
    check_batch: int = 2,
    seed: int = 0,
    operating_point: Optional[OperatingPoint] = None,
    calibration: Optional[Calibration] = None,
) -> float:
    """Write the ONNX file; return the max |ORT - torch| on random inputs (raises above 1e-4).

    ``calibration`` only records a calibration: the caller must have put it into ``model`` already
    (``training.calibration.fold_platt_into_onnx`` does both on an exported file).
    """
    path = Path(path)
    operating = operating_metadata(threshold, operating_point, calibration)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = WithSigmoid(model).eval().float()
    example = torch.zeros((1,) + spec.chw)
    with warnings.catch_warnings():
        # The TorchScript exporter gives opset 17 and a plain graph; its deprecation note is noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
            do_constant_folding=True,
            dynamo=False,
        )
    simplify_graph(path)
    onnx_model = onnx.load(str(path))
    metadata: Dict[str, str] = dict(spec.to_metadata())
    metadata.update(
        {
            KEY_NAME: MODEL_NAME,
            KEY_VERSION: version,
            KEY_DATA_SHA256: data_sha256,
            KEY_CV_METRICS: json.dumps(cv_metrics or {}, sort_keys=True),
        }
    )
    metadata.update(operating)
    metadata.update(extra_metadata or {})
    onnx.helper.set_model_props(onnx_model, metadata)
    onnx_model.producer_name = "training/export.py"
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))
    return check_against_torch(wrapped, path, spec.chw, check_batch, seed)


def operating_metadata(
    threshold: float, operating_point: Optional[OperatingPoint] = None, calibration: Optional[Calibration] = None
) -> Dict[str, str]:
    """The ``threshold``, ``operating_point`` and ``calibration`` props, checked to agree.

    The one writer of these keys, so ``threshold`` always equals ``operating_point.threshold``
    (ModelInfo refuses a model where they differ).
    """
    threshold = float(threshold)
    if operating_point is not None and operating_point.threshold != threshold:
        raise ValueError(
            "operating_point.threshold {!r} differs from the threshold {!r}".format(operating_point.threshold, threshold)
        )
    props = {KEY_THRESHOLD: repr(threshold)}
    if operating_point is not None:
        props[KEY_OPERATING_POINT] = operating_point.to_json()
    if calibration is not None:
        props[KEY_CALIBRATION] = calibration.to_json()
    return props


def simplify_graph(path: Path) -> None:
    """Fold the exporter's pad arithmetic into constants, in place, keeping the metadata.

    The TorchScript exporter lowers the "SAME" pads to a chain of Shape/ConstantOfShape/Concat/
    Slice/Transpose ops; TensorRT and quantizers prefer a plain ``Pad`` with constant pads.
    ONNX Runtime's basic (hardware-independent) level does exactly this constant folding and
    writes standard opset-17 ONNX, from 251 to about 106 nodes for MobileNetV2.
    """
    path = Path(path)
    original = onnx.load(str(path))
    tmp = path.with_suffix(".simplified.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp)
    options.intra_op_num_threads = 1
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    simplified = onnx.load(str(tmp))
    tmp.unlink()
    if any(node.domain not in ("", "ai.onnx") for node in simplified.graph.node):
        return  # ORT put in one of its own ops: keep the exporter's graph
    # ORT lists every domain it knows; only the standard one is used
    del simplified.opset_import[:]
    simplified.opset_import.extend(original.opset_import)
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(original.metadata_props)
    simplified.producer_name = original.producer_name
    onnx.checker.check_model(simplified)
    onnx.save(simplified, str(path))


def check_against_torch(wrapped: nn.Module, path: Path, chw: Tuple[int, int, int], batch: int = 2, seed: int = 0) -> float:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((batch,) + tuple(chw), generator=generator).clamp(-1, 1)
    with torch.no_grad():
        expected = wrapped(images).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    if got.shape != (batch, 1) or got.dtype != np.float32:
        raise RuntimeError("ONNX output is {} {}, expected ({}, 1) float32".format(got.dtype, got.shape, batch))
    diff = float(np.max(np.abs(got - expected)))
    if diff > ORT_TOLERANCE:
        raise RuntimeError("ONNX Runtime differs from torch by {:.2e} (> {:.0e})".format(diff, ORT_TOLERANCE))
    return diff


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m training.export simplify MODEL.onnx...``: fold pad arithmetic in exported files."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.export")
    parser.add_argument("command", choices=["simplify"])
    parser.add_argument("models", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for model_path in args.models:
        before = len(onnx.load(str(model_path)).graph.node)
        simplify_graph(model_path)
        print("{}: {} -> {} nodes".format(model_path, before, len(onnx.load(str(model_path)).graph.node)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
