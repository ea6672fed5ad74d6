"""Colour statistics of the conjunctiva, computed inside the network, and the small branch that reads them.

Why: on folds grouped by photograph a gradient-boosting model on colour statistics of the ROI
beats the CNN (models/cv/baselines.json), while each statistic alone is at chance (AUC 0.44-0.53
on the 610 images): the signal is in their combination, which a linear head on pooled CNN features
does not find on 300 photographs. So the network computes the statistics itself, from its own
input tensor, and a two-layer branch learns their combination beside the CNN features.

Everything is elementwise arithmetic and reductions (Abs, Sub, Mul, Div, Log, Sqrt, Sigmoid,
ReduceSum, Concat, Gemm): ONNX Runtime, OpenVINO and TensorRT run it as it is, so the statistics
live in the one graph, not in the server. The ROI is recovered from the tensor: the preprocessing
paints everything outside the conjunctiva (and the letterbox) with the spec's fill, so a pixel is
inside when any channel differs from the normalized fill.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from service.preprocess import PreprocessSpec

#: log(R/G) thresholds of the soft "share of pixels redder than t" statistics: erythema index
#: levels spanning the crops' range (the median crop sits near 0.3).
ERYTHEMA_LEVELS: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
ERYTHEMA_SOFTNESS = 0.05
_EPS = 1e-3  # keeps log() finite on black pixels (values are in 0..1)
_VAR_EPS = 1e-6  # sqrt'(0) is infinite: a flat crop must not give NaN gradients

STAT_NAMES: Tuple[str, ...] = (
    ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "mean_log_r_g", "std_log_r_g", "mean_log_r_b", "std_log_r_b")
    + ("mean_chroma_r", "mean_chroma_g", "mean_chroma_b", "std_chroma_r", "std_chroma_g", "std_chroma_b")
    + tuple("share_log_r_g_over_{:.1f}".format(t) for t in ERYTHEMA_LEVELS)
)


class ColourStats(nn.Module):
    """N x 3 x H x W normalized input -> N x len(STAT_NAMES) statistics of the ROI pixels (0..1 RGB)."""

    scale: torch.Tensor
    shift: torch.Tensor
    fill: torch.Tensor

    def __init__(self, spec: PreprocessSpec) -> None:
        super().__init__()
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        fill = (torch.tensor(spec.fill, dtype=torch.float32).view(1, 3, 1, 1) - mean) / std
        if spec.channel_order == "BGR":
            mean, std, fill = mean.flip(1), std.flip(1), fill.flip(1)
        # x * scale + shift gives RGB in 0..1 (channels reordered to RGB below when BGR)
        self.register_buffer("scale", std / 255.0)
        self.register_buffer("shift", mean / 255.0)
        self.register_buffer("fill", fill)
        self.bgr = spec.channel_order == "BGR"

    @property
    def size(self) -> int:
        return len(STAT_NAMES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        inside = ((x - self.fill).abs().sum(1, keepdim=True) > 1e-6).float()
        count = inside.sum((2, 3)).clamp(min=1.0)
        rgb = (x * self.scale + self.shift).clamp(0.0, 1.0)
        if self.bgr:
            rgb = rgb.flip(1)

        def masked_mean(t: torch.Tensor) -> torch.Tensor:
            return (t * inside).sum((2, 3)) / count

        def masked_std(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(masked_mean((t - m[:, :, None, None]) ** 2) + _VAR_EPS)

        red, green, blue = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
        log_r_g = torch.log(red + _EPS) - torch.log(green + _EPS)
        log_r_b = torch.log(red + _EPS) - torch.log(blue + _EPS)
        chroma = rgb / (rgb.sum(1, keepdim=True) + _EPS)
        stats: List[torch.Tensor] = []
        for t in (rgb, log_r_g, log_r_b, chroma):
            m = masked_mean(t)
            stats += [m, masked_std(t, m)]
        shares = [masked_mean(torch.sigmoid((log_r_g - level) / ERYTHEMA_SOFTNESS)) for level in ERYTHEMA_LEVELS]
        return torch.cat(stats + shares, 1)  # in STAT_NAMES order


class ColourBranch(nn.Module):
    """Statistics -> standardized (constants set from the training images) -> Linear -> ReLU.

    Its output is concatenated with the CNN's pooled features before the one final Linear, so the
    graph still ends in Sigmoid(Gemm) (Platt scaling folds into that Gemm) and the whole model is
    one graph per precision.
    """

    stat_mean: torch.Tensor
    stat_std: torch.Tensor

    def __init__(self, spec: PreprocessSpec, hidden: int) -> None:
        super().__init__()
        self.stats: ColourStats = ColourStats(spec)
        self.register_buffer("stat_mean", torch.zeros(self.stats.size))
        self.register_buffer("stat_std", torch.ones(self.stats.size))
        self.embed: nn.Sequential = nn.Sequential(nn.Linear(self.stats.size, hidden), nn.ReLU(inplace=True))
        self.hidden = hidden

    @torch.no_grad()
    def set_standardization(self, raw_stats: torch.Tensor) -> None:
        """Centre and scale from these (training) images' statistics."""
        self.stat_mean.copy_(raw_stats.mean(0))
        self.stat_std.copy_(raw_stats.std(0).clamp(min=1e-4))

    def from_stats(self, raw_stats: torch.Tensor) -> torch.Tensor:
        return self.embed((raw_stats.float() - self.stat_mean) / self.stat_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_stats(self.stats(x))


@torch.no_grad()
def colour_statistics(images: torch.Tensor, spec: PreprocessSpec, batch_size: int = 64) -> torch.Tensor:
    """The raw statistics of preprocessed images (what the branch computes in-graph), N x K."""
    stats = ColourStats(spec)
    return torch.cat([stats(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0, stats.size)
