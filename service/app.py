"""The HTTP service: thin FastAPI routes over plain functions that tests call directly."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, Iterator, Optional, Tuple, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.batching import MicroBatcher
from service.config import Settings
from service.engines import rebuild_hint
from service.errors import (
    EngineError,
    InvalidRequest,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    ShuttingDown,
    Unauthorized,
)
from service.logging_setup import request_id_var
from service.metrics import ServiceMetrics
from service.model_info import ModelInfo, describe_calibration, describe_operating_point
from service.preprocess import (
    PreprocessLimits,
    PreprocessResult,
    PreprocessSpec,
    decode_image,
    parse_roi_json,
    preprocess_decoded,
)
from service.upload import BodyBudget, BodyLimits, read_predict_upload
from service.schemas import ErrorBody, LatencyMs, ModelDescription, ModelRef, Prediction, RoiInfo, Status
from service.startup import BackendFactory, ResolvedEngine, backend_factory, resolve_engine, thread_plan
from service.thread_budget import ThreadPlan

logger = logging.getLogger("service.app")

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREDICT_PATH = "/v1/predict"
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: A lone request's picture up to this size is prepared on the event loop (a CP-AnemiC crop is
#: ~12 KB and takes ~1.5 ms); larger ones (camera originals) always go to the pool.
INLINE_PREPARE_MAX_BYTES = 256 * 1024
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# State


class ServiceState:
    """Everything one app instance owns: model, engine, batcher, executor, metrics."""

    def __init__(
        self,
        settings: Settings,
        model: ModelInfo,
        engine: ResolvedEngine,
        factory: BackendFactory,
        registry: Optional[CollectorRegistry] = None,
        threads: Optional[ThreadPlan] = None,
    ) -> None:
        self.settings = settings
        # How the cores are split (service/thread_budget.py); the backend records its warm-up choice here.
        self.threads = threads if threads is not None else thread_plan(settings, engine)
        self.model = model
        self.engine = engine
        self.threshold = settings.threshold if settings.threshold is not None else model.threshold
        self.limits = PreprocessLimits(
            max_pixels=settings.max_pixels,
            min_roi_pixels=settings.min_roi_pixels,
            max_polygon_points=settings.max_polygon_points,
        )
        self.body_limits = BodyLimits.from_settings(settings)
        self.body_budget = BodyBudget.from_settings(settings)
        self.registry = registry or CollectorRegistry()
        self.metrics = ServiceMetrics(self.registry)
        self.batcher = MicroBatcher(
            factory,
            max_batch=settings.max_batch,
            max_wait_seconds=settings.batch_wait_ms / 1000.0,
            queue_size=settings.queue_size,
            warmup_shape=model.spec.chw,
            on_batch=lambda size, _seconds: self.metrics.batch_size.observe(size),
            incoming=lambda: self.preparing,
            batching=settings.batching,
            workers=self.threads.engine_workers,
        )
        self.executor = ThreadPoolExecutor(max_workers=self.threads.preprocess_threads, thread_name_prefix="preprocess")
        self.in_flight = 0
        self.preparing = 0  # admitted, not yet handed to the batcher
        self.shutting_down = False
        self.telemetry: Any = None
        self.metrics.model_info.labels(
            precision=settings.precision, backend=engine.backend, model_sha256=model.sha256
        ).set(1)
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        self.metrics.requests_in_flight.set_function(lambda: float(self.in_flight))
        self.metrics.queue_depth.set_function(lambda: float(self.batcher.queue_depth))
        self.metrics.batch_limit.set_function(lambda: float(self.batcher.batch_limit))

    @property
    def max_in_flight(self) -> int:
        # Admitted requests beyond what the queue and the engine workers' running batches hold are
        # turned away early; the batch is the one warm-up settled on (ANEMIA_BATCHING).
        return self.settings.queue_size + self.batcher.workers * self.batcher.batch_limit

    @property
    def ready(self) -> bool:
        return self.batcher.ready and not self.shutting_down

    @contextmanager
    def admitted(self) -> Iterator[Callable[[], None]]:
        """Count one prediction in flight (503 ``overloaded`` past ``max_in_flight``) until it is
        answered; the yielded callable marks it handed to the batcher (no longer being prepared)."""
        if self.in_flight >= self.max_in_flight:
            raise Overloaded()
        self.in_flight += 1
        self.preparing += 1
        preparing = True

        def handed_over() -> None:
            nonlocal preparing
            if preparing:
                preparing = False
                self.preparing -= 1

        try:
            yield handed_over
        finally:
            handed_over()
            self.in_flight -= 1

    async def start(self) -> None:
        loaded = self.batcher.start()
        # Load errors (a corrupt engine, a CUDA failure) abort startup: never a half-ready server.
        try:
            await asyncio.wrap_future(loaded)
        except Exception as exc:
            # The manifest vouched for this file, so rebuilding needs the file gone first.
            raise EngineError(
                "engine {} could not be opened ({}: {}); if the file is damaged, delete it and {}".format(
                    self.engine.path, type(exc).__name__, str(exc)[:300], rebuild_hint(self.engine.entry.key, self.engine.path.parent)
                )
            ) from exc
        if self.settings.tegrastats:
            from service.telemetry import TegrastatsMonitor

            self.telemetry = TegrastatsMonitor(self.registry)
            self.telemetry.start()
        logger.info(
            "backend loaded",
            extra={"backend": self.engine.backend, "precision": self.settings.precision, "engine": self.engine.entry.file},
        )
        logger.info("thread plan", extra={"threads": self.threads.describe()})

    async def stop(self) -> None:
        self.shutting_down = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.batcher.stop)
        if self.telemetry is not None:
            self.telemetry.stop()
        self.executor.shutdown(wait=True)
        logger.info("stopped", extra={"backend_calls": self.batcher.backend_calls})

    async def run_blocking(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)


def build_state(settings: Settings, factory: Optional[BackendFactory] = None) -> ServiceState:
    """Read the model and find its engine now, so a bad configuration fails before serving."""
    model = ModelInfo.from_onnx(settings.model)
    engine = resolve_engine(settings, model)
    threads = thread_plan(settings, engine)
    return ServiceState(settings, model, engine, factory or backend_factory(settings, engine, threads), threads=threads)


# ---------------------------------------------------------------------------------------------
# Plain functions behind the routes


def check_api_key(settings: Settings, headers: Any) -> None:
    if settings.api_key is None:
        return
    supplied = headers.get("x-api-key")
    if supplied is None:
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            supplied = authorization[7:].strip()
    expected = settings.api_key.get_secret_value().encode()
    if supplied is None or not hmac.compare_digest(supplied.encode(), expected):
        raise Unauthorized("a valid API key is required in the X-API-Key header")


def check_metrics_token(settings: Settings, headers: Any) -> None:
    """/metrics is open on a box without a key; with a key it needs its own bearer token, so the
    key's holders (tablets) and the scraper's are apart and the results' counters are not public."""
    if settings.metrics_token is None:
        if settings.api_key is None:
            return
        raise Unauthorized("/metrics needs the metrics token (ANEMIA_METRICS_TOKEN) when an API key is set")
    authorization = headers.get("authorization", "")
    supplied = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
    expected = settings.metrics_token.get_secret_value().encode()
    if supplied is None or not hmac.compare_digest(supplied.encode(), expected):
        raise Unauthorized("a valid metrics token is required in the Authorization: Bearer header")



