"""Reading a prediction's body: in memory, against a deadline and a byte budget.

Starlette's ``request.form()`` spools a file part over 1 MiB to a temporary file (pictures would
reach ``/tmp``) and reads with no deadline. Here the body is read into one ``bytearray`` up to
``max_upload_bytes`` (413 beyond), at no less than ``min_body_rate_bytes_per_s`` on average
after ``body_grace_s`` and within ``body_timeout_s`` in all (408 and the connection closed
otherwise), and only then parsed, from memory, by python-multipart's push parser. The route takes
its in-flight slot after this returns (service/app.py), so slow bodies never hold a slot.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, Union

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.config import Settings
from service.errors import ClientGone, InvalidRequest, PayloadTooLarge, RequestTimeout, TooManyUploads

MIB = 1024 * 1024
#: a text field (no filename) larger than this is refused, as Starlette's parser did
MAX_TEXT_FIELD_BYTES = 1 * MIB
MAX_PARTS = 8
MAX_FILE_PARTS = 2

Receive = Callable[[], Awaitable[Dict[str, Any]]]


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    grace_s: float = 5.0
    min_rate_bytes_per_s: float = 16 * 1024
    timeout_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "BodyLimits":
        return cls(
            max_bytes=settings.max_upload_bytes,
            grace_s=settings.body_grace_s,
            min_rate_bytes_per_s=settings.min_body_rate_bytes_per_s,
            timeout_s=settings.body_timeout_s,
        )

    def deadline(self, started: float, received: int) -> float:
        """When the body must be complete given ``received`` bytes so far: a mean rate, capped."""
        return min(started + self.grace_s + received / self.min_rate_bytes_per_s, started + self.timeout_s)


class BodyBudget:
    """Bytes of request bodies held in memory, in all and per client address.

    A body counts from its first byte (its declared Content-Length at once) until the route lets
    it go after decoding; past either budget the request gets 503 ``too_many_uploads``. Without
    it, 40 sockets uploading 2 MiB each at 256 KiB/s grew the server by 125 MB (measured,
    docs/reliability.md).
    """

    def __init__(self, total_bytes: int, per_client_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.per_client_bytes = per_client_bytes
        self.in_flight_bytes = 0
        self.per_client: Dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> "BodyBudget":
        return cls(settings.max_body_bytes_in_flight, settings.max_body_bytes_in_flight_per_client)

    def hold(self, client: Optional[str]) -> "BodyHold":
        return BodyHold(self, client)


class BodyHold:
    """One request's share of a :class:`BodyBudget`; a context manager that always gives it back."""

    def __init__(self, budget: BodyBudget, client: Optional[str]) -> None:
        self.budget = budget
        self.client = client
        self.bytes = 0

    def grow(self, total: int) -> None:
        extra = total - self.bytes
        if extra <= 0:
            return
        budget = self.budget
        if budget.total_bytes and budget.in_flight_bytes + extra > budget.total_bytes:
            raise TooManyUploads()
        mine = budget.per_client.get(self.client, 0) if self.client is not None else 0
        if budget.per_client_bytes and self.client is not None and mine + extra > budget.per_client_bytes:
            raise TooManyUploads("Too many uploads in progress from this address; retry shortly.")
        budget.in_flight_bytes += extra
        if self.client is not None:
            budget.per_client[self.client] = mine + extra
        self.bytes = total

    def release(self) -> None:
        if not self.bytes:
            return
        budget = self.budget
        budget.in_flight_bytes -= self.bytes
        if self.client is not None:
            left = budget.per_client.get(self.client, 0) - self.bytes
            if left > 0:
                budget.per_client[self.client] = left
            else:
                budget.per_client.pop(self.client, None)
        self.bytes = 0

    def __enter__(self) -> "BodyHold":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def declared_length(headers: Any) -> Optional[int]:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidRequest("Content-Length is not a number") from None
    if length < 0:
        raise InvalidRequest("Content-Length is negative")
    return length


async def read_body(receive: Receive, limits: BodyLimits, declared: Optional[int] = None, hold: Optional[BodyHold] = None) -> bytearray:
    """The whole body, in memory; 413 past ``max_bytes``, 408 when it arrives too slowly, 503
    when ``hold``'s budget cannot take it."""
    if declared is not None and declared > limits.max_bytes:
        raise PayloadTooLarge("the request body is {} bytes; at most {} are accepted".format(declared, limits.max_bytes))
    if hold is not None and declared:
        hold.grow(declared)
    started = time.monotonic()
    body = bytearray()
    while True:
        remaining_s = limits.deadline(started, len(body)) - time.monotonic()
        if remaining_s <= 0:
            raise _too_slow(len(body), time.monotonic() - started)
        try:
            message = await asyncio.wait_for(receive(), timeout=remaining_s)
        except asyncio.TimeoutError:
            raise _too_slow(len(body), time.monotonic() - started) from None
        if message["type"] == "http.disconnect":
            raise ClientGone("the client closed the connection before its body arrived")
        body += message.get("body", b"")
        if len(body) > limits.max_bytes:
            raise PayloadTooLarge("the request body exceeds {} bytes".format(limits.max_bytes))
        if hold is not None:
            hold.grow(len(body))
        if not message.get("more_body", False):
            return body  # no copy: a body is held once, then sliced once (parse_multipart)


