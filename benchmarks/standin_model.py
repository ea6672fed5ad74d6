"""A same-architecture stand-in for the trained model, for speed measurements only.

Speed depends on the architecture, not on the weights: this exports the project's MobileNetV2
(``training.mobilenetv2``) with the ImageNet backbone from ``../shared/weights`` and a fresh,
untrained one-logit head, through the very export path the trained model takes
(``training.export.export_onnx``: same contract, opset, metadata keys). Its probabilities mean
nothing; never serve it. With ``--int8`` it also writes the calibrated INT8 twin beside it
(``<stem>.int8.onnx``, calibrated on CP-AnemiC through the service's preprocessing) so every
precision can be built and timed.

    python -m benchmarks.standin_model --out build/bench/anemia_mobilenetv2_standin.onnx --int8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = PROJECT_ROOT / "build" / "bench" / "anemia_mobilenetv2_standin.onnx"
CP_ANEMIC_DIR = PROJECT_ROOT.parent / "shared" / "data" / "cp-anemic"


def export_standin(out: Path) -> Path:
    import torch

    from service.preprocess import PreprocessSpec
    from training.export import export_onnx
    from training.tflite_weights import pretrained_binary_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = pretrained_binary_model().eval()
    export_onnx(
        model,
        out,
        PreprocessSpec(),
        threshold=0.5,
        version="standin-imagenet-untrained-head",
        data_sha256="none",
        extra_metadata={"benchmark_note": "ImageNet backbone, untrained head: for speed measurements only"},
    )
    return out


def write_int8(model_path: Path, images: int = 32) -> Path:
    from engine_build.quantization.int8_artifact import int8_artifact_path
    from service.preprocess import PreprocessSpec
    from engine_build.quantization.calibration import list_images, load_tensors, pick_subset
    from engine_build.quantization.int8 import quantize_int8

    paths = pick_subset(list_images([CP_ANEMIC_DIR]), images, seed=0)
    if not paths:
        raise SystemExit("no calibration images under {}".format(CP_ANEMIC_DIR))
    tensors = load_tensors(paths, PreprocessSpec())
    target = int8_artifact_path(model_path)
    quantize_int8(model_path, target, tensors, calibration_note="{} CP-AnemiC images (benchmark stand-in)".format(len(paths)))
    return target


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--int8", action="store_true", help="also write the calibrated INT8 twin")
    args = parser.parse_args(argv)
    path = export_standin(args.out)
    print("wrote {} ({:.1f} MB)".format(path, path.stat().st_size / 1e6))
    if args.int8:
        int8 = write_int8(path)
        print("wrote {} ({:.1f} MB)".format(int8, int8.stat().st_size / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
