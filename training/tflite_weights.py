"""Load ImageNet weights from the int8 TFLite MobileNetV2 into :class:`training.mobilenetv2.MobileNetV2`.

The TFLite file (``../shared/weights/mobilenet_v2_imagenet/tf2_mobilenet_v2_1.0_224_ptq.tflite``)
stores per-channel int8 weights and int32 biases with batch norm folded into each convolution.
Dequantized, they go into the torch model as: conv weight = dequantized weight, BatchNorm with
weight 1, bias = folded bias, running mean 0 and running var ``1 - eps`` (so that
``sqrt(var + eps) == 1`` and the BN is the identity plus the bias).

The convolutions appear in the flatbuffer in execution order, which is also the order of the
Conv2d modules in the torch model (stem, per block: expand, depthwise, project; last 1x1 conv),
followed by the 1x1 classifier conv (1001 classes) that maps to ``classifier.1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from training.mobilenetv2 import MobileNetV2

DEFAULT_TFLITE_PATH = (
    Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "mobilenet_v2_imagenet" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
)
IMAGENET_CLASSES_TF = 1001  # index 0 is "background"


@dataclass
class DequantizedConv:
    name: str
    depthwise: bool
    weight: np.ndarray  # torch layout: O x I/groups x kH x kW, float32
    bias: np.ndarray  # O, float32
    stride: int


def _dequantize(tensor: "object", buffer_data: np.ndarray) -> np.ndarray:
    quant = tensor.Quantization()  # type: ignore[attr-defined]
    scales = quant.ScaleAsNumpy().astype(np.float64)
    zero_points = quant.ZeroPointAsNumpy().astype(np.float64)
    axis = quant.QuantizedDimension()
    shape = [1] * buffer_data.ndim
    shape[axis] = -1
    if scales.size == 1:
        return ((buffer_data.astype(np.float64) - zero_points[0]) * scales[0]).astype(np.float32)
    return ((buffer_data.astype(np.float64) - zero_points.reshape(shape)) * scales.reshape(shape)).astype(np.float32)


def read_tflite_convs(path: Union[str, Path] = DEFAULT_TFLITE_PATH) -> List[DequantizedConv]:
    """Every CONV_2D / DEPTHWISE_CONV_2D of the model, dequantized, in execution order."""
    import tflite  # the flatbuffer schema; only needed here

    data = Path(path).read_bytes()
    model = tflite.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    dtypes = {tflite.TensorType.INT8: np.int8, tflite.TensorType.INT32: np.int32, tflite.TensorType.UINT8: np.uint8}

    def tensor_array(index: int) -> "tuple":
        tensor = graph.Tensors(index)
        raw = model.Buffers(tensor.Buffer()).DataAsNumpy()
        array = np.frombuffer(raw.tobytes(), dtype=dtypes[tensor.Type()]).reshape(tensor.ShapeAsNumpy())
        return tensor, array

    convs: List[DequantizedConv] = []
    for op_index in range(graph.OperatorsLength()):
        op = graph.Operators(op_index)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin not in (tflite.BuiltinOperator.CONV_2D, tflite.BuiltinOperator.DEPTHWISE_CONV_2D):
            continue
        depthwise = builtin == tflite.BuiltinOperator.DEPTHWISE_CONV_2D
        options = tflite.DepthwiseConv2DOptions() if depthwise else tflite.Conv2DOptions()
        table = op.BuiltinOptions()
        options.Init(table.Bytes, table.Pos)
        inputs = op.InputsAsNumpy()
        weight_tensor, weight_q = tensor_array(int(inputs[1]))
        bias_tensor, bias_q = tensor_array(int(inputs[2]))
        weight = _dequantize(weight_tensor, weight_q)
        # TFLite: conv O x kH x kW x I, depthwise 1 x kH x kW x C; torch: O x I x kH x kW, C x 1 x kH x kW
        weight = weight.transpose(3, 0, 1, 2) if depthwise else weight.transpose(0, 3, 1, 2)
        convs.append(
            DequantizedConv(
                name=weight_tensor.Name().decode(),
                depthwise=depthwise,
                weight=np.ascontiguousarray(weight),
                bias=_dequantize(bias_tensor, bias_q),
                stride=int(options.StrideH()),
            )
        )
    return convs


def tflite_state_dict(model: MobileNetV2, path: Union[str, Path] = DEFAULT_TFLITE_PATH, include_head: bool = True) -> Dict[str, torch.Tensor]:
    """A state dict for ``model`` (width 1.0) from the TFLite file; the head only when it has 1001 classes."""
    convs = read_tflite_convs(path)
    modules = [(name, module) for name, module in model.features.named_modules() if isinstance(module, nn.Conv2d)]
    if len(convs) != len(modules) + 1:
        raise ValueError("the TFLite file has {} convolutions; the model needs {} + 1 (head)".format(len(convs), len(modules)))
    state: Dict[str, torch.Tensor] = {}
    bn_names = {name: _bn_after(model, name) for name, _ in modules}
    for (name, conv_module), conv in zip(modules, convs):
        if tuple(conv_module.weight.shape) != conv.weight.shape or conv_module.stride[0] != conv.stride:
            raise ValueError(
                "shape mismatch at features.{}: torch {} stride {}, TFLite {} {} stride {}".format(
                    name, tuple(conv_module.weight.shape), conv_module.stride[0], conv.name, conv.weight.shape, conv.stride
                )
            )
        bn_name = bn_names[name]
        bn: nn.BatchNorm2d = model.features.get_submodule(bn_name)  # type: ignore[assignment]
        channels = conv.bias.shape[0]
        state["features.{}.weight".format(name)] = torch.from_numpy(conv.weight)
        state["features.{}.weight".format(bn_name)] = torch.ones(channels)
        state["features.{}.bias".format(bn_name)] = torch.from_numpy(conv.bias)
        state["features.{}.running_mean".format(bn_name)] = torch.zeros(channels)
        state["features.{}.running_var".format(bn_name)] = torch.full((channels,), 1.0 - bn.eps)
        state["features.{}.num_batches_tracked".format(bn_name)] = torch.tensor(0)
    head = convs[-1]
    linear: nn.Linear = model.classifier[1]  # type: ignore[assignment]
    if include_head and linear.out_features == head.weight.shape[0]:
        state["classifier.1.weight"] = torch.from_numpy(head.weight.reshape(head.weight.shape[0], -1).copy())
        state["classifier.1.bias"] = torch.from_numpy(head.bias)
    return state


def _bn_after(model: MobileNetV2, conv_name: str) -> str:
    """The BatchNorm that follows a conv: ``a.b.0`` -> ``a.b.1``, a block's ``conv.N`` -> ``conv.N+1``."""
    parts = conv_name.split(".")
    parts[-1] = str(int(parts[-1]) + 1)
    name = ".".join(parts)
    if not isinstance(model.features.get_submodule(name), nn.BatchNorm2d):
        raise ValueError("no BatchNorm after features.{}".format(conv_name))
    return name


