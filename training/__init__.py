"""Training: MobileNetV2 fine-tuning on CP-AnemiC, cross-validation, baselines and ONNX export."""

from __future__ import annotations
