"""The service's error type: every failure a client can cause maps to one HTTP status and code."""

from __future__ import annotations

from typing import Dict, Optional


class ServiceError(Exception):
    """An error with a machine-readable code, an HTTP status and a message for people."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: Dict[str, str] = dict(headers or {})


class PreprocessError(ServiceError):
    """Raised by decoding and preprocessing; training and evaluation see the same errors."""


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedImage(PreprocessError):
    code = "unsupported_image"
    http_status = 415


class ImageTooLarge(PreprocessError):
    code = "image_too_large"
    http_status = 422


class InvalidRoi(PreprocessError):
    code = "invalid_roi"
    http_status = 422


class InvalidRequest(ServiceError):
    code = "invalid_request"
    http_status = 422


class Unauthorized(ServiceError):
    code = "unauthorized"
    http_status = 401


class NotReady(ServiceError):
    code = "not_ready"
    http_status = 503

    def __init__(self, message: str = "The model is not loaded yet; retry shortly.") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class Overloaded(ServiceError):
    code = "overloaded"
    http_status = 503

    def __init__(self, message: str = "Too many requests in flight; retry shortly.") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class InferenceFailed(ServiceError):
    code = "inference_failed"
    http_status = 500


class EngineError(ServiceError):
    """A startup problem with a model or engine file; the message names the file and the fix."""

    code = "engine_error"
    http_status = 500


class RequestTimeout(ServiceError):
    """The body arrived too slowly (service/upload.py); the connection is closed after the answer."""

    code = "request_timeout"
    http_status = 408

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class ClientGone(ServiceError):
    """The client closed its connection mid-body; nobody reads the answer."""

    code = "client_closed"
    http_status = 400


class ShuttingDown(NotReady):
    """A request still running when the drain timeout ended it."""

    def __init__(self, message: str = "The server is shutting down; retry shortly.") -> None:
        super().__init__(message)
        self.headers["Connection"] = "close"


class TooManyUploads(ServiceError):
    """The memory budget for bodies being read is spent (service/upload.py); not the engine."""

    code = "too_many_uploads"
    http_status = 503

    def __init__(self, message: str = "Too many uploads in progress; retry shortly.") -> None:
        super().__init__(message, headers={"Retry-After": "2", "Connection": "close"})
