"""Service settings: read once from ``ANEMIA_*`` environment variables and passed in explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated, Literal, get_args

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = PROJECT_ROOT / "models" / "anemia_mobilenetv2.onnx"
DEFAULT_ENGINE_DIR = PROJECT_ROOT / "engines"

Precision = Literal["fp32", "fp16", "int8", "int4"]
BackendName = Literal["auto", "onnxruntime", "tensorrt"]
# auto: batch only when warm-up measures the largest batch cheaper per image than one image.
BatchingMode = Literal["auto", "on", "off"]
PRECISIONS: Tuple[str, ...] = get_args(Precision)
BATCHING_MODES: Tuple[str, ...] = get_args(BatchingMode)

MIB = 1024 * 1024


class SettingsError(Exception):
    """A bad configuration value; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANEMIA_", extra="ignore", frozen=True, protected_namespaces=())

    precision: Precision = "fp32"
    backend: BackendName = "auto"
    model: Path = DEFAULT_MODEL_PATH
    engine_dir: Path = DEFAULT_ENGINE_DIR
    auto_build: bool = False
    threshold: Optional[float] = Field(default=None, ge=0.0, le=1.0)

    max_upload_bytes: int = Field(default=10 * MIB, gt=0)
    max_pixels: int = Field(default=40_000_000, gt=0)
    min_roi_pixels: int = Field(default=256, ge=1)
    max_polygon_points: int = Field(default=10_000, ge=3)

    max_batch: int = Field(default=8, ge=1, le=256)
    batching: BatchingMode = "auto"
    batch_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    queue_size: int = Field(default=64, ge=1)
    # Thread counts: 0 (and spinning unset) leaves each to the thread budget, which splits this
    # process's cores between event loop, preprocessing and engine (service/thread_budget.py;
    # /v1/model's "threads" says what it chose and why). A value set here overrides its part.
    preprocess_threads: int = Field(default=0, ge=0, le=64)
    # Engine workers on a CPU engine: threads that each own one engine session and pull from the
    # one queue (0: the thread budget decides; a GPU engine always has one).
    engine_workers: int = Field(default=0, ge=0, le=64)
    # Engine intra-op threads while other requests wait; set alone, every call gets this many.
    intra_op_threads: int = Field(default=0, ge=0, le=256)
    # Engine intra-op threads for a lone request on an idle box (a second ONNX Runtime session).
    idle_intra_op_threads: int = Field(default=0, ge=0, le=256)
    # Whether idle ONNX Runtime threads spin between parallel sections: lower latency alone, CPU
    # taken from decoding and HTTP under concurrency (docs/benchmarks.md measures both).
    intra_op_spinning: Optional[bool] = None

    api_key: Optional[SecretStr] = None
    # With a key set, /metrics answers only this bearer token (Prometheus' credentials_file), so
    # anyone on the Wi-Fi cannot watch anemia_predictions_total{label} move with each screening.
    metrics_token: Optional[SecretStr] = None
    # Deployments: a directory where `python -m service init` (and the server at start) keeps a
    # generated API key, metrics token and self-signed TLS certificate (service/credentials.py).
    credentials_dir: Optional[Path] = None
    # A copy of the certificate and the metrics token for the scraper (compose shares it with Prometheus).
    scrape_dir: Optional[Path] = None
    tls_certfile: Optional[Path] = None
    tls_keyfile: Optional[Path] = None

    # The HTTP edge (service/edge.py, service/upload.py): every socket and request has a deadline
    # and a size, measured against the attacks in docs/reliability.md.
    idle_timeout_s: float = Field(default=5.0, gt=0.0)  # no byte while waiting for a request
    header_timeout_s: float = Field(default=10.0, gt=0.0)  # first byte to end of the request head
    tls_handshake_timeout_s: float = Field(default=10.0, gt=0.0)
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)  # request line + headers
    max_header_count: int = Field(default=100, ge=8)
    # 0: derived from the descriptor limit (RLIMIT_NOFILE minus a reserve), see edge.connection_cap
    max_connections: int = Field(default=0, ge=0)
    # One address cannot take every slot; 0 turns the per-address cap off (e.g. behind a proxy).
    max_connections_per_client: int = Field(default=64, ge=0)
    # A body must arrive at this mean rate after a grace period, and within body_timeout_s in all.
    body_grace_s: float = Field(default=5.0, ge=0.0)
    min_body_rate_bytes_per_s: int = Field(default=16 * 1024, gt=0)
    body_timeout_s: float = Field(default=120.0, gt=0.0)
    # Bodies being read are held in memory: a budget in all and per client address (declared
    # Content-Length counts from the first byte), 503 ``too_many_uploads`` beyond it; 0 is off.
    max_body_bytes_in_flight: int = Field(default=64 * MIB, ge=0)
    max_body_bytes_in_flight_per_client: int = Field(default=32 * MIB, ge=0)
    shutdown_timeout_s: float = Field(default=30.0, gt=0.0)
    # glibc: allocations from this size are mmapped and go back to the OS when freed (bodies are
    # held in memory); 0 leaves glibc's dynamic threshold (service/edge.py, docs/reliability.md)
    malloc_mmap_threshold_bytes: int = Field(default=64 * 1024, ge=0)
    cors_origins: Annotated[List[str], NoDecode] = Field(default_factory=list)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tegrastats: bool = False

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("credentials_dir", "scrape_dir", "tls_certfile", "tls_keyfile", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        # ANEMIA_CREDENTIALS_DIR= (empty, as compose writes an unset default) is "off", never "."
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("api_key", "metrics_token", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning validation errors into one message per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            lines.append("ANEMIA_{}: {} (got {!r})".format(field.upper(), error["msg"], error.get("input")))
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
