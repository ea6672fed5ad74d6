"""API key, CORS, headers and logs of a real uvicorn process, read from its stderr."""

from __future__ import annotations

import json
from typing import Dict, Iterator, List, Optional

import httpx
import numpy as np
import pytest

from tests.images import conjunctiva_rgba, encode, png_chunk
from tests.reliability.server import LAUNCHER_MODULE, ServerProcess

KEY = "k3y-for-tests-only"
METRICS_TOKEN = "m3trics-for-tests-only"
ORIGIN = "http://tablet.clinic.local"
SECRET_TEXT = b"patient-Jane-Doe-1987"
# Coordinates nobody else would log by chance.
POLYGON = {"polygon": [[31.4159, 12.7182], [211.4142, 17.3205], [205.5555, 77.7777], [29.9792, 80.6626]]}


def png_with_text(text: bytes) -> bytes:
    """A valid PNG carrying a tEXt chunk: the metadata a phone might embed (a name, a place)."""
    data = encode(conjunctiva_rgba())
    end = data.rindex(b"IEND") - 4
    return data[:end] + png_chunk(b"tEXt", b"Comment\x00" + text) + data[end:]


@pytest.fixture(scope="module")
def secured(base_env: Dict[str, str]) -> Iterator[ServerProcess]:
    env = dict(base_env)
    env.update(ANEMIA_API_KEY=KEY, ANEMIA_METRICS_TOKEN=METRICS_TOKEN, ANEMIA_CORS_ORIGINS=ORIGIN, RELIABILITY_FAIL_WHITE="1")
    with ServerProcess(env, module=LAUNCHER_MODULE) as process:
        yield process


def predict(server: ServerProcess, image: bytes, roi: object = None, headers: Optional[Dict[str, str]] = None) -> httpx.Response:
    data = {"roi": json.dumps(roi) if not isinstance(roi, str) else roi} if roi is not None else None
    return httpx.post(server.url + "/v1/predict", files={"image": ("a.png", image, "image/png")}, data=data, headers=headers, timeout=30)


def test_api_key_is_required_for_predictions_and_the_model(secured: ServerProcess) -> None:
    image = png_with_text(SECRET_TEXT)
    assert predict(secured, image).status_code == 401
    wrong = predict(secured, image, headers={"X-API-Key": KEY[:-1] + "X"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    assert predict(secured, image, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(secured.url + "/v1/model").status_code == 401
    assert predict(secured, image, headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(secured.url + "/v1/model", headers={"Authorization": "Bearer " + KEY}).status_code == 200
    # Probes stay open; /metrics wants its own token once a key is set (test_edge.py checks it).
    for path in ("/healthz", "/readyz"):
        assert httpx.get(secured.url + path).status_code == 200
    assert httpx.get(secured.url + "/metrics").status_code == 401


def test_cors_answers_only_the_configured_origin(secured: ServerProcess) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    allowed = httpx.options(secured.url + "/v1/predict", headers=dict(preflight, Origin=ORIGIN))
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers  # the key travels in a header, not a cookie
    evil = httpx.options(secured.url + "/v1/predict", headers=dict(preflight, Origin="http://evil.example"))
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    simple = httpx.get(secured.url + "/healthz", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in simple.headers
    real = predict(secured, encode(conjunctiva_rgba()), headers={"X-API-Key": KEY, "Origin": ORIGIN})
    assert real.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in real.headers["access-control-expose-headers"].lower()


def test_every_response_carries_a_request_id_and_only_the_needed_headers(secured: ServerProcess) -> None:
    key = {"X-API-Key": KEY}
    answers: List[httpx.Response] = [
        predict(secured, encode(conjunctiva_rgba()), headers=key),  # 200
        predict(secured, b"GIF89a", headers=key),  # 415
        predict(secured, encode(conjunctiva_rgba()), roi="{", headers=key),  # 422
        predict(secured, encode(conjunctiva_rgba())),  # 401
        httpx.post(secured.url + "/v1/predict", content=b"\0" * (11 << 20), headers=dict(key, **{"Content-Type": "multipart/form-data; boundary=b"})),
        httpx.get(secured.url + "/nope"),  # 404
        httpx.get(secured.url + "/v1/predict"),  # 405
        httpx.get(secured.url + "/healthz"),
        httpx.get(secured.url + "/readyz"),
        httpx.get(secured.url + "/metrics", headers={"Authorization": "Bearer " + METRICS_TOKEN}),
        httpx.get(secured.url + "/openapi.json"),
        httpx.options(secured.url + "/v1/predict", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}),
    ]
    statuses = [a.status_code for a in answers]
    assert statuses[:7] == [200, 415, 422, 401, 413, 404, 405], statuses
    for answer in answers:
        assert len(answer.headers.get("x-request-id", "")) == 32, (answer.request.url, answer.headers)
        assert answer.headers["x-content-type-options"] == "nosniff"
    json_answer = answers[0]
    # vary: Origin because CORS is on; no "server" header (server_header=False in service/edge.py).
    expected = {"content-type", "content-length", "date", "vary", "x-request-id", "x-content-type-options"}
    assert set(json_answer.headers) == expected, set(json_answer.headers) ^ expected
    assert json_answer.headers["vary"] == "Origin"
    assert json_answer.headers["content-type"] == "application/json"
    assert answers[3].headers.get("www-authenticate") is None or "Bearer" in answers[3].headers["www-authenticate"]


def test_a_failing_batch_answers_500_and_the_worker_keeps_serving(secured: ServerProcess) -> None:
    white = encode(np.full((64, 64, 3), 255, dtype=np.uint8))
    failed = predict(secured, white, headers={"X-API-Key": KEY, "X-Request-ID": "white-1"})
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "inference_failed"
    assert failed.json()["request_id"] == "white-1"
    for _ in range(3):
        assert predict(secured, encode(conjunctiva_rgba()), headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(secured.url + "/readyz").status_code == 200
    (record,) = [r for r in secured.log_records() if r["message"].startswith("batch of")]
    assert record["request_ids"] == ["white-1"] and "injected backend failure" in record["exception"]


def test_logs_have_request_ids_and_no_pixels_text_or_coordinates(secured: ServerProcess) -> None:
    image = png_with_text(SECRET_TEXT)
    ok = predict(secured, image, POLYGON, headers={"X-API-Key": KEY, "X-Request-ID": "log-check-1"})
    assert ok.status_code == 200 and ok.json()["roi"]["source"] == "alpha"
    photo = encode(np.random.default_rng(3).integers(0, 256, (120, 240, 3), dtype=np.uint8))
    assert predict(secured, photo, POLYGON, headers={"X-API-Key": KEY, "X-Request-ID": "log-check-2"}).status_code == 200
    bad = '{"polygon": [[61.8034, 14.1421], [NaN, 1], [99.9991, 44.4441]]}'
    assert predict(secured, photo, bad, headers={"X-API-Key": KEY, "X-Request-ID": "log-check-3"}).status_code == 422
    records = secured.log_records()  # every line is JSON, or this fails
    assert all("request_id" in r for r in records)
    mine = {r["request_id"] for r in records if r["message"] == "prediction"}
    assert {"log-check-1", "log-check-2"} <= mine
    text = secured.log_text()
    for secret in ("Jane-Doe", "31.4159", "211.4142", "77.7777", "61.8034", "99.9991", "IHDR", "tEXt", "\\x89PNG"):
        assert secret not in text, secret
    # No line is long enough to hold a picture.
    assert max(len(line) for line in text.splitlines()) < 4000
