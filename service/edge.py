"""The HTTP edge: deadlines and limits on every socket, before a byte reaches the app.

uvicorn's httptools protocol, as shipped, has no header deadline, no cap on header bytes or
count, and no idle deadline for a socket that never sends a request; on a clinic Wi-Fi one
laptop could hold every descriptor or grow the process by gigabytes (docs/reliability.md, "The
HTTP edge"). :class:`EdgeProtocol` is that protocol with, per connection:

- an idle deadline (``idle_timeout_s``): no byte while waiting for a request -> closed;
- a header deadline (``header_timeout_s``): the head (request line + headers) must be complete
  this long after its first byte -> else 408 and closed (slowloris);
- a cap on head bytes and header count (``max_header_bytes``, ``max_header_count``) checked before
  the parser buffers them -> 431 and closed;
- a cap on open connections, in all and per client address, checked when the socket is
  accepted -> an immediate JSON 503 and closed, long before descriptors run out;
- a connection whose response was sent before its request body finished is closed, so a client
  trickling an unread body cannot keep it forever.

The body itself is policed where it is read (service/upload.py: a minimum rate and a deadline),
so the rules also hold under other servers. With TLS, the handshake has its own deadline
(``tls_handshake_timeout_s``) and handshaking sockets count against the same caps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import ssl
from asyncio import sslproto
from collections import Counter
from typing import Any, Callable, Dict, Optional, Tuple, Type

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

logger = logging.getLogger("service.edge")

#: descriptors kept for the process itself (engine, logs, thread pools, the listening socket)
FD_RESERVE = 64

class EdgeLimits:
    """The numbers an :class:`EdgeProtocol` enforces, and the connection counts they share."""

    def __init__(
        self,
        idle_timeout_s: float,
        header_timeout_s: float,
        max_header_bytes: int,
        max_header_count: int,
        max_connections: int,
        max_connections_per_client: int,
        tls_handshake_timeout_s: float = 10.0,
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.max_header_count = max_header_count
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.tls_handshake_timeout_s = tls_handshake_timeout_s
        # Every accepted socket (TLS handshakes included), and per client address.
        self.open_connections = 0
        self.per_client: Counter = Counter()
        self.refused: Counter = Counter()  # reason -> count, for the log and the tests

    @classmethod
    def from_settings(cls, settings: Settings) -> "EdgeLimits":
        return cls(
            idle_timeout_s=settings.idle_timeout_s,
            header_timeout_s=settings.header_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            max_connections=connection_cap(settings.max_connections),
            max_connections_per_client=settings.max_connections_per_client,
            tls_handshake_timeout_s=settings.tls_handshake_timeout_s,
        )

    def admit(self, client: Optional[str]) -> Optional[str]:
        """Count a new socket, or say why it is refused (then it is not counted)."""
        if self.open_connections >= self.max_connections:
            return "connections"
        if self.max_connections_per_client and client is not None and self.per_client[client] >= self.max_connections_per_client:
            return "connections_per_client"
        self.open_connections += 1
        if client is not None:
            self.per_client[client] += 1
        return None

    def release(self, client: Optional[str]) -> None:
        self.open_connections -= 1
        if client is not None:
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]


def connection_cap(configured: int) -> int:
    """``configured``, or (0) the soft descriptor limit minus a reserve: refuse before EMFILE."""
    if configured:
        return configured
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, int(soft) - max(FD_RESERVE, int(soft) // 8))


def _client_of(transport: asyncio.BaseTransport) -> Optional[str]:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return None


def _json_answer(status: int, phrase: str, code: str, message: str, extra: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 answer in the app's error shape, written before any request exists."""
    body = json.dumps({"error": {"code": code, "message": message}, "request_id": None}).encode()
    lines = ["HTTP/1.1 {} {}".format(status, phrase), "content-type: application/json", "content-length: {}".format(len(body))]
    lines += ["{}: {}".format(name, value) for name, value in extra]
    lines += ["x-content-type-options: nosniff", "connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


REFUSED_BUSY = _json_answer(503, "Service Unavailable", "too_many_connections", "Too many open connections; retry shortly.", (("retry-after", "1"),))
HEAD_TIMEOUT = _json_answer(408, "Request Timeout", "request_timeout", "The request head did not arrive in time.")
HEAD_TOO_LARGE = _json_answer(431, "Request Header Fields Too Large", "headers_too_large", "The request head is too large or has too many headers.")


class _HeadTooLarge(Exception):
    pass


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and caps in :class:`EdgeLimits`."""

    limits: EdgeLimits  # bound by :func:`protocol_class`
    counted_by_tls = False  # True when an EdgeTLSProtocol below counted the socket at accept

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsing_head = False  # between the first byte of a request and its last header
        self._body_pending = False  # head parsed, body not complete yet
        self._head_bytes = 0  # bytes fed since the request began (whole chunks)
        self._header_count = 0
        self._parsed_head_bytes = 0  # request target + headers as parsed
        self._head_over_cap = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._counted_client: Optional[str] = None
        self._counted = False
        self._refused = False

    # -- connection lifecycle ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self.counted_by_tls:
            client = _client_of(transport)
            refused = self.limits.admit(client)
            if refused is not None:
                self._refuse(transport, refused)
                return
            self._counted, self._counted_client = True, client
        super().connection_made(transport)
        self._arm(self.limits.idle_timeout_s, self._idle_expired)

    def _refuse(self, transport: asyncio.BaseTransport, reason: str) -> None:
        self._refused = True
        count = self.limits.refused[reason] = self.limits.refused[reason] + 1
        if count in (1, 10, 100, 1000) or count % 10000 == 0:  # a flood must not flood the log
            logger.warning(
                "connection refused",
                extra={"reason": reason, "refused_total": count, "open_connections": self.limits.open_connections},
            )
        try:
            transport.write(REFUSED_BUSY)  # type: ignore[attr-defined]
        finally:
            transport.close()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._refused:
            return
        self._cancel_timer()
        if self._counted:
            self._counted = False
            self.limits.release(self._counted_client)
        super().connection_lost(exc)

    # -- deadlines --------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, callback)

    def _idle_expired(self) -> None:
        self._timer = None
        if not self._parsing_head and not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()

    def _head_expired(self) -> None:
        self._timer = None
        if self._parsing_head and not self.transport.is_closing():
            self.limits.refused["header_timeout"] += 1
            self.transport.write(HEAD_TIMEOUT)
            self.transport.close()

    # -- bytes in ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused or self.parser is None:
            return
        self._unset_keepalive_if_required()
        # A chunk is at most what one read returns (256 KiB), so the head cap is checked after
        # each feed: httptools keeps a partial header as Python bytes (~15x its size, measured),
        # and at most one chunk over the cap is ever buffered.
        if self._feed(data) and self._parsing_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._too_large()

    def _feed(self, data: bytes) -> bool:
        """Parse ``data`` as uvicorn does, with 431 for too many headers; False once closed."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if self._head_over_cap:
                self._too_large()
                return False
            raise
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return not self.transport.is_closing()

    def _too_large(self) -> None:
        self._cancel_timer()
        self._parsing_head = False
        self.limits.refused["headers_too_large"] += 1
        self.transport.write(HEAD_TOO_LARGE)
        self.transport.close()

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # The first byte of a request: its head has header_timeout_s from now.
        self._parsing_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._parsed_head_bytes = 0
        self._arm(self.limits.header_timeout_s, self._head_expired)
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._parsed_head_bytes += len(url)
        self._check_head()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Exact sizes, for a head that arrived whole in one chunk (the chunk count cannot see it).
        self._header_count += 1
        self._parsed_head_bytes += len(name) + len(value) + 4
        self._check_head()
        super().on_header(name, value)

    def _check_head(self) -> None:
        if self._header_count > self.limits.max_header_count or self._parsed_head_bytes > self.limits.max_header_bytes:
            self._head_over_cap = True
            raise _HeadTooLarge()

    def on_headers_complete(self) -> None:
        self._parsing_head = False
        self._body_pending = True
        self._cancel_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and not (self.parser.should_upgrade() and self._should_upgrade()):
            send = cycle.send

            async def send_closing_early(message: Any) -> None:
                # An answer before the body is all in (401, 413, 408) closes the connection; say
                # so in its head, or a keep-alive client would send its next request into a
                # socket about to close.
                if message["type"] == "http.response.start" and self._body_pending and cycle is self.cycle:
                    cycle.keep_alive = False
                await send(message)

            cycle.send = send_closing_early  # type: ignore[method-assign]

    def on_message_complete(self) -> None:
        self._body_pending = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._body_pending and not self.pipeline:
            # Answered before its body finished (an error, a route that ignores bodies): the
            # rest of the body would be parsed into nothing but could keep the socket forever.
            self.server_state.total_requests += 1
            self.transport.close()
            return
        super().on_response_complete()
        # uvicorn armed its keep-alive timer (the same length): the idle deadline owns the wait.
        if not self.transport.is_closing() and not self.pipeline and not self._parsing_head:
            self._unset_keepalive_if_required()
            self._arm(self.limits.idle_timeout_s, self._idle_expired)


class EdgeTLSProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol with a handshake deadline, counted against the connection caps.

    uvicorn hands ``ssl=`` to ``loop.create_server`` without a handshake timeout (asyncio's
    default is 60 s) and its protocol only sees a socket once the handshake is done, so silent
    TLS sockets would hold descriptors unseen. Here the TLS layer is created per socket by the
    protocol factory, so the count starts at accept and the handshake has its own deadline.
    """

    limits: EdgeLimits

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self._edge_client = _client_of(transport)
        refused = self.limits.admit(self._edge_client)
        self._edge_counted = refused is None
        if refused is not None:
            self.limits.refused[refused] += 1
            transport.close()  # nothing can be said before the handshake
            return
        super().connection_made(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if getattr(self, "_edge_counted", False):
            self._edge_counted = False
            self.limits.release(self._edge_client)
            super().connection_lost(exc)  # type: ignore[arg-type]


def protocol_class(limits: EdgeLimits) -> Type[EdgeProtocol]:
    """An :class:`EdgeProtocol` subclass bound to ``limits`` (uvicorn takes a class for ``http=``)."""
    return type("BoundEdgeProtocol", (EdgeProtocol,), {"limits": limits})


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context


def tls_protocol_class(limits: EdgeLimits, context: ssl.SSLContext) -> Callable[..., Any]:
    """A protocol "class" for uvicorn's ``http=``: each call wraps an :class:`EdgeProtocol` in TLS."""
    edge = protocol_class(limits)
    tls = type("BoundEdgeTLSProtocol", (EdgeTLSProtocol,), {"limits": limits})

    def create(config: Any, server_state: Any, app_state: Dict[str, Any], _loop: Optional[asyncio.AbstractEventLoop] = None) -> Any:
        loop = _loop or asyncio.get_event_loop()
        app_protocol = edge(config=config, server_state=server_state, app_state=app_state, _loop=loop)
        app_protocol.counted_by_tls = True  # the TLS layer counts the socket from accept
        return tls(loop, app_protocol, context, None, server_side=True, ssl_handshake_timeout=limits.tls_handshake_timeout_s)

    return create


#: glibc's mallopt parameter number for the mmap threshold (malloc.h)
_M_MMAP_THRESHOLD = -3


def return_large_buffers_to_the_os(threshold_bytes: int = 64 * 1024) -> bool:
    """Fix glibc's mmap threshold so request bodies (held in memory, service/upload.py) go back
    to the OS when freed. By default glibc raises the threshold after the first large free, and
    later bodies come from heap arenas that fragment: 40 concurrent 1.4 MB uploads then left the
    RSS between -27 and +80 MB per burst (tests/reliability/test_overload.py, measured). False
    where there is no glibc (musl, macOS)."""
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if name is None:
            return False
        return bool(ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def run_server(app: Any, settings: Settings, host: str, port: int) -> None:
    """Serve ``app`` with one uvicorn worker behind the edge limits (TLS when a certificate is set)."""
    import uvicorn

    if settings.malloc_mmap_threshold_bytes:
        return_large_buffers_to_the_os(settings.malloc_mmap_threshold_bytes)

    limits = EdgeLimits.from_settings(settings)
    http: Any = protocol_class(limits)
    scheme = "http"
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        http = tls_protocol_class(limits, tls_context(str(settings.tls_certfile), str(settings.tls_keyfile)))
        scheme = "https"
    logger.info(
        "edge limits",
        extra={
            "scheme": scheme,
            "max_connections": limits.max_connections,
            "max_connections_per_client": limits.max_connections_per_client,
            "idle_timeout_s": limits.idle_timeout_s,
            "header_timeout_s": limits.header_timeout_s,
            "max_header_bytes": limits.max_header_bytes,
            "max_header_count": limits.max_header_count,
        },
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=1,
        log_config=None,
        http=http,
        timeout_keep_alive=max(1, int(round(settings.idle_timeout_s))),
        timeout_graceful_shutdown=max(1, int(round(settings.shutdown_timeout_s))),
        server_header=False,
        # The Python parser is not used; this only keeps uvicorn's h11 fallback bounded too.
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
