"""The choices the quantization transforms accept, defined once for them, their build options and
the command line; kept apart so that naming a choice does not import ONNX Runtime's quantizer."""

from __future__ import annotations

#: INT4 weight rounding: GPTQ (needs calibration images), MSE-optimal scale, round to nearest.
ROUNDING_MODES = ("gptq", "mse", "rtn")
#: ONNX Runtime INT8 weights (ort_layout.derive_ort_int8 explains each).
WEIGHT_MODES = ("auto", "s8", "u8", "s8-reduce-range")
