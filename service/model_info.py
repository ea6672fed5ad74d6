"""The model's identity and preprocessing, read from the ONNX file's ``metadata_props``."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from service.errors import EngineError
from service.onnx_header import read_header
from service.preprocess import PreprocessSpec

INPUT_NAME = "image"
OUTPUT_NAME = "anemia_probability"

# metadata_props keys written at export (besides the ``preprocess.*`` ones of PreprocessSpec)
KEY_NAME = "model_name"
KEY_VERSION = "model_version"
KEY_THRESHOLD = "threshold"
# JSON: how the threshold was chosen and the sensitivity/specificity measured at it (OperatingPoint)
KEY_OPERATING_POINT = "operating_point"
# JSON: the calibration folded into the final layer (Calibration)
KEY_CALIBRATION = "calibration"

HOW_TO_GET_A_MODEL = (
    "The trained model ships in the repository as models/anemia_mobilenetv2.onnx; restore it with "
    "`git checkout -- models/`, train one with `make train` (see README, 'Training'), or point "
    "ANEMIA_MODEL at an ONNX model exported by training/export.py."
)


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class MeasuredRate:
    """A proportion with its interval, e.g. sensitivity 0.9 [0.8, 0.96]."""

    value: float
    ci_low: float
    ci_high: float

    @classmethod
    def from_dict(cls, data: Any, what: str) -> "MeasuredRate":
        if not isinstance(data, dict):
            raise ValueError("{} must be an object with value, ci_low and ci_high".format(what))
        value, low, high = (_proportion(data.get(key), "{}.{}".format(what, key)) for key in ("value", "ci_low", "ci_high"))
        if not low <= value <= high:
            raise ValueError("{}: ci_low <= value <= ci_high does not hold ({}, {}, {})".format(what, low, value, high))
        return cls(value=value, ci_low=low, ci_high=high)


@dataclass(frozen=True)
class OperatingPoint:
    """The decision threshold of the screen and what was measured at it (metadata ``operating_point``).

    ``threshold`` is on the scale of the model's output (after any calibration folded into it) and
    equals the model's ``threshold`` key. ``chosen_on``, ``measured_on`` and ``interval`` say in
    words which data chose it, which data measured it and how the intervals were computed.
    """

    target_sensitivity: float
    threshold: float
    chosen_on: str
    measured_on: str
    sensitivity: MeasuredRate
    specificity: MeasuredRate
    interval: str

    @classmethod
    def from_json(cls, text: str) -> "OperatingPoint":
        data = _json_object(text, KEY_OPERATING_POINT)
        return cls(
            target_sensitivity=_proportion(data.get("target_sensitivity"), "target_sensitivity"),
            threshold=_proportion(data.get("threshold"), "threshold"),
            chosen_on=_text(data.get("chosen_on"), "chosen_on"),
            measured_on=_text(data.get("measured_on"), "measured_on"),
            sensitivity=MeasuredRate.from_dict(data.get("sensitivity"), "sensitivity"),
            specificity=MeasuredRate.from_dict(data.get("specificity"), "specificity"),
            interval=_text(data.get("interval"), "interval"),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Calibration:
    """Platt scaling folded into the final layer (metadata ``calibration``): p' = sigmoid(slope * logit(p) + intercept).

    ``brier_after_cross_fold`` (optional) is the Brier score of a calibration fitted without the
    fold it is scored on, the honest counterpart of the in-sample ``brier_after``.
    """

    method: str
    slope: float
    intercept: float
    fitted_on: str
    brier_before: float
    brier_after: float
    folded_into: str
    brier_after_cross_fold: Optional[float] = None

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        data = _json_object(text, KEY_CALIBRATION)
        cross = data.get("brier_after_cross_fold")
        return cls(
            method=_text(data.get("method"), "method"),
            slope=_finite(data.get("slope"), "slope"),
            intercept=_finite(data.get("intercept"), "intercept"),
            fitted_on=_text(data.get("fitted_on"), "fitted_on"),
            brier_before=_proportion(data.get("brier_before"), "brier_before"),
            brier_after=_proportion(data.get("brier_after"), "brier_after"),
            folded_into=_text(data.get("folded_into"), "folded_into"),
            brier_after_cross_fold=None if cross is None else _proportion(cross, "brier_after_cross_fold"),
        )

    def to_json(self) -> str:
        data = asdict(self)
        if self.brier_after_cross_fold is None:
            del data["brier_after_cross_fold"]
        return json.dumps(data, sort_keys=True)


def _json_object(text: str, key: str) -> Dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError("{} is not JSON ({})".format(key, exc))
    if not isinstance(data, dict):
        raise ValueError("{} must be a JSON object".format(key))
    return data


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("{} must be a finite number, not {!r}".format(what, value))
    return float(value)


def _proportion(value: Any, what: str) -> float:
    number = _finite(value, what)
    if not 0.0 <= number <= 1.0:
        raise ValueError("{} must lie in [0, 1], not {}".format(what, number))
    return number


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("{} must be a non-empty string".format(what))
    return value


def parse_operating_metadata(props: Mapping[str, str], threshold: float) -> Tuple[Optional[OperatingPoint], Optional[Calibration]]:
    """The optional ``operating_point`` and ``calibration`` props; ValueError when present but wrong.

    A model without them (an older export, the tests' tiny models) has neither: None, None.
    """
    operating_point = OperatingPoint.from_json(props[KEY_OPERATING_POINT]) if KEY_OPERATING_POINT in props else None
    if operating_point is not None and not math.isclose(operating_point.threshold, threshold, rel_tol=0.0, abs_tol=1e-12):
        raise ValueError(
            "operating_point.threshold {!r} differs from the model's threshold {!r}".format(operating_point.threshold, threshold)
        )
    calibration = Calibration.from_json(props[KEY_CALIBRATION]) if KEY_CALIBRATION in props else None
    return operating_point, calibration


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    name: str
    version: str
    threshold: float
    spec: PreprocessSpec
    metadata: Dict[str, str] = field(default_factory=dict)
    operating_point: Optional[OperatingPoint] = None
    calibration: Optional[Calibration] = None

    @classmethod
    def from_onnx(cls, path: Path) -> "ModelInfo":
        path = Path(path)
        if not path.is_file():
            raise EngineError("model file {} not found. {}".format(path, HOW_TO_GET_A_MODEL))
        try:
            # Metadata and names only, without parsing the weights or importing onnx (memory).
            header = read_header(path)
        except (OSError, ValueError) as exc:
            raise EngineError("model file {} is not a readable ONNX model ({}). {}".format(path, exc, HOW_TO_GET_A_MODEL))
        props = header.metadata_props
        inputs, outputs = header.inputs, header.outputs
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise EngineError(
                "model {} has inputs {} and outputs {}; the service needs input '{}' and output '{}'".format(
                    path, inputs, outputs, INPUT_NAME, OUTPUT_NAME
                )
            )
        try:
            spec = PreprocessSpec.from_metadata(props)
            threshold = float(props[KEY_THRESHOLD])
            name, version = props[KEY_NAME], props[KEY_VERSION]
        except (KeyError, ValueError, TypeError) as exc:
            raise EngineError(
                "model {} lacks the service's metadata ({}); export it with training/export.py".format(path, exc)
            )
        try:
            operating_point, calibration = parse_operating_metadata(props, threshold)
        except ValueError as exc:
            # These are clinical claims: a damaged one must not be served as if it were measured.
            raise EngineError(
                "model {} has unreadable operating-point or calibration metadata ({}); "
                "rewrite it with `python -m training.calibration apply`".format(path, exc)
            )
        return cls(
            path=path,
            sha256=file_sha256(path),
            name=name,
            version=version,
            threshold=threshold,
            spec=spec,
            metadata=props,
            operating_point=operating_point,
            calibration=calibration,
        )

    def public_metadata(self) -> Dict[str, Any]:
        """Metadata for /v1/model, JSON values decoded where they are JSON."""
        decoded: Dict[str, Any] = {}
        for key, value in sorted(self.metadata.items()):
            try:
                decoded[key] = json.loads(value)
            except ValueError:
                decoded[key] = value
        return decoded


NO_OPERATING_POINT = (
    "this model carries no measured operating point: the screen's sensitivity and specificity are not known"
)
NO_CALIBRATION = "this model carries no calibration: its probabilities are the network's own outputs, not checked against outcomes"


# training/calibration.py measures the operating point on the FP32 fold models
MEASURED_PRECISION = "fp32"


def describe_operating_point(model: ModelInfo, served_threshold: float, served_precision: str = MEASURED_PRECISION) -> Dict[str, Any]:
    """/v1/model's ``operating_point``: what was measured, and whether it describes the labels served.

    ``applies`` is false when nothing was measured, when the server judges at another threshold
    (ANEMIA_THRESHOLD), or when it runs another precision than the FP32 the figures were measured
    with: a quantized engine gives other labels on some children (docs/quantization.md).
    """
    point = model.operating_point
    if point is None:
        return {"known": False, "applies": False, "note": NO_OPERATING_POINT}
    described: Dict[str, Any] = {"known": True, "applies": True, "note": None}
    described.update(asdict(point))
    if not math.isclose(served_threshold, point.threshold, rel_tol=0.0, abs_tol=1e-12):
        described["applies"] = False
        described["note"] = (
            "ANEMIA_THRESHOLD={!r} overrides the model's threshold {!r}: the sensitivity and specificity "
            "were measured at the model's threshold and do not apply to the labels this server gives".format(
                served_threshold, point.threshold
            )
        )
    elif served_precision != MEASURED_PRECISION:
        described["applies"] = False
        described["note"] = (
            "measured with the {} model; this server runs the {} engine, whose labels differ from {}'s on some "
            "images (docs/quantization.md), so the sensitivity and specificity may not hold for its labels".format(
                MEASURED_PRECISION.upper(), served_precision.upper(), MEASURED_PRECISION.upper()
            )
        )
    return described


def describe_calibration(model: ModelInfo) -> Dict[str, Any]:
    """/v1/model's ``calibration``: the Platt scaling folded into the model, or that there is none."""
    if model.calibration is None:
        return {"known": False, "note": NO_CALIBRATION}
    described: Dict[str, Any] = {"known": True, "note": None}
    described.update(asdict(model.calibration))
    return described
