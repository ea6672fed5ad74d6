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
    model_config = {"protected_namespaces": ()}


class Status(BaseModel):
    status: str
    detail: Optional[str] = None