def load_imagenet_weights(model: MobileNetV2, path: Union[str, Path] = DEFAULT_TFLITE_PATH) -> MobileNetV2:
    """Load the backbone (and the head when it has 1001 outputs); a binary head keeps its init."""
    state = tflite_state_dict(model, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"classifier.1.weight", "classifier.1.bias"}
    # the colour branch (training.colour_head) has no ImageNet counterpart
    if unexpected or {m for m in missing if not m.startswith("colour.")} - allowed_missing:
        raise ValueError("weights do not fit: missing {}, unexpected {}".format(missing, unexpected))
    return model


@torch.no_grad()
def unfold_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Give the folded BatchNorms real statistics without changing the eval-mode function.

    With folded weights every BN is the identity plus a bias; in train mode it would normalize
    with batch statistics instead and throw away the scale the folding baked into the convs, so
    fine-tuning would start from a broken network. Measuring each BN input's mean and variance on
    ``images`` (training images only) and setting running_mean = mean, running_var = var,
    weight = sqrt(var + eps), bias = mean + folded bias keeps eval mode exactly as before and makes
    train mode (batch statistics) start close to it.
    """
    sums: Dict[str, torch.Tensor] = {}
    squares: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):

            def hook(mod: nn.Module, inputs: "tuple", key: str = name) -> None:
                z = inputs[0].float()
                # per-batch sums in float32, accumulated in float64
                sums[key] = sums.get(key, 0) + z.sum((0, 2, 3)).double()
                squares[key] = squares.get(key, 0) + (z * z).sum((0, 2, 3)).double()
                counts[key] = counts.get(key, 0) + z.shape[0] * z.shape[2] * z.shape[3]

            hooks.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size].float())
    finally:
        for handle in hooks:
            handle.remove()
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            mean = sums[name] / counts[name]
            var = (squares[name] / counts[name] - mean * mean).clamp_min(0)
            bn_bias = module.bias.double()
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            module.weight.copy_(torch.sqrt(var + module.eps))
            module.bias.copy_(mean + bn_bias)
    model.train(was_training)
    return model


def imagenet_model(path: Union[str, Path] = DEFAULT_TFLITE_PATH) -> MobileNetV2:
    """The 1001-class ImageNet classifier (for checking the conversion), in eval mode."""
    model = MobileNetV2(num_classes=IMAGENET_CLASSES_TF, tf_padding=True)
    load_imagenet_weights(model, path)
    return model.eval()


def pretrained_binary_model(path: Optional[Union[str, Path]] = None, dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 with ImageNet backbone weights and a fresh one-logit head."""
    model = MobileNetV2(num_classes=1, tf_padding=True, dropout=dropout)
    return load_imagenet_weights(model, path or DEFAULT_TFLITE_PATH)
