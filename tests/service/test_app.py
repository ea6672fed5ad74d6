"""Every endpoint and every error code, against the real app on the ONNX Runtime backend."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import ServiceState, build_state, create_app, prepare_request
from service.config import Settings, load_settings
from service.errors import InvalidRoi
from service.model_info import ModelInfo
from service.preprocess import PreprocessLimits, parse_roi_json, preprocess_roi
from service.startup import backend_factory, resolve_engine
from service.runtime.base import InferenceBackend
from service.schemas import ModelDescription
from tests.backends import InstrumentedBackend
from tests.support import post_image, wait_ready
from tests.images import bomb_png, conjunctiva_rgba, encode, rgb_photo
from tests.model_factory import make_test_model, screening_metadata

POLYGON = json.dumps({"polygon": [[40, 30], [280, 40], [270, 200], [50, 190]]})


def reference_probability(settings: Settings, data: bytes, roi_text: Optional[str] = None) -> float:
    """What the model says for this picture, computed without the server."""
    model = ModelInfo.from_onnx(settings.model)
    backend = backend_factory(settings, resolve_engine(settings, model))()
    try:
        tensor = preprocess_roi(data, parse_roi_json(roi_text), model.spec, PreprocessLimits(min_roi_pixels=1)).tensor
        return float(backend.infer(tensor)[0])
    finally:
        backend.close()


def metric_value(text: str, name: str, labels: str = "") -> float:
    prefix = name + ("{" + labels + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0


def instrumented_app(settings: Settings, **kwargs: Any) -> Any:
    holder: Dict[str, InstrumentedBackend] = {}
    model = ModelInfo.from_onnx(settings.model)
    real_factory = backend_factory(settings, resolve_engine(settings, model))

    def factory(worker: int = 0) -> InstrumentedBackend:
        # "backend": the last one opened (the only one with one engine worker); "worker N": each
        holder["backend"] = holder["worker {}".format(worker)] = InstrumentedBackend(real_factory(worker), **kwargs)
        return holder["backend"]

    return create_app(settings, factory=factory), holder


# -- success paths ------------------------------------------------------------------------------


def test_predict_on_a_transparent_crop(client: Any, make_settings: Callable[..., Settings], crop_png: bytes) -> None:
    response = post_image(client, crop_png)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["anemia_probability"] == pytest.approx(reference_probability(make_settings(), crop_png), abs=1e-6)
    assert body["label"] == ("anemic" if body["anemia_probability"] >= body["threshold"] else "non-anemic")
    assert body["roi"]["source"] == "alpha"
    assert body["precision"] == "fp32" and body["backend"] == "onnxruntime"
    assert body["model"]["name"] == "anemia-test-model" and len(body["model"]["sha256"]) == 64
    assert set(body["latency_ms"]) == {"decode", "preprocess", "queue", "inference", "total"}
    assert body["latency_ms"]["total"] >= body["latency_ms"]["inference"] > 0
    assert response.headers["x-request-id"] == body["request_id"]


class OutOfRangeBackend(InferenceBackend):
    """Answers a probability above 1, which the Prediction schema does not allow."""

    name = "onnxruntime"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.full(len(batch), 1.5, np.float32)

    def close(self) -> None:
        pass


def test_the_answer_is_checked_against_the_prediction_schema(make_settings: Callable[..., Settings], crop_png: bytes) -> None:
    with TestClient(create_app(make_settings(), factory=lambda worker: OutOfRangeBackend()), raise_server_exceptions=False) as client:
        wait_ready(client)
        response = post_image(client, crop_png)
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
        assert client.get("/healthz").status_code == 200  # the server keeps serving
        schema = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["responses"]["200"]
    assert schema["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Prediction"}


def test_predict_with_polygon_and_bbox_on_a_jpeg(client: Any, make_settings: Callable[..., Settings], photo_jpeg: bytes) -> None:
    polygon = post_image(client, photo_jpeg, POLYGON).json()
    assert polygon["roi"]["source"] == "polygon"
    assert polygon["anemia_probability"] == pytest.approx(reference_probability(make_settings(), photo_jpeg, POLYGON), abs=1e-6)
    bbox = post_image(client, photo_jpeg, json.dumps({"bbox": [10, 10, 100, 80]})).json()
    assert bbox["roi"] == {"source": "bbox", "bbox": [10, 10, 100, 80], "pixels": 8000}
    full = post_image(client, photo_jpeg).json()
    assert full["roi"]["source"] == "full" and full["roi"]["pixels"] == 320 * 240


def test_threshold_override_changes_the_label(make_settings: Callable[..., Settings], crop_png: bytes) -> None:
    for threshold, label in ((0.0, "anemic"), (1.0, "non-anemic")):
        with TestClient(create_app(make_settings(threshold=threshold))) as client:
            wait_ready(client)
            body = post_image(client, crop_png).json()
        assert body["threshold"] == threshold and body["label"] == label


def test_client_request_id_is_echoed(client: Any, crop_png: bytes) -> None:
    response = post_image(client, crop_png, headers={"X-Request-ID": "tablet-42.7"})
    assert response.json()["request_id"] == "tablet-42.7" and response.headers["x-request-id"] == "tablet-42.7"
    hostile = post_image(client, crop_png, headers={"X-Request-ID": "bad id\n<script>"})
    assert hostile.json()["request_id"] != "bad id\n<script>" and len(hostile.json()["request_id"]) == 32


def test_model_endpoint_shows_metadata_and_engine(client: Any, make_settings: Callable[..., Settings]) -> None:
    body = client.get("/v1/model").json()
    assert body["name"] == "anemia-test-model" and body["threshold"] == 0.5
    assert body["preprocess"]["input_size"] == 224 and body["preprocess"]["resize_mode"] == "letterbox"
    assert body["engine"]["precision"] == "fp32" and body["engine"]["backend"] == "onnxruntime"
    assert body["engine"]["model_sha256"] == body["sha256"] == ModelInfo.from_onnx(make_settings().model).sha256
    assert body["metadata"]["preprocess.mean"] == [127.5, 127.5, 127.5]


def test_model_endpoint_says_how_the_cores_are_split(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service import thread_budget

    caplog.set_level(logging.INFO, logger="service.app")
    monkeypatch.setattr(thread_budget.os, "sched_getaffinity", lambda pid: {0, 1})
    with TestClient(create_app(make_settings(preprocess_threads=3))) as client:
        wait_ready(client)
        threads = ModelDescription.model_validate(client.get("/v1/model").json()).threads
        assert threads is not None and threads.cores == 2 and threads.engine == "cpu"
        # FP32 on 2 cores: two single-thread engine workers, worker 0 with the idle session
        assert threads.engine_workers == 2 and threads.sources["engine_workers"] == "machine"
        assert "2 single-thread engine call(s)" in threads.reasons["engine_workers"]
        assert (threads.load_intra_op_threads, threads.idle_intra_op_threads, threads.preprocess_threads) == (1, 2, 3)
        assert threads.sources["preprocess_threads"] == "ANEMIA_PREPROCESS_THREADS"
        assert threads.sources["intra_op_threads"] == "machine"
        # warm-up timed both sessions and decided
        assert threads.idle_session in (True, False) and set(threads.warmup_ms) == {"load_session_ms", "idle_session_ms"}
        state = client.app.state.svc
        assert state.executor._max_workers == 3 and state.batcher.workers == 2
        assert {t.name for t in state.batcher._threads} == {"inference-0", "inference-1"}
    logged = next(r for r in caplog.records if r.getMessage() == "thread plan")
    assert logged.threads["engine_workers"] == 2 and logged.threads["reasons"]["engine_workers"]  # type: ignore[attr-defined]


def test_engine_workers_setting_reaches_the_batcher(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(engine_workers=3))) as client:
        wait_ready(client)
        threads = client.get("/v1/model").json()["threads"]
        assert threads["engine_workers"] == 3 and threads["sources"]["engine_workers"] == "ANEMIA_ENGINE_WORKERS"
        assert client.app.state.svc.batcher.workers == 3
        pictures = [encode(conjunctiva_rgba(seed=i)) for i in range(6)]
        assert all(post_image(client, picture).status_code == 200 for picture in pictures)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_worker_tells_the_backend_how_many_requests_wait(make_settings: Callable[..., Settings], crop_png: bytes, workers: int) -> None:
    app, holder = instrumented_app(make_settings(engine_workers=workers))
    with TestClient(app) as client:
        wait_ready(client)
        served_before = {index: len(holder["worker {}".format(index)].batch_sizes) for index in range(workers)}
        assert post_image(client, crop_png).status_code == 200
    first = holder["worker 0"]
    assert first.waiting_seen[-1] == 0  # a lone request: nothing queued or being prepared, no other call running
    # ... and it went to worker 0, whose backend holds the idle session
    assert len(first.batch_sizes) == served_before[0] + 1
    assert all(len(holder["worker {}".format(i)].batch_sizes) == served_before[i] for i in range(1, workers))


def test_model_endpoint_says_no_operating_point_is_known_for_a_model_without_one(client: Any) -> None:
    body = client.get("/v1/model").json()
    ModelDescription.model_validate(body)
    assert body["operating_point"]["known"] is False and body["operating_point"]["applies"] is False
    assert "not known" in body["operating_point"]["note"]
    assert body["calibration"]["known"] is False


def test_model_endpoint_returns_the_operating_point_and_calibration(tmp_path: Path, crop_png: bytes) -> None:
    model = make_test_model(tmp_path / "screen.onnx", extra_metadata=screening_metadata(0.41))
    settings = load_settings(model=model, engine_dir=tmp_path / "engines", auto_build=True, intra_op_threads=1)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        body = client.get("/v1/model").json()
        prediction = post_image(client, crop_png).json()
    ModelDescription.model_validate(body)
    point = body["operating_point"]
    assert point["known"] is True and point["applies"] is True and point["threshold"] == body["threshold"] == 0.41
    assert point["sensitivity"] == {"value": 0.9, "ci_low": 0.82, "ci_high": 0.95}
    assert point["specificity"]["value"] == 0.48 and "cluster bootstrap" in point["interval"]
    assert body["calibration"]["known"] is True and body["calibration"]["slope"] == 0.43
    # predict is unchanged: the label is judged at the threshold it reports
    assert set(prediction) == {"request_id", "anemia_probability", "label", "threshold", "precision", "backend", "model", "roi", "latency_ms"}
    assert prediction["threshold"] == 0.41
    assert prediction["label"] == ("anemic" if prediction["anemia_probability"] >= 0.41 else "non-anemic")

    overridden = settings.model_copy(update={"threshold": 0.2})
    with TestClient(create_app(overridden)) as client:
        wait_ready(client)
        body = client.get("/v1/model").json()
    assert body["threshold"] == 0.2  # what the server judges at
    assert body["operating_point"]["threshold"] == 0.41  # what was measured
    assert body["operating_point"]["applies"] is False and "ANEMIA_THRESHOLD=0.2" in body["operating_point"]["note"]

    quantized = settings.model_copy(update={"precision": "fp16"})
    with TestClient(create_app(quantized)) as client:
        wait_ready(client)
        body = client.get("/v1/model").json()
    assert body["precision"] == "fp16" and body["operating_point"]["applies"] is False
    assert "FP16 engine" in body["operating_point"]["note"]


def test_health_and_openapi(client: Any) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["image"] and set(body["properties"]) == {"image", "roi"}
    assert client.get("/docs").status_code == 200


# -- readiness ----------------------------------------------------------------------------------


def test_readiness_turns_200_only_after_warm_up(make_settings: Callable[..., Settings], crop_png: bytes) -> None:
    gate = threading.Event()
    app, holder = instrumented_app(make_settings(), gate=gate)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        assert "anemia_ready 0.0" in client.get("/metrics").text
        early = post_image(client, crop_png)
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        assert early.headers["retry-after"] == "1"
        gate.set()
        wait_ready(client)
        assert "anemia_ready 1.0" in client.get("/metrics").text
        assert post_image(client, crop_png).status_code == 200
    workers = [backend for key, backend in holder.items() if key.startswith("worker ")]
    assert len(workers) == app.state.svc.batcher.workers and all(b.closed for b in workers)  # shutdown released every backend


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, roi, status, code",
    [
        (b"", None, 415, "unsupported_image"),
        (b"just some text", None, 415, "unsupported_image"),
        (encode(rgb_photo())[:150], None, 415, "unsupported_image"),
        (bomb_png(), None, 422, "image_too_large"),
        (encode(rgb_photo()), '{"polygon": [[900, 900], [950, 900], [950, 950]]}', 422, "invalid_roi"),
        (encode(rgb_photo()), '{"polygon": [[1, 1], [2, 2]]}', 422, "invalid_roi"),
        (encode(rgb_photo()), "{oops", 422, "invalid_roi"),
        (encode(rgb_photo()), '{"bbox": [0, 0, 3, 3]}', 422, "invalid_roi"),
    ],
    ids=["zero-bytes", "text", "truncated-png", "bomb", "polygon-outside", "two-points", "bad-json", "tiny-bbox"],
)
def test_bad_input_gets_a_specific_error(client: Any, data: bytes, roi: Optional[str], status: int, code: str) -> None:
    before = metric_value(client.get("/metrics").text, "anemia_errors_total", 'code="{}"'.format(code))
    response = post_image(client, data, roi)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"] and body["request_id"]
    after = metric_value(client.get("/metrics").text, "anemia_errors_total", 'code="{}"'.format(code))
    assert after == before + 1
    assert post_image(client, encode(conjunctiva_rgba())).status_code == 200  # still serving


def test_form_problems_are_invalid_request(client: Any, crop_png: bytes) -> None:
    no_image = client.post("/v1/predict", files={"picture": ("a.png", crop_png, "image/png")})
    assert no_image.status_code == 422 and no_image.json()["error"]["code"] == "invalid_request"
    twice = client.post(
        "/v1/predict", files=[("image", ("a.png", crop_png, "image/png")), ("image", ("b.png", crop_png, "image/png"))]
    )
    assert twice.status_code == 422 and "exactly one" in twice.json()["error"]["message"]
    as_text = client.post("/v1/predict", data={"image": "not a file"})
    assert as_text.status_code == 422 and as_text.json()["error"]["code"] == "invalid_request"
    json_body = client.post("/v1/predict", json={"image": "abc"})
    assert json_body.status_code == 422 and "multipart" in json_body.json()["error"]["message"]


def test_body_over_the_limit_by_content_length(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(max_upload_bytes=2000))) as client:
        wait_ready(client)
        response = post_image(client, encode(rgb_photo()))  # ~230 kB
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_body_over_the_limit_while_streaming(make_settings: Callable[..., Settings]) -> None:
    """Chunked upload, no Content-Length: the limit is enforced while reading."""
    chunks_sent: List[int] = []

    def body() -> Iterator[bytes]:
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for index in range(1000):
            chunks_sent.append(index)
            yield b"\0" * 1024

    with TestClient(create_app(make_settings(max_upload_bytes=10_000))) as client:
        wait_ready(client)
        response = client.post("/v1/predict", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_api_key(make_settings: Callable[..., Settings], crop_png: bytes) -> None:
    with TestClient(create_app(make_settings(api_key="s3cret-key", metrics_token="m3trics-token"))) as client:
        wait_ready(client)
        missing = post_image(client, crop_png)
        wrong = post_image(client, crop_png, headers={"X-API-Key": "s3cret-kez"})
        assert missing.status_code == wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "unauthorized"
        assert client.get("/v1/model").status_code == 401
        assert post_image(client, crop_png, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert post_image(client, crop_png, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert client.get("/v1/model", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        # Health stays open for probes; /metrics wants its own token (not the API key).
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-key"}).status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer m3trics-token"}).status_code == 200


def test_metrics_closed_when_a_key_is_set_without_a_metrics_token(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(api_key="s3cret-key"))) as client:
        wait_ready(client)
        refused = client.get("/metrics", headers={"Authorization": "Bearer s3cret-key"})
        assert refused.status_code == 401 and "ANEMIA_METRICS_TOKEN" in refused.json()["error"]["message"]


def test_media_type_is_matched_case_insensitively(client: Any, crop_png: bytes) -> None:
    boundary = "XyZ"
    body = (
        "--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n".format(b=boundary).encode()
        + crop_png
        + "\r\n--{b}--\r\n".format(b=boundary).encode()
    )
    response = client.post("/v1/predict", content=body, headers={"Content-Type": "Multipart/Form-Data; Boundary={}".format(boundary)})
    assert response.status_code == 200, response.text


def test_truncated_multipart_is_invalid_request(client: Any, crop_png: bytes) -> None:
    body = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n" + crop_png
    response = client.post("/v1/predict", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 422 and "truncated" in response.json()["error"]["message"]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll ``condition`` on the event loop; fail (never hang) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in {} s".format(timeout_s)
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("workers", [1, 2])
def test_overloaded_when_too_many_in_flight(make_settings: Callable[..., Settings], crop_png: bytes, workers: int) -> None:
    """Admitted requests that hold the queue and every worker's running batch turn the next one away with 503."""
    gate = threading.Event()
    gate.set()  # warm-up runs freely
    # One image per call and a queue of one: one request in each worker's backend, one queued.
    app, holder = instrumented_app(make_settings(batching="off", queue_size=1, engine_workers=workers), gate=gate)
    state: ServiceState = app.state.svc
    pictures = [encode(conjunctiva_rgba(seed=i)) for i in range(workers + 1)]

    def held() -> int:
        return sum(holder["worker {}".format(index)].held for index in range(workers))

    async def scenario() -> None:
        await state.start()
        try:
            while not state.ready:
                await asyncio.sleep(0.01)
            assert state.batcher.workers == workers and state.max_in_flight == workers + 1
            gate.clear()  # the backends now hold whatever reaches them
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                # each must be held in a backend before the next is sent: sent together, the last
                # can find the one-slot queue still full and be turned away itself
                admitted = []
                for index, picture in enumerate(pictures):
                    admitted.append(asyncio.ensure_future(http.post("/v1/predict", files={"image": ("a.png", picture, "image/png")})))
                    if index < workers:
                        await wait_until(lambda: held() == index + 1)
                await wait_until(lambda: state.in_flight == workers + 1 and state.preparing == 0)
                assert "anemia_requests_in_flight {}.0".format(workers + 1) in (await http.get("/metrics")).text
                turned_away = await http.post("/v1/predict", files={"image": ("a.png", crop_png, "image/png")})
                gate.set()
                answered = await asyncio.gather(*admitted)
                after = (await http.get("/metrics")).text
            assert turned_away.status_code == 503 and turned_away.json()["error"]["code"] == "overloaded"
            assert turned_away.headers["retry-after"] == "1"
            assert [r.status_code for r in answered] == [200] * (workers + 1)
            assert "anemia_requests_in_flight 0.0" in after and state.in_flight == 0 and state.preparing == 0
        finally:
            gate.set()
            await state.stop()

    asyncio.run(scenario())


