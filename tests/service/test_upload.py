"""service/upload.py without a server: multipart from memory, the body deadline, the budget."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Dict, List

import pytest

from service.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, TooManyUploads
from service.upload import BodyBudget, BodyLimits, media_type, parse_multipart, predict_fields, read_body


def form(boundary: str, parts: List[bytes]) -> bytearray:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return bytearray(body + b"--" + boundary.encode() + b"--\r\n")


def test_parts_come_out_whole_even_with_boundary_look_alikes_inside() -> None:
    image = os.urandom(200_000) + b"\r\n--bou" + os.urandom(500) + b"\r\n--boundar" + os.urandom(10)
    body = form("boundary", [
        b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n' + image,
        b'Content-Disposition: form-data; name="roi"\r\n\r\n{"bbox": [0, 0, 9, 9]}',
    ])
    data, roi = predict_fields(parse_multipart(body, "boundary"), body)
    assert data == image and roi == '{"bbox": [0, 0, 9, 9]}'


def test_media_type_and_boundary_ignore_case() -> None:
    assert media_type('Multipart/Form-Data; Boundary="x y"') == ("multipart/form-data", {"boundary": "x y"})


@pytest.mark.parametrize(
    "parts, message",
    [
        ([b'Content-Disposition: form-data; name="x%d"\r\n\r\n1' % i for i in range(9)], "too many form fields"),
        ([b'Content-Disposition: form-data; name="f%d"; filename="f"\r\n\r\n1' % i for i in range(3)], "too many files"),
        ([b'Content-Disposition: form-data; name="roi"\r\n\r\n' + b"1" * (1024 * 1024 + 1)], "exceeds 1024 KB"),
        ([b"Content-Type: text/plain\r\n\r\n1"], "no form-data name"),
    ],
    ids=["fields", "files", "text-field-size", "no-name"],
)
def test_form_limits(parts: List[bytes], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_multipart(form("b", parts), "b")


def test_a_truncated_body_is_refused() -> None:
    body = bytearray(b'--b\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\nabc')
    with pytest.raises(InvalidRequest, match="truncated"):
        parse_multipart(body, "b")


def receiver(chunks: List[bytes], delay_s: float) -> Any:
    queue = list(chunks)

    async def receive() -> Dict[str, Any]:
        await asyncio.sleep(delay_s)
        chunk = queue.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    return receive


def test_a_body_below_the_minimum_rate_is_cut() -> None:
    limits = BodyLimits(max_bytes=1 << 20, grace_s=0.2, min_rate_bytes_per_s=1000, timeout_s=10)
    # 10 bytes every 0.1 s = 100 B/s: the deadline (0.2 s + bytes / 1000 B/s) passes first.
    with pytest.raises(RequestTimeout):
        asyncio.run(read_body(receiver([b"x" * 10] * 50, 0.1), limits))
    # Fast enough: 10 kB per 0.05 s.
    body = asyncio.run(read_body(receiver([b"x" * 10_000] * 5, 0.05), limits))
    assert len(body) == 50_000


def test_a_body_over_its_limit_is_refused() -> None:
    limits = BodyLimits(max_bytes=1000)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(receiver([b"x" * 600, b"x" * 600], 0.0), limits))
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(receiver([b""], 0.0), limits, declared=1001))


def test_the_budget_counts_per_address_and_in_all_and_gives_back() -> None:
    budget = BodyBudget(total_bytes=100, per_client_bytes=60)
    first = budget.hold("10.0.0.1")
    first.grow(50)
    with pytest.raises(TooManyUploads):
        budget.hold("10.0.0.1").grow(20)  # 70 > 60 for this address
    other = budget.hold("10.0.0.2")
    other.grow(50)
    with pytest.raises(TooManyUploads):
        budget.hold("10.0.0.3").grow(1)  # 101 > 100 in all
    first.release()
    other.release()
    assert budget.in_flight_bytes == 0 and budget.per_client == {}
    with budget.hold("10.0.0.1") as again:
        again.grow(60)
    assert budget.in_flight_bytes == 0