def _too_slow(received: int, elapsed_s: float) -> RequestTimeout:
    return RequestTimeout("the request body arrived too slowly ({} bytes in {:.1f} s)".format(received, elapsed_s))


@dataclass
class Part:
    """One form part: where its bytes lie in the body (no copy until :meth:`content`)."""

    name: str
    filename: Optional[str]
    content_type: Optional[str]
    # (start, end) in the body, or bytes the parser handed from its own buffer (a boundary
    # look-alike it held back), in order
    pieces: List[Union[Tuple[int, int], bytes]] = field(default_factory=list)
    size: int = 0

    def content(self, body: Union[bytes, bytearray]) -> bytes:
        view = memoryview(body)
        chunks = [piece if isinstance(piece, bytes) else view[piece[0] : piece[1]] for piece in self.pieces]
        if len(chunks) == 1:
            return bytes(chunks[0])
        return b"".join(chunks)


def media_type(content_type: str) -> Tuple[str, Dict[str, str]]:
    """``Multipart/Form-Data; Boundary=x`` -> (``multipart/form-data``, {``boundary``: ``x``})."""
    value, options = parse_options_header(content_type)
    return value.decode("latin-1").lower(), {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in options.items()}


def parse_multipart(body: Union[bytes, bytearray], boundary: str) -> List[Part]:
    """Every part of a ``multipart/form-data`` body, parsed from memory (nothing touches disk).

    The body is written to the parser in one call, so the offsets its callbacks get are offsets
    into ``body``: parts are recorded as spans, and copied out once by :meth:`Part.content`."""
    parts: List[Part] = []
    header_field = bytearray()
    header_value = bytearray()
    headers: Dict[bytes, bytes] = {}
    state: Dict[str, Any] = {"ended": False}

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        disposition, options = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise InvalidRequest("a multipart part has no form-data name")
        filename = options.get(b"filename")
        content_type = headers.get(b"content-type")
        parts.append(
            Part(
                name=options[b"name"].decode("utf-8", errors="replace"),
                filename=filename.decode("utf-8", errors="replace") if filename is not None else None,
                content_type=content_type.decode("latin-1") if content_type is not None else None,
            )
        )
        if len(parts) > MAX_PARTS:
            raise InvalidRequest("too many form fields: at most {}".format(MAX_PARTS))
        if sum(1 for part in parts if part.filename is not None) > MAX_FILE_PARTS:
            raise InvalidRequest("too many files: at most {}".format(MAX_FILE_PARTS))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.pieces.append((start, end) if data is body else bytes(data[start:end]))
        part.size += end - start
        if part.filename is None and part.size > MAX_TEXT_FIELD_BYTES:
            raise InvalidRequest("the text field '{}' exceeds {} KB".format(part.name, MAX_TEXT_FIELD_BYTES // 1024))

    def on_end() -> None:
        state["ended"] = True

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary.encode("latin-1"), callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest("the multipart body could not be parsed: {}".format(exc)) from None
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidRequest("the multipart body could not be parsed: {}".format(exc)) from None
    if not state["ended"]:
        raise InvalidRequest("the multipart body is truncated (no closing boundary)")
    return parts


def predict_fields(parts: List[Part], body: Union[bytes, bytearray]) -> Tuple[bytes, Optional[str]]:
    """The ``image`` file and optional ``roi`` text, with the checks the API documents."""
    images = [part for part in parts if part.name == "image"]
    if not images:
        raise InvalidRequest("the form has no 'image' file field")
    if len(images) > 1:
        raise InvalidRequest("send exactly one 'image' field, got {}".format(len(images)))
    if images[0].filename is None:
        raise InvalidRequest("'image' must be a file upload, not a text field")
    rois = [part for part in parts if part.name == "roi"]
    if len(rois) > 1:
        raise InvalidRequest("send at most one 'roi' field, got {}".format(len(rois)))
    roi_text = rois[0].content(body).decode("utf-8", errors="replace") if rois else None
    return images[0].content(body), roi_text


async def read_predict_upload(
    receive: Receive, headers: Any, limits: BodyLimits, hold: Optional[BodyHold] = None, roi_params: Sequence[str] = ()
) -> Tuple[bytes, Optional[str]]:
    """The picture and optional ROI of ``POST /v1/predict``, read in memory.

    Either multipart/form-data (an ``image`` file and an optional ``roi`` field) or the picture
    itself as the whole body (``Content-Type: image/*``) with the ROI in ``roi_params`` (the
    ``roi`` query parameter): no multipart parsing (docs/benchmarks.md measures both).
    """
    declared = declared_length(headers)
    if declared is not None and declared > limits.max_bytes:
        raise PayloadTooLarge("the request body is {} bytes; at most {} are accepted".format(declared, limits.max_bytes))
    kind, options = media_type(headers.get("content-type", ""))
    if kind.startswith("image/"):
        if len(roi_params) > 1:
            raise InvalidRequest("send at most one 'roi' parameter, got {}".format(len(roi_params)))
        return bytes(await read_body(receive, limits, declared, hold)), (roi_params[0] if roi_params else None)
    if kind != "multipart/form-data":
        raise InvalidRequest("send multipart/form-data with a file field named 'image', or the picture itself with an image/* Content-Type")
    boundary = options.get("boundary")
    if not boundary:
        raise InvalidRequest("the multipart/form-data content type has no boundary")
    body = await read_body(receive, limits, declared, hold)
    return predict_fields(parse_multipart(body, boundary), body)