def test_backend_failure_answers_500_and_the_worker_survives(make_settings: Callable[..., Settings], crop_png: bytes) -> None:
    # Fail only on the brightest (all-white) picture; warm-up's zeros pass.
    app, _ = instrumented_app(make_settings(), fail_if=lambda batch: float(batch.max()) >= 0.999 and float(batch.min()) >= 0.999)
    white = encode(np.full((60, 60, 3), 255, dtype=np.uint8))
    with TestClient(app) as client:
        wait_ready(client)
        failed = post_image(client, white)
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "inference_failed"
        assert post_image(client, crop_png).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_unknown_route_and_method(client: Any) -> None:
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    assert client.get("/v1/predict").json()["error"]["code"] == "method_not_allowed"


def test_cors_only_for_configured_origins(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(cors_origins="http://tablet.local"))) as client:
        allowed = client.options(
            "/v1/predict", headers={"Origin": "http://tablet.local", "Access-Control-Request-Method": "POST"}
        )
        other = client.options("/v1/predict", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert allowed.headers.get("access-control-allow-origin") == "http://tablet.local"
    assert "access-control-allow-origin" not in other.headers


def test_logs_carry_request_id_but_no_image_or_roi(client: Any, photo_jpeg: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    response = post_image(client, photo_jpeg, POLYGON, headers={"X-Request-ID": "rid-123"})
    assert response.status_code == 200
    records = [r for r in caplog.records if r.name.startswith("service")]
    assert any(r.getMessage() == "prediction" for r in records)
    from service.logging_setup import JsonFormatter

    lines = [JsonFormatter().format(r) for r in records]
    assert any('"request_id": "rid-123"' in line for line in lines)
    assert not any("280" in line and "270" in line for line in lines)  # polygon coordinates
    assert not any("JFIF" in line or "\\xff\\xd8" in line for line in lines)


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_increment_per_prediction(client: Any, crop_png: bytes) -> None:
    before = client.get("/metrics").text
    body = post_image(client, crop_png).json()
    after = client.get("/metrics").text
    label = 'label="{}"'.format(body["label"])
    assert metric_value(after, "anemia_predictions_total", label) == metric_value(before, "anemia_predictions_total", label) + 1
    for stage in ("decode", "preprocess", "queue", "inference"):
        labels = 'stage="{}"'.format(stage)
        assert metric_value(after, "anemia_stage_duration_seconds_count", labels) == (
            metric_value(before, "anemia_stage_duration_seconds_count", labels) + 1
        )
    request_labels = 'endpoint="/v1/predict",status="200"'
    assert metric_value(after, "anemia_request_duration_seconds_count", request_labels) == (
        metric_value(before, "anemia_request_duration_seconds_count", request_labels) + 1
    )
    assert metric_value(after, "anemia_batch_size_count") >= metric_value(before, "anemia_batch_size_count") + 1
    assert 'anemia_model_info{backend="onnxruntime",model_sha256="' in after
    assert "anemia_queue_depth 0.0" in after and "anemia_requests_in_flight 0.0" in after


# -- micro-batching -----------------------------------------------------------------------------


def test_concurrent_requests_are_batched_with_identical_results(make_settings: Callable[..., Settings]) -> None:
    pictures = [encode(conjunctiva_rgba(seed=i, red=120 + 8 * i)) for i in range(16)]
    settings = make_settings(max_batch=8, batch_wait_ms=20, engine_workers=1)  # one backend to count calls on
    app, holder = instrumented_app(settings, delay_seconds=0.03)
    state: ServiceState = app.state.svc

    async def scenario() -> List[float]:
        await state.start()
        try:
            while not state.ready:
                await asyncio.sleep(0.01)
            warmup_calls = len(holder["backend"].batch_sizes)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                responses = await asyncio.gather(
                    *(http.post("/v1/predict", files={"image": ("a.png", p, "image/png")}) for p in pictures)
                )
            calls = holder["backend"].batch_sizes[warmup_calls:]
            assert sum(calls) == len(pictures)
            assert len(calls) < len(pictures), calls
            assert max(calls) > 1
            return [r.json()["anemia_probability"] for r in responses]
        finally:
            await state.stop()

    batched = asyncio.run(scenario())
    one_by_one = [reference_probability(settings, p) for p in pictures]
    assert np.allclose(batched, one_by_one, atol=1e-5)
    assert len(set(np.round(batched, 6))) > 1  # the pictures really differ


def test_build_state_fails_fast_without_a_model(make_settings: Callable[..., Settings], tmp_path: Any) -> None:
    from service.errors import EngineError

    with pytest.raises(EngineError, match="make train"):
        build_state(make_settings(model=tmp_path / "missing.onnx"))


@pytest.mark.parametrize("kind", ["png16", "gray-jpeg", "webp", "bmp"])
def test_other_encodings_are_served(client: Any, kind: str) -> None:
    photo = rgb_photo(200, 150)
    if kind == "png16":
        data = encode(photo.astype(np.uint16) * 257)
    elif kind == "gray-jpeg":
        data = encode(photo[..., 0], ".jpg")
    else:
        data = encode(photo, "." + kind)
    response = post_image(client, data)
    assert response.status_code == 200, response.text
    assert response.json()["roi"] == {"source": "full", "bbox": [0, 0, 200, 150], "pixels": 30000}


# -- batching decided at warm-up (ANEMIA_BATCHING) ------------------------------------------------


class BatchPenaltyBackend(InstrumentedBackend):
    """The real backend plus 1 ms per image, 2 ms per image inside a batch: batches never pay."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        time.sleep((0.002 if len(batch) > 1 else 0.001) * len(batch))
        return super().infer(batch)


def penalized_app(settings: Settings) -> Any:
    real_factory = backend_factory(settings, resolve_engine(settings, ModelInfo.from_onnx(settings.model)))

    def factory(worker: int = 0) -> InferenceBackend:
        return BatchPenaltyBackend(real_factory(worker))

    return create_app(settings, factory=factory)


@pytest.mark.parametrize("batching, limit", [("auto", 1), ("on", 8), ("off", 1)])
def test_batch_limit_decided_at_warm_up_is_exposed(
    make_settings: Callable[..., Settings], crop_png: bytes, batching: str, limit: int
) -> None:
    settings = make_settings(max_batch=8, queue_size=16, batching=batching)
    with TestClient(penalized_app(settings)) as client:
        wait_ready(client)
        assert metric_value(client.get("/metrics").text, "anemia_batch_limit") == float(limit)
        described = client.get("/v1/model").json()["batching"]
        assert described["mode"] == batching and described["max_batch"] == 8
        assert described["batch_limit"] == limit and described["decided"] is True
        timings = described["warmup_ms_per_image"]
        if batching == "auto":
            assert set(timings) == {"1", "8"} and timings["8"] > timings["1"] >= 1.0
        else:
            assert timings == {}
        svc = client.app.state.svc
        assert svc.max_in_flight == 16 + svc.batcher.workers * limit
        assert post_image(client, crop_png).json()["latency_ms"]["inference"] > 0


# -- one thread-pool hop per request --------------------------------------------------------------


def test_prepare_request_matches_preprocess_roi_and_times_both_stages(make_settings: Callable[..., Settings], photo_jpeg: bytes) -> None:
    spec = ModelInfo.from_onnx(make_settings().model).spec
    limits = PreprocessLimits()
    prepared, decode_seconds, preprocess_seconds = prepare_request(photo_jpeg, POLYGON, spec, limits)
    expected = preprocess_roi(photo_jpeg, parse_roi_json(POLYGON), spec, limits)
    assert np.array_equal(prepared.tensor, expected.tensor) and prepared.roi_source == "polygon"
    assert decode_seconds > 0 and preprocess_seconds > 0
    # The ROI is checked first, as before: a bad ROI on undecodable bytes is still invalid_roi.
    with pytest.raises(InvalidRoi):
        prepare_request(b"not an image", "{oops", spec, limits)


def test_a_prediction_takes_at_most_one_thread_pool_hop(client: Any, crop_png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.app as app_module

    state: ServiceState = client.app.state.svc
    hops: List[str] = []
    original = state.run_blocking

    async def counting(func: Callable[..., Any], *args: Any) -> Any:
        hops.append(func.__name__)
        return await original(func, *args)

    state.run_blocking = counting  # type: ignore[method-assign]
    try:
        # alone with a small picture: prepared on the event loop, no hop
        assert post_image(client, crop_png).status_code == 200
        assert hops == []
        # a picture over the inline limit (or company) goes to the pool: one hop
        monkeypatch.setattr(app_module, "INLINE_PREPARE_MAX_BYTES", len(crop_png) - 1)
        assert post_image(client, crop_png).status_code == 200
    finally:
        state.run_blocking = original  # type: ignore[method-assign]
    assert hops == ["prepare_request"]


def test_the_picture_can_be_the_whole_body(client: Any, crop_png: bytes, photo_jpeg: bytes) -> None:
    multipart = post_image(client, crop_png).json()
    raw = client.post("/v1/predict", content=crop_png, headers={"Content-Type": "image/png"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["anemia_probability"] == multipart["anemia_probability"]
    assert raw.json()["roi"] == multipart["roi"]
    with_roi = client.post("/v1/predict", params={"roi": POLYGON}, content=photo_jpeg, headers={"Content-Type": "Image/JPEG"})
    assert with_roi.status_code == 200 and with_roi.json()["roi"]["source"] == "polygon"
    assert with_roi.json()["anemia_probability"] == post_image(client, photo_jpeg, roi=POLYGON).json()["anemia_probability"]
    garbage = client.post("/v1/predict", content=b"not a picture", headers={"Content-Type": "image/png"})
    assert garbage.status_code == 415 and garbage.json()["error"]["code"] == "unsupported_image"
    two = client.post("/v1/predict?roi=%7B%7D&roi=%7B%7D", content=crop_png, headers={"Content-Type": "image/png"})
    assert two.status_code == 422 and "at most one" in two.json()["error"]["message"]


def test_a_raw_body_over_the_limit_is_refused(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(max_upload_bytes=1000))) as client:
        wait_ready(client)
        response = client.post("/v1/predict", content=b"\x89PNG" + b"\0" * 5000, headers={"Content-Type": "image/png"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