def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def prepare_request(
    data: bytes, roi_text: Optional[str], spec: PreprocessSpec, limits: PreprocessLimits
) -> Tuple[PreprocessResult, float, float]:
    """ROI parsing, decode and preprocess in one call, for one thread-pool hop per request.

    Each hop back to the event loop is a GIL hand-off that showed in the profile under load
    (docs/benchmarks.md, section 4). Returns the result, decode seconds and preprocess seconds.
    """
    roi = parse_roi_json(roi_text, limits.max_polygon_points)
    t0 = time.perf_counter()
    decoded = decode_image(data, limits.max_pixels, roi, spec.longer_side)
    t1 = time.perf_counter()
    prepared = preprocess_decoded(decoded, roi, spec, limits)
    return prepared, t1 - t0, time.perf_counter() - t1


async def predict(state: ServiceState, request: Request, request_id: str) -> Prediction:
    """Handle one prediction: read, decode, preprocess (off the loop), infer (batched), answer."""
    started = time.perf_counter()
    if not state.ready:
        raise NotReady("The server is shutting down." if state.shutting_down else "The model is warming up; retry shortly.")
    # The body is read before admission: a slow client holds a socket (and its share of the body
    # budget), never an in-flight slot, so 503 ``overloaded`` still means the engine is saturated.
    client = request.client.host if request.client is not None else None
    with state.body_budget.hold(client) as body_hold:
        data, roi_text = await read_predict_upload(
            request.receive, request.headers, state.body_limits, body_hold, request.query_params.getlist("roi")
        )
        if not state.ready:
            raise NotReady("The server is shutting down.")
        with state.admitted() as handed_over:
            if state.in_flight == 1 and len(data) <= INLINE_PREPARE_MAX_BYTES:
                # Alone on the box with a small picture (~1.5 ms of work): preparing it here saves
                # the two hand-offs to the pool and back, and no other request is kept waiting.
                prepared, decode_seconds, preprocess_seconds = prepare_request(data, roi_text, state.model.spec, state.limits)
            else:
                prepared, decode_seconds, preprocess_seconds = await state.run_blocking(
                    prepare_request, data, roi_text, state.model.spec, state.limits
                )
            del data
            body_hold.release()  # the picture is a tensor now
            handed_over()
            result = await state.batcher.submit(prepared.tensor)
    stages = state.metrics.stage_duration
    stages.labels(stage="decode").observe(decode_seconds)
    stages.labels(stage="preprocess").observe(preprocess_seconds)
    stages.labels(stage="queue").observe(result.queue_seconds)
    stages.labels(stage="inference").observe(result.inference_seconds)
    label = "anemic" if result.probability >= state.threshold else "non-anemic"
    state.metrics.predictions.labels(label=label).inc()
    total = time.perf_counter() - started
    logger.info(
        "prediction",
        extra={
            "label": label,
            "probability": round(result.probability, 4),
            "roi_source": prepared.roi_source,
            "batch_size": result.batch_size,
            "total_ms": _ms(total),
        },
    )
    return Prediction(
        request_id=request_id,
        anemia_probability=result.probability,
        label=label,
        threshold=state.threshold,
        precision=state.settings.precision,
        backend=state.engine.backend,
        model=ModelRef(name=state.model.name, version=state.model.version, sha256=state.model.sha256),
        roi=RoiInfo(source=prepared.roi_source, bbox=list(prepared.roi_bbox), pixels=prepared.roi_pixels),
        latency_ms=LatencyMs(
            decode=_ms(decode_seconds),
            preprocess=_ms(preprocess_seconds),
            queue=_ms(result.queue_seconds),
            inference=_ms(result.inference_seconds),
            total=_ms(total),
        ),
    )


