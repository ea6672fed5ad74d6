"""Response bodies, for the OpenAPI document and its examples."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from pydantic import BaseModel, Field
from typing_extensions import Literal

from service.config import BatchingMode


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str


class RoiInfo(BaseModel):
    source: Literal["alpha", "polygon", "bbox", "full"]
    bbox: List[int] = Field(description="x, y, w, h of the ROI's bounding box in the uploaded image")
    pixels: int = Field(description="pixels inside the ROI")


class LatencyMs(BaseModel):
    decode: float
    preprocess: float
    queue: float
    inference: float
    total: float


class Prediction(BaseModel):
    request_id: str
    anemia_probability: float = Field(ge=0.0, le=1.0, description="P(Hb < 11 g/dL)")
    label: Literal["anemic", "non-anemic"]
    threshold: float
    precision: str
    backend: str
    model: ModelRef
    roi: RoiInfo
    latency_ms: LatencyMs

    model_config = {
        "protected_namespaces": (),
        "json_schema_extra": {
            "examples": [
                {
                    "request_id": "5f0c6a0e1b7d4c0f9a3c2b1d0e9f8a7b",
                    "anemia_probability": 0.87,
                    "label": "anemic",
                    "threshold": 0.5,
                    "precision": "fp32",
                    "backend": "onnxruntime",
                    "model": {"name": "anemia-mobilenetv2", "version": "1.0.0", "sha256": "ab12…"},
                    "roi": {"source": "alpha", "bbox": [0, 12, 365, 91], "pixels": 10287},
                    "latency_ms": {"decode": 1.1, "preprocess": 2.3, "queue": 0.1, "inference": 9.8, "total": 14.0},
                }
            ]
        },
    }


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. invalid_roi")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: str


class BatchingInfo(BaseModel):
    mode: BatchingMode
    max_batch: int = Field(description="ANEMIA_MAX_BATCH as configured")
    batch_limit: int = Field(description="most images per backend call, decided at warm-up")
    decided: bool = Field(description="false until warm-up has run")
    warmup_ms_per_image: Dict[str, float] = Field(description="warm-up time per image by batch size (auto mode)")


class ThreadsInfo(BaseModel):
    """The thread budget (service/thread_budget.py): how the cores are split, where each number came from and why."""

    cores: int = Field(description="cores this process may run on (its affinity)")
    engine: str = Field(description="cpu or gpu: where the engine computes")
    engine_workers: int = Field(
        description="threads that each own one engine session and pull from the one queue (1 with a GPU engine); "
        "worker 0 also holds the idle session"
    )
    load_intra_op_threads: int = Field(description="engine threads per call while other requests wait, per worker")
    idle_intra_op_threads: int = Field(description="engine threads for a lone request on an idle box")
    load_spinning: bool
    idle_spinning: bool
    preprocess_threads: int
    two_sessions: bool = Field(description="whether an idle session with more threads was opened")
    idle_session: Optional[bool] = Field(
        default=None, description="warm-up's decision: the idle session is used (measured faster), null before warm-up"
    )
    warmup_ms: Dict[str, float] = Field(description="one image on each session at warm-up (median of blocks)")
    sources: Dict[str, str] = Field(description="machine, or the setting that fixed the number")
    reasons: Dict[str, str]


class MeasuredRateInfo(BaseModel):
    value: float
    ci_low: float
    ci_high: float


class OperatingPointInfo(BaseModel):
    known: bool = Field(description="false: the model carries no measured operating point")
    applies: bool = Field(
        description="true only when the measured sensitivity and specificity describe the labels this server gives "
        "(false when unknown, when ANEMIA_THRESHOLD overrides the model's threshold, or when the server runs another "
        "precision than the FP32 it was measured with)"
    )
    note: Optional[str] = Field(default=None, description="why it is unknown or does not apply")
    target_sensitivity: Optional[float] = None
    threshold: Optional[float] = Field(default=None, description="the model's threshold, at which the rates were measured")
    chosen_on: Optional[str] = Field(default=None, description="the data the threshold was chosen on")
    measured_on: Optional[str] = Field(default=None, description="the data the rates were measured on")
    sensitivity: Optional[MeasuredRateInfo] = Field(default=None, description="share of anemic children flagged")
    specificity: Optional[MeasuredRateInfo] = Field(default=None, description="share of other children not flagged")
    interval: Optional[str] = Field(default=None, description="how the intervals were computed")


class CalibrationInfo(BaseModel):
    known: bool = Field(description="false: the model carries no calibration")
    note: Optional[str] = None
    method: Optional[str] = None
    slope: Optional[float] = None
    intercept: Optional[float] = None
    fitted_on: Optional[str] = None
    brier_before: Optional[float] = None
    brier_after: Optional[float] = None
    brier_after_cross_fold: Optional[float] = None
    folded_into: Optional[str] = None


class ModelDescription(BaseModel):
    name: str
    version: str
    sha256: str
    threshold: float
    precision: str
    backend: str
    preprocess: Dict[str, Any]
    metadata: Dict[str, Any]
    engine: Dict[str, Any]
    batching: Optional[BatchingInfo] = None
    threads: Optional[ThreadsInfo] = None
    operating_point: OperatingPointInfo
    calibration: CalibrationInfo
    model_config = {"protected_namespaces": ()}


class Status(BaseModel):
    status: str
    detail: Optional[str] = None
