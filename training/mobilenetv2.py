"""MobileNetV2 in plain torch, with torchvision's module layout and state-dict names.

``features.0`` is the stem, ``features.1..17`` the inverted residual blocks, ``features.18`` the
1x1 conv to 1280 channels and ``classifier.1`` the linear head, exactly as in
``torchvision.models.mobilenet_v2``, so a torchvision ``mobilenet_v2-*.pth`` state dict loads with
``load_state_dict`` (with ``num_classes=1000``). Weight loading lives elsewhere
(:mod:`training.tflite_weights`).

Two differences matter when the weights come from TensorFlow: TF pads stride-2 convolutions
"SAME" (on an even input, one row/column at the bottom/right only; torch pads both sides), which
``tf_padding=True`` reproduces; and TF's ImageNet head has 1001 classes (index 0 = background).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from training.colour_head import ColourBranch

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper and torchvision
INVERTED_RESIDUAL_SETTING: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
BN_EPS = 1e-5  # torchvision's (and PyTorch's) BatchNorm2d default


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round channels to a multiple of ``divisor`` without losing more than 10% (torchvision's rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def tf_same_pads(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after); the extra pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBNAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU6 (``activation=False`` drops the ReLU6); names ``0``, ``1``, ``2``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
        tf_padding: bool = False,
    ) -> None:
        # With TF padding the stride-2 convs pad themselves in forward(); stride 1 is symmetric anyway.
        self.same_pad = tf_padding and stride > 1
        padding = 0 if self.same_pad else (kernel_size - 1) // 2
        layers: List[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, eps=BN_EPS),
        ]
        if activation:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            top, bottom = tf_same_pads(int(x.shape[-2]), self.kernel_size, self.stride)
            left, right = tf_same_pads(int(x.shape[-1]), self.kernel_size, self.stride)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, tf_padding: bool) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_channels, hidden, kernel_size=1))
        layers.extend(
            [
                ConvBNAct(hidden, hidden, stride=stride, groups=hidden, tf_padding=tf_padding),
                nn.Conv2d(hidden, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels, eps=BN_EPS),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; ``num_classes=1`` gives the binary head (one logit, sigmoid applied at export)."""

    def __init__(
        self,
        num_classes: int = 1,
        width_mult: float = 1.0,
        tf_padding: bool = True,
        dropout: float = 0.2,
        setting: Sequence[Tuple[int, int, int, int]] = INVERTED_RESIDUAL_SETTING,
        colour: Optional["ColourBranch"] = None,
    ) -> None:
        super().__init__()
        in_channels = make_divisible(32 * width_mult)
        # torchvision keeps the last conv at 1280 for width <= 1.0
        self.last_channels = make_divisible(1280 * max(1.0, width_mult))
        features: List[nn.Module] = [ConvBNAct(3, in_channels, stride=2, tf_padding=tf_padding)]
        for t, c, n, s in setting:
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t, tf_padding))
                in_channels = out_channels
        features.append(ConvBNAct(in_channels, self.last_channels, kernel_size=1))
        self.features = nn.Sequential(*features)
        # An optional branch of the same input (training.colour_head.ColourBranch, ``hidden``
        # features) whose output joins the pooled CNN features before the one final Linear.
        self.colour = colour
        extra = colour.hidden if colour is not None else 0
        # With a colour branch the dropout acts on the CNN features alone: dropping a few of the
        # branch's features would swing its (already fitted) logit and drown the CNN's gradient.
        self.cnn_dropout: nn.Module = nn.Dropout(p=dropout) if colour is not None else nn.Identity()
        self.classifier = nn.Sequential(nn.Dropout(p=0.0 if colour is not None else dropout), nn.Linear(self.last_channels + extra, num_classes))
        self._init_weights()
        if colour is not None:  # its hidden layer feeds a ReLU: PyTorch's default init, not the head's
            for module in colour.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled 1280-d features (the frozen-feature baseline uses these)."""
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the final Linear reads: pooled CNN features, then the colour branch's, if any."""
        pooled = self.pooled_features(x)
        if self.colour is None:
            return pooled
        return torch.cat([self.cnn_dropout(pooled), self.colour(x)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head_features(x))


class WithSigmoid(nn.Module):
    """The exported graph: logits -> probability, so the service never applies a sigmoid itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(image))