def describe_model(state: ServiceState) -> Dict[str, Any]:
    return {
        "name": state.model.name,
        "version": state.model.version,
        "sha256": state.model.sha256,
        "threshold": state.threshold,
        "precision": state.settings.precision,
        "backend": state.engine.backend,
        "preprocess": asdict(state.model.spec),
        "metadata": state.model.public_metadata(),
        "engine": state.engine.entry.to_dict(),
        "batching": describe_batching(state.batcher),
        "threads": state.threads.describe(),
        "operating_point": describe_operating_point(state.model, state.threshold, state.settings.precision),
        "calibration": describe_calibration(state.model),
    }


def describe_batching(batcher: MicroBatcher) -> Dict[str, Any]:
    """What warm-up decided: ``batch_limit`` is the most images per backend call now in use."""
    return {
        "mode": batcher.batching,
        "max_batch": batcher.max_batch,
        "batch_limit": batcher.batch_limit,
        "decided": batcher.warmed_up.is_set(),
        # JSON keys are strings: {"1": ms, "8": ms}; empty unless "auto" timed a batch > 1.
        "warmup_ms_per_image": {str(batch): ms for batch, ms in sorted(batcher.warmup_ms_per_image.items())},
    }


def error_response(state: Optional[ServiceState], exc: ServiceError, request_id: str) -> JSONResponse:
    if state is not None:
        state.metrics.errors.labels(code=exc.code).inc()
    body = {"error": {"code": exc.code, "message": exc.message}, "request_id": request_id}
    return JSONResponse(body, status_code=exc.http_status, headers=exc.headers)


# ---------------------------------------------------------------------------------------------
# ASGI middleware


