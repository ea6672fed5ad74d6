"""The bad-input corpus against a real uvicorn process: a specific 4xx each, and serving goes on."""

from __future__ import annotations

import select
import socket
import time
from typing import Dict, List, Tuple

import httpx
import pytest

from tests.reliability.corpus import Upload, corpus, photo_jpeg, valid_png
from tests.reliability.server import ServerProcess

CORPUS = corpus()
MIB = 1024 * 1024


def post(server: ServerProcess, upload: Upload) -> Tuple[httpx.Response, float]:
    parts = upload.build()
    started = time.perf_counter()
    response = httpx.post(server.url + "/v1/predict", files=parts, timeout=30.0)
    return response, time.perf_counter() - started


def assert_still_serving(server: ServerProcess) -> None:
    valid = httpx.post(server.url + "/v1/predict", files={"image": ("a.png", valid_png(), "image/png")}, timeout=30.0)
    assert valid.status_code == 200, valid.text
    assert httpx.get(server.url + "/readyz", timeout=5.0).status_code == 200


@pytest.mark.parametrize("upload", CORPUS, ids=[u.name for u in CORPUS])
def test_each_bad_input_gets_its_code_and_serving_goes_on(server: ServerProcess, upload: Upload) -> None:
    response, seconds = post(server, upload)
    assert response.status_code == upload.status, response.text[:500]
    body = response.json()
    assert response.headers["x-request-id"] == body["request_id"]
    if upload.status == 200:
        for key, value in (upload.expect_roi or {}).items():
            assert body["roi"][key] == value
        assert 0.0 <= body["anemia_probability"] <= 1.0
    else:
        assert body["error"]["code"] == upload.code and body["error"]["message"]
        assert len(body["error"]["message"]) <= 1000  # an error never echoes a megabyte back
    # Nothing in the corpus may take long: a 10^6-point polygon is refused, not rasterized.
    assert seconds < 5.0, "{} took {:.2f} s".format(upload.name, seconds)
    assert_still_serving(server)


def test_no_bad_input_reached_the_unexpected_error_handler(server: ServerProcess) -> None:
    for upload in CORPUS[:8]:
        post(server, upload)
    records = server.log_records()
    assert not [r for r in records if r["level"] in ("error", "critical") or "exception" in r]
    assert_still_serving(server)


# -- a body over the limit, sent slowly over a raw socket -------------------------------------


def send_slowly(server: ServerProcess, head: bytes, chunks: List[bytes], pause_seconds: float) -> Tuple[bytes, int]:
    """Send ``head`` then each chunk with a pause; stop as soon as the server answers.

    Returns the first bytes of the answer and how many body bytes had been sent by then.
    """
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10.0) as sock:
        sock.sendall(head)
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], pause_seconds)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.settimeout(10.0)
        answer = b""
        while not complete_response(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer, sent


def complete_response(answer: bytes) -> bool:
    head, separator, body = answer.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def request_head(server: ServerProcess, extra: Dict[str, str]) -> bytes:
    lines = ["POST /v1/predict HTTP/1.1", "Host: 127.0.0.1:{}".format(server.port), "Content-Type: multipart/form-data; boundary=b"]
    lines += ["{}: {}".format(k, v) for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


FIRST_PART = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'


def test_declared_oversize_body_is_refused_before_it_is_sent(server: ServerProcess) -> None:
    declared = 11 * MIB
    chunks = [FIRST_PART] + [b"\0" * (64 * 1024)] * (declared // (64 * 1024))
    started = time.perf_counter()
    answer, sent = send_slowly(server, request_head(server, {"Content-Length": str(declared)}), chunks, 0.02)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer and b"x-request-id" in answer.lower()
    assert sent < 1 * MIB and time.perf_counter() - started < 5.0
    assert_still_serving(server)


def test_chunked_oversize_body_is_refused_while_it_streams(server: ServerProcess) -> None:
    chunk_bytes = 512 * 1024
    body = [FIRST_PART] + [b"\0" * chunk_bytes] * 40  # 20 MiB if the server let it all in

    def chunked(data: bytes) -> bytes:
        return "{:x}\r\n".format(len(data)).encode() + data + b"\r\n"

    answer, sent = send_slowly(server, request_head(server, {"Transfer-Encoding": "chunked"}), [chunked(c) for c in body], 0.01)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer
    # Refused once the 10 MiB limit is crossed, long before the 20 MiB were through.
    assert 10 * MIB <= sent < 14 * MIB, sent
    assert_still_serving(server)


def test_the_service_answers_a_slow_but_honest_upload(server: ServerProcess) -> None:
    """The limit is on size, not speed: a tablet on a poor link still gets its answer."""
    image = photo_jpeg()
    body = FIRST_PART + image + b"\r\n--b--\r\n"
    chunks = [body[i : i + 8192] for i in range(0, len(body), 8192)]
    answer, sent = send_slowly(server, request_head(server, {"Content-Length": str(len(body))}), chunks, 0.01)
    assert sent == len(body) and answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_cmyk_jpeg_decodes_to_the_colours_pillow_shows() -> None:
    import io

    import numpy as np
    from PIL import Image

    from service.preprocess import decode_image
    from tests.reliability.corpus import cmyk_jpeg

    data = cmyk_jpeg()
    ours = decode_image(data).rgb.reshape(-1, 3).mean(axis=0)
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1, 3).mean(axis=0)
    assert np.allclose(ours, pillow, atol=3.0), (ours, pillow)
    assert ours[0] > ours[1] + 50  # reddish, not inverted (Adobe CMYK is stored inverted)
