"""The TFLite -> torch conversion reproduces the TFLite ImageNet classifier on two pictures."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from service.preprocess import PreprocessSpec, preprocess_roi
from training.mobilenetv2 import MobileNetV2, tf_same_pads
from training.tflite_weights import DEFAULT_TFLITE_PATH, imagenet_model, tflite_state_dict

WEIGHTS_DIR = DEFAULT_TFLITE_PATH.parent
needs_weights = pytest.mark.skipif(
    not DEFAULT_TFLITE_PATH.is_file(), reason="ImageNet TFLite weights not found at {}".format(DEFAULT_TFLITE_PATH)
)
# Stretch to 224x224 and x / 127.5 - 1: the service's preprocessing with the classifier's resize.
IMAGENET_SPEC = PreprocessSpec(resize_mode="stretch")
EXPECTED_TOP1 = {"cat.bmp": "Egyptian cat", "bird.bmp": "chickadee"}


def _labels() -> List[str]:
    return (WEIGHTS_DIR / "imagenet_labels.txt").read_text().splitlines()


def _tensor(name: str) -> np.ndarray:
    return preprocess_roi((WEIGHTS_DIR / name).read_bytes(), None, IMAGENET_SPEC).tensor


def test_tf_same_padding_puts_the_extra_pixel_after() -> None:
    assert tf_same_pads(224, 3, 2) == (0, 1)
    assert tf_same_pads(7, 3, 1) == (1, 1)
    assert tf_same_pads(225, 3, 2) == (1, 1)


def test_state_dict_names_match_torchvision_layout() -> None:
    names = set(MobileNetV2(num_classes=1000, tf_padding=False).state_dict())
    # a few names that torchvision's mobilenet_v2 state dict has
    for name in ("features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                 "features.2.conv.0.0.weight", "features.2.conv.2.weight", "features.2.conv.3.running_var",
                 "features.18.0.weight", "features.18.1.bias", "classifier.1.weight"):
        assert name in names
    assert len(names) == 314  # torchvision mobilenet_v2: 314 state-dict entries


@needs_weights
def test_converted_model_agrees_with_tflite_interpreter() -> None:
    torch.set_num_threads(2)
    labels = _labels()
    model = imagenet_model()
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # only the torch side can be checked without the interpreter
        Interpreter = None  # type: ignore[assignment,misc]
    for name, expected in EXPECTED_TOP1.items():
        tensor = _tensor(name)
        with torch.no_grad():
            logits = model(torch.from_numpy(tensor))[0].numpy()
        torch_top5 = [labels[i] for i in np.argsort(-logits)[:5]]
        assert torch_top5[0] == expected, (name, torch_top5)
        if Interpreter is None:
            continue
        interpreter = Interpreter(model_path=str(DEFAULT_TFLITE_PATH))
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        scale, zero_point = inp["quantization"]
        quantized = np.clip(np.round(tensor[0].transpose(1, 2, 0) / scale + zero_point), 0, 255).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], quantized[np.newaxis])
        interpreter.invoke()
        scores = interpreter.get_tensor(out["index"])[0].astype(np.float64)
        tflite_top5 = [labels[i] for i in np.argsort(-scores, kind="stable")[:5]]
        assert tflite_top5[0] == expected, (name, tflite_top5)
        assert len(set(torch_top5) & set(tflite_top5)) >= 3, (torch_top5, tflite_top5)


@needs_weights
def test_binary_model_takes_the_backbone_but_not_the_1001_class_head() -> None:
    model = MobileNetV2(num_classes=1)
    state = tflite_state_dict(model)
    assert "classifier.1.weight" not in state
    assert torch.allclose(state["features.1.conv.2.running_var"], torch.full((16,), 1 - 1e-5))
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