class RequestContextMiddleware:
    """Request id, the body-size limit while reading, and the request-duration histogram."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        supplied = headers.get("x-request-id", "")
        request_id = supplied if _REQUEST_ID_PATTERN.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        limit = self.state.settings.max_upload_bytes
        path = scope.get("path", "")
        received = 0
        status_holder = {"status": 500}
        started = time.perf_counter()

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request" and path == PREDICT_PATH:
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge("the request body exceeds {} bytes".format(limit))
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["started"] = 1
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                # nosniff: a browser never reads an error's JSON (which may quote client input) as HTML.
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", request_id.encode()),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when the drain timeout ends: answer the JSON
            # 503 with the request id (not uvicorn's plain-text 500), then let the task end.
            if status_holder.get("started"):
                raise
            logger.warning("request cut by the shutdown timeout")
            answer = error_response(self.state, ShuttingDown(), request_id)
            await answer(scope, limited_receive, send_with_id)
        finally:
            request_id_var.reset(token)
            endpoint = _endpoint_label(path)
            if endpoint != "/metrics":
                self.state.metrics.request_duration.labels(endpoint=endpoint, status=str(status_holder["status"])).observe(
                    time.perf_counter() - started
                )


_KNOWN_ENDPOINTS = {PREDICT_PATH, "/v1/model", "/healthz", "/readyz", "/metrics", "/"}


def _endpoint_label(path: str) -> str:
    if path in _KNOWN_ENDPOINTS:
        return path
    if path.startswith("/static/"):
        return "/static"
    return "other"


# ---------------------------------------------------------------------------------------------
# The app

_ERROR_RESPONSES: Dict[int, Dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "unauthorized: missing or wrong API key"),
        (413, "payload_too_large: the body exceeds ANEMIA_MAX_UPLOAD_BYTES"),
        (415, "unsupported_image: not a decodable PNG, JPEG, WebP or BMP"),
        (422, "image_too_large, invalid_roi or invalid_request"),
        (500, "inference_failed"),
        (503, "not_ready or overloaded; see Retry-After"),
    )
}

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG, JPEG, WebP or BMP. A PNG with a transparent background "
                            "uses its alpha channel as the conjunctiva outline.",
                        },
                        "roi": {
                            "type": "string",
                            "description": 'Optional JSON: {"polygon": [[x, y], ...]} (3 or more points) or '
                            '{"bbox": [x, y, w, h]}, in pixels of the uploaded image.',
                            "example": '{"polygon": [[40, 60], [300, 50], [310, 120], [50, 130]]}',
                        },
                    },
                },
                "encoding": {"image": {"contentType": "image/png, image/jpeg, image/webp, image/bmp"}},
            },
            # The picture as the whole body: cheaper than multipart for clients that can send it.
            **{
                media_type: {"schema": {"type": "string", "format": "binary", "description": "the picture itself"}}
                for media_type in ("image/png", "image/jpeg")
            },
        },
    },
    "parameters": [
        {
            "name": "roi",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "With an image/* body only: the ROI JSON, as the multipart 'roi' field.",
        }
    ],
}


def create_app(settings: Settings, factory: Optional[BackendFactory] = None, state: Optional[ServiceState] = None) -> FastAPI:
    """Build the app. Model and engine are checked here, before any port is bound."""
    state = state or build_state(settings, factory)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="Anemia screening",
        version=__version__,
        description="Probability of anemia (Hb < 11 g/dL) from a photo of a child's palpebral conjunctiva. "
        "A screening aid: confirm with a hemoglobin test.",
        lifespan=lifespan,
    )
    app.state.svc = state

    def request_id_of(request: Request) -> str:
        return str(request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex)

    async def require_api_key(request: Request) -> None:  # async: no thread-pool hop per request
        check_api_key(settings, request.headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(state, exc, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(state, InvalidRequest(str(exc.errors())[:500]), request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ServiceError(str(exc.detail), headers=getattr(exc, "headers", None))
        error.http_status = exc.status_code
        error.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(state, error, request_id_of(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(state, ServiceError("internal error"), request_id_of(request))

    @app.post(
        PREDICT_PATH,
        response_model=Prediction,
        responses=_ERROR_RESPONSES,  # type: ignore[arg-type]
        openapi_extra=_PREDICT_BODY,
        summary="Screen one conjunctiva photo for anemia",
        dependencies=[Depends(require_api_key)],
    )
    async def predict_route(request: Request) -> Prediction:
        return await predict(state, request, request_id_of(request))

    @app.get("/v1/model", response_model=ModelDescription, responses={401: _ERROR_RESPONSES[401]}, dependencies=[Depends(require_api_key)])
    async def model_route(request: Request) -> JSONResponse:
        return JSONResponse(describe_model(state))

    @app.get("/healthz", response_model=Status)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}})
    async def readyz(request: Request) -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready"})
        detail = "shutting down" if state.shutting_down else ("warm-up failed" if state.batcher.failure else "warming up")
        return error_response(None, NotReady("not ready: {}".format(detail)), request_id_of(request))

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route(request: Request) -> Response:
        check_metrics_token(settings, request.headers)
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    if (STATIC_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(str(STATIC_DIR / "index.html"), headers={"Cache-Control": "no-cache"})

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, state=state)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory: ``uvicorn --factory service.app:app_from_env``."""
    from service.config import load_settings
    from service.logging_setup import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings)
