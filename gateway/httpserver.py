"""A lean HTTP/1.1 server on h11 and trio, for the hot public surface and the simulators.

Provider webhooks and tracking links are small, frequent and untrusted; hypercorn + Starlette
spent about twice the CPU per request this server does (``bench/http_server_bench.py``). It
speaks only what those need: HTTP/1.1 with keep-alive and pipelining (answered in order),
bodies read whole into memory before the handler runs, and a router from method + path
pattern (``/t/c/{token}``) to ``async def handler(Request) -> Response``.

Every request is bounded, because the clients are anyone on the internet:

- framing: a request with both ``Content-Length`` and ``Transfer-Encoding`` is answered 400 and
  the connection closed (RFC 9112 section 6.1: the two framings disagree, and whatever follows
  the body could be run as a smuggled second request);
- body: a declared ``Content-Length`` over the route's limit is answered 413 before a byte is
  read; a chunked body that grows past it is answered 413 while it is read;
- work per body, whatever its decoded size: a body that arrives in more than
  ``64 + limit / 256`` pieces (chunks, or reads of a ``Content-Length`` body) is answered 400,
  and one whose bytes on the wire (chunk headers and extensions included; not counting the
  read that brought the head) pass ``2 * limit + 64 KiB`` is answered 413, both at once and
  closing; 1-byte chunks would
  otherwise cost about 5 us of parsing per body byte (5 s of CPU for a 1 MiB webhook);
- headers: a request head over ``max_header_bytes`` is answered 431 (h11 stops buffering);
- time: a request head or body that does not arrive within ``read_timeout_seconds`` is
  answered 408 and the connection closed; an idle keep-alive connection is closed after the
  same time; a response the client does not read within it is abandoned and the connection
  closed, so a client that never reads holds its own connection, not everyone's capacity;
- requests at once: past ``max_concurrent_requests`` requests being read or handled, a request
  is answered 503 at once, except ``uncapped_paths`` (health checks: cheap, and they must
  answer most when the server is busiest); a request gives its slot back when its response
  starts;
- connections at once: past ``max_connections`` a new connection is answered 503 and closed,
  before its request is read, so health checks get that 503 too. ``fit_connections_to_fd_limit``
  makes sure the cap can answer before the process runs out of file descriptors;
- out of descriptors anyway (``EMFILE`` from accept): logged once per burst, without a
  traceback, and accept is retried after a pause growing from 0.1 s to 1 s.

A malformed request gets 400, a handler that raises gets 500; neither answer carries a
traceback, and the log line names the route pattern and the exception type only (a path, a
query or an exception message may carry a token, an address or a phone number).

It imports nothing of the gateway's runtime, so the simulators (``adapters``) may use it too.
"""

from __future__ import annotations

import errno
import json
import re
import resource
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote

import h11
import structlog
import trio

log = structlog.get_logger("gateway.httpserver")

_RECEIVE_BYTES: Final = 64 * 1024
_DRAIN_BYTES: Final = 4 * 1024 * 1024
"""After an early answer (413, 503) with the request still arriving, read and drop up to this
much before closing: closing with unread data makes the kernel send a reset, which can destroy
the answer before the client has read it."""
_DRAIN_SECONDS: Final = 2.0

_BODY_PIECES_FLOOR: Final = 64
_BODY_BYTES_PER_PIECE: Final = 256
"""A body may arrive in at most ``_BODY_PIECES_FLOOR + limit // _BODY_BYTES_PER_PIECE`` pieces
(h11 ``Data`` events: one per chunk, or per read of a ``Content-Length`` body): real clients
send chunks of kilobytes, and TCP segments carry over 500 bytes."""
_BODY_WIRE_FACTOR: Final = 2
"""A body's bytes on the wire may be at most this times the route's limit plus one read
(``_RECEIVE_BYTES``, which may carry pipelined requests after the body's end). Counted from the
first read after the head: what came in the same read as the head (at most one read) is not."""

_MAX_REFUSING: Final = 32
"""Refused connections that may drain at once (and hold a descriptor while they do)."""

_ACCEPT_PAUSE_SECONDS: Final = 0.1
_ACCEPT_MAX_PAUSE_SECONDS: Final = 1.0

FD_RESERVE: Final = 256
"""File descriptors kept out of the connection cap (``fit_connections_to_fd_limit``): the
journal (SQLite's database, WAL and shared memory), ZeroMQ (its sockets, internal signalling
pairs, and one descriptor per connected CRM or webhook process), the admin server's
connections, the providers' connection pools (``concurrency`` each, 64 by default), trio's
wake-up pipe and epoll, logs and stdio, and up to ``_MAX_REFUSING`` (32) connections
being refused past the cap. 256 covers a few providers at their default pools and
some tens of CRM and admin connections; a process whose limit is tiny keeps half of it."""

_REASONS: Final = {
    100: b"Continue",
    200: b"OK",
    204: b"No Content",
    302: b"Found",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    410: b"Gone",
    413: b"Content Too Large",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}


def reason(status: int) -> bytes:
    """The standard reason phrase (``Content Too Large``: RFC 9110's, on every Python)."""
    known = _REASONS.get(status)
    if known is not None:
        return known
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


TEXT: Final = "text/plain; charset=utf-8"
HTML: Final = "text/html; charset=utf-8"
JSON: Final = "application/json"


# ---------------------------------------------------------------- requests and responses
@dataclass(frozen=True, slots=True)
class Request:
    """One request, its body read whole. ``path`` is percent-decoded, ``query`` is raw;
    header names are lower-case (a repeated header keeps its last value)."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    params: Mapping[str, str] = field(default_factory=dict)
    """What the route pattern's ``{name}`` parts matched."""

    def json(self) -> Any:
        """The body as JSON.

        Raises:
            ValueError: not JSON.
        """
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        """An ``application/x-www-form-urlencoded`` body (a repeated field keeps its last value)."""
        return dict(parse_qsl(self.body.decode("latin-1"), keep_blank_values=True))


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Besides ``content-length``, which the server sets."""


def text_response(
    body: str, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, body.encode(), {"content-type": TEXT, **(headers or {})})


def html_response(
    body: str, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, body.encode(), {"content-type": HTML, **(headers or {})})


def json_response(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(status, body, {"content-type": JSON, **(headers or {})})


def redirect(url: str, status: int = 302, headers: Mapping[str, str] | None = None) -> Response:
    # a header cannot carry spaces or non-ASCII: quoted, keeping what a URL may hold as is
    location = quote(url, safe=":/%#?=@[]!$&'()*+,;")
    return Response(status, b"", {"location": location, **(headers or {})})


Handler = Callable[[Request], Awaitable[Response]]


# ---------------------------------------------------------------- routing
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    handler: Handler
    max_body_bytes: int | None = None
    """Overrides the server's limit for this route."""


class Router:
    """Method + path pattern to handler. ``{name}`` matches one path segment, or part of one
    (``/t/o/{token}.gif``); a pattern without parameters matches exactly."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._exact: dict[str, dict[str, Route]] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Route]]] = []
        self._compiled: dict[str, dict[str, Route]] = {}
        for route in routes:
            self.add(route)

    def add(self, route: Route) -> None:
        if route.pattern in self._compiled or route.pattern in self._exact:
            methods = self._compiled.get(route.pattern) or self._exact[route.pattern]
        elif _PARAM.search(route.pattern):
            methods = {}
            pieces = _PARAM.split(route.pattern)  # literal, name, literal, name, ..., literal
            regex = "".join(
                re.escape(piece) if index % 2 == 0 else f"(?P<{piece}>[^/]+)"
                for index, piece in enumerate(pieces)
            )
            self._patterns.append((re.compile(regex), methods))
            self._compiled[route.pattern] = methods
        else:
            methods = self._exact.setdefault(route.pattern, {})
        if route.method in methods:
            raise ValueError(f"{route.method} {route.pattern} is routed twice")
        methods[route.method] = route

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | int:
        """The route and its parameters, or 404 (no such path) or 405 (not this method)."""
        params: dict[str, str] = {}
        methods = self._exact.get(path)
        if methods is None:
            for regex, candidates in self._patterns:
                found = regex.fullmatch(path)
                if found is not None:
                    methods, params = candidates, found.groupdict()
                    break
            else:
                return 404
        route = methods.get("GET" if method == "HEAD" else method)
        if route is None:
            return 405
        return route, params


# ---------------------------------------------------------------- limits
@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 64 * 1024
    """A route's ``max_body_bytes`` overrides it."""
    read_timeout_seconds: float = 10.0
    max_concurrent_requests: int = 1000
    max_connections: int = 2000
    max_header_bytes: int = 16 * 1024
    uncapped_paths: frozenset[str] = frozenset({"/healthz", "/readyz"})


def body_budget(limit: int) -> tuple[int, int]:
    """The most pieces (h11 ``Data`` events) and bytes on the wire a body under ``limit`` may
    take: the parsing work a request costs, whatever its decoded size."""
    pieces = _BODY_PIECES_FLOOR + limit // _BODY_BYTES_PER_PIECE
    return pieces, _BODY_WIRE_FACTOR * limit + _RECEIVE_BYTES


def connection_cap(wanted: int, fd_limit: int, reserve: int = FD_RESERVE) -> int:
    """How many connections a server may hold when the process may open ``fd_limit``
    descriptors (``resource.RLIM_INFINITY``: no limit), keeping ``reserve`` for everything
    else; at most ``wanted``, at least 1. A limit under twice the reserve keeps half of it."""
    if fd_limit == resource.RLIM_INFINITY:
        return wanted
    kept = min(reserve, fd_limit // 2)
    return max(1, min(wanted, fd_limit - kept))


def fit_connections_to_fd_limit(wanted: int, *, reserve: int = FD_RESERVE, name: str = "") -> int:
    """The connection cap to serve with: raises the soft ``RLIMIT_NOFILE`` toward the hard one
    as far as ``wanted + reserve`` needs; if that is still short, a lower cap
    (``connection_cap``) and one warning naming both numbers. Past the descriptor limit the cap
    could never answer its 503: accept would fail instead, and every other socket and file of
    the process with it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + reserve
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                pass  # some platforms refuse what getrlimit reports; keep the soft limit
            else:
                soft = target
    cap = connection_cap(wanted, soft, reserve)
    if cap < wanted:
        log.warning(
            "http_connection_cap_lowered",
            server=name,
            max_connections=wanted,
            effective_max_connections=cap,
            fd_limit=soft,
            fd_hard_limit=hard,
            reserve=min(reserve, soft // 2),
        )
    return cap


class _Answered(Exception):
    """Raised inside a connection to answer at once and close (408, 413, 431, ...)."""

    def __init__(self, status: int, message: str, *, drain: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.drain = drain


# ---------------------------------------------------------------- the server
class Server:
    """Serves a ``Router`` under ``Limits``; one trio task per connection."""

    def __init__(self, router: Router, limits: Limits | None = None, *, name: str = "http") -> None:
        self.router = router
        self.limits = limits or Limits()
        self.name = name
        """Names this server in log lines (``public``, ``simulator:sendgrid1``)."""
        self.connections = 0
        self.active_requests = 0
        self.accept_failures = 0
        self.refusing = 0
        """Refused connections (past ``max_connections``) still draining."""
        """Accepts that failed (``EMFILE`` and the like) since the server started."""

    async def serve(
        self,
        bind: str,
        *,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``bind`` (``host:port``; port 0 picks one) until cancelled; ``started``
        with the URL it listens at. ``reuse_port`` lets several processes share the port.

        Raises:
            OSError: the address cannot be bound (in use, no privileges).
        """
        listeners = await open_listeners(bind, reuse_port=reuse_port)
        host = split_bind(bind)[0]
        port = listeners[0].socket.getsockname()[1]
        await self.serve_listeners(listeners, url=f"http://{host}:{port}", task_status=task_status)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        url: str,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept, listener, nursery)
            task_status.started(url)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            failures = 0
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # out of descriptors (EMFILE) or memory: wait for some to be freed rather
                    # than crash the server (fit_connections_to_fd_limit should prevent it);
                    # once per burst, no traceback: a flood must not flood the log as well
                    if failures == 0:
                        log.warning(
                            "http_accept_failing",
                            server=self.name,
                            error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                        )
                    failures += 1
                    self.accept_failures += 1
                    await trio.sleep(
                        min(
                            _ACCEPT_PAUSE_SECONDS * 2 ** min(failures - 1, 8),
                            _ACCEPT_MAX_PAUSE_SECONDS,
                        )
                    )
                    continue
                if failures:
                    log.info("http_accept_recovered", server=self.name, failures=failures)
                    failures = 0
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self.connections >= self.limits.max_connections:
            # a refusal holds its descriptor while it drains: past _MAX_REFUSING of those at
            # once the 503 is sent without waiting and the socket closed, so a flood costs
            # at most max_connections + _MAX_REFUSING descriptors
            lingering = self.refusing < _MAX_REFUSING
            self.refusing += lingering
            try:
                async with stream:
                    await _refuse(stream, self.limits.read_timeout_seconds, linger=lingering)
            finally:
                self.refusing -= lingering
            return
        self.connections += 1
        try:
            async with stream:
                await _Connection(self, stream).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; nothing to answer
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the server
            log.error("http_connection_failed", server=self.name, **_where(exc))
        finally:
            self.connections -= 1


async def _refuse(stream: trio.SocketStream, timeout_seconds: float, *, linger: bool) -> None:
    """Past the connection cap: 503 without reading the request, then close; with ``linger``,
    after draining what the client sends (see ``_DRAIN_BYTES``), else at once."""
    message = b"too many connections, retry later"
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(message)
    )
    with trio.move_on_after(min(timeout_seconds, _DRAIN_SECONDS)):
        try:
            # a fresh socket's send buffer takes this at once: only the drain may wait
            await stream.send_all(head + message)
            if linger:
                await _drain(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _drain(stream: trio.SocketStream) -> None:
    """Half-close, then read and drop what the client still sends (see ``_DRAIN_BYTES``);
    the caller bounds the time."""
    await stream.send_eof()
    drained = 0
    while drained < _DRAIN_BYTES:
        data = await stream.receive_some(_RECEIVE_BYTES)
        if not data:
            return
        drained += len(data)


def _where(exc: BaseException) -> dict[str, object]:
    """What to log about an exception: its type and the innermost line, never its message
    (which may carry whatever the request did)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    return {"error": type(exc).__name__, "at": where}


class _Connection:
    """One client connection: read a request, answer it, repeat while it keeps alive."""

    def __init__(self, server: Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
        )
        self.received = 0
        """Bytes read from the client so far."""

    async def run(self) -> None:
        while True:
            try:
                keep_alive = await self._one()
            except _Answered as answer:
                await self._answer_and_close(answer)
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                message = {
                    431: "request headers too large",
                    501: "unsupported transfer coding",
                }.get(status, "malformed request")
                await self._answer_and_close(_Answered(status, message))
                return
            if not keep_alive:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return  # their side did not finish cleanly: close rather than guess

    async def _next_event(self, deadline: float, *, idle: bool = False) -> Any:
        """The next h11 event, reading as needed until ``deadline`` (trio time)."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_at(deadline):
                data = await self.stream.receive_some(_RECEIVE_BYTES)
                self.received += len(data)
                self.conn.receive_data(data)
                continue
            if idle and self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                raise _Closed
            raise _Answered(408, "the request did not arrive in time")

    async def _one(self) -> bool:
        """Read, handle and answer one request; whether the connection may carry another."""
        limits = self.limits
        deadline = trio.current_time() + limits.read_timeout_seconds
        try:
            event = await self._next_event(deadline, idle=True)
        except _Closed:
            return False
        if isinstance(event, h11.ConnectionClosed):
            return False
        assert isinstance(event, h11.Request), event
        # h11 bounds a head still arriving; one that arrived whole in a read is measured here
        size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
        if size > limits.max_header_bytes:
            raise _Answered(431, "request headers too large", drain=True)
        framings = {name for name, _ in event.headers} & {b"content-length", b"transfer-encoding"}
        if len(framings) == 2:
            # h11 frames it by Transfer-Encoding and would keep the connection; RFC 9112 6.1
            raise _Answered(400, "both Content-Length and Transfer-Encoding", drain=True)
        method = event.method.decode("ascii", "replace")
        raw_path, _, query = event.target.decode("latin-1").partition("?")
        path = unquote(raw_path)
        server = self.server
        capped = path not in limits.uncapped_paths
        if capped and server.active_requests >= limits.max_concurrent_requests:
            raise _Answered(503, "too many requests at once, retry later", drain=True)
        if capped:
            server.active_requests += 1
        try:
            response = await self._handle(event, method, path, query)
        finally:
            if capped:
                server.active_requests -= 1
        await self._send(response, head_only=method == "HEAD")
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def _handle(self, event: h11.Request, method: str, path: str, query: str) -> Response:
        matched = self.server.router.match(method, path)
        limit = self.limits.max_body_bytes
        if not isinstance(matched, int) and matched[0].max_body_bytes is not None:
            limit = matched[0].max_body_bytes
        headers: dict[str, str] = {}
        for name, value in event.headers:
            headers[name.decode("latin-1")] = value.decode("latin-1")
        declared = headers.get("content-length")
        if declared is not None and int(declared) > limit:  # h11 has checked it is a number
            raise _Answered(413, f"body over the {limit}-byte limit", drain=True)
        # h11's they_are_waiting_for_100_continue costs more than the rest of the head's
        # handling; the header says the same for a request whose body is not read yet
        if headers.get("expect", "").lower() == "100-continue":
            await self.stream.send_all(
                self.conn.send(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
                or b""
            )
        body = await self._body(limit)
        if isinstance(matched, int):
            return text_response("Not Found" if matched == 404 else "Method Not Allowed", matched)
        route, params = matched
        request = Request(method, path, query, headers, body, params)
        try:
            return await route.handler(request)
        except Exception as exc:  # noqa: BLE001 - answered 500, logged without the request
            log.error(
                "http_handler_failed",
                server=self.server.name,
                method=method,
                route=route.pattern,
                **_where(exc),
            )
            return text_response("internal error", 500)

    async def _body(self, limit: int) -> bytes:
        deadline = trio.current_time() + self.limits.read_timeout_seconds
        max_pieces, max_wire = body_budget(limit)
        wire_start = self.received
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(deadline)
            if self.received - wire_start > max_wire:
                raise _Answered(413, f"body over {max_wire} bytes on the wire", drain=True)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise _Answered(413, f"body over the {limit}-byte limit", drain=True)
                chunks.append(event.data)
                if len(chunks) > max_pieces:
                    raise _Answered(400, f"body in over {max_pieces} pieces", drain=True)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:  # ConnectionClosed mid-body
                raise trio.BrokenResourceError("the client closed mid-body")

    async def _send(self, response: Response, *, head_only: bool = False) -> None:
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in response.headers.items()
        ]
        headers.append((b"content-length", b"%d" % len(response.body)))
        data = self.conn.send(
            h11.Response(
                status_code=response.status, headers=headers, reason=reason(response.status)
            )
        )
        assert data is not None
        if response.body and not head_only:
            data += self.conn.send(h11.Data(data=response.body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        # a client that does not read its answer is cut off, not waited for
        with trio.move_on_after(self.limits.read_timeout_seconds) as sending:
            await self.stream.send_all(data)
        if sending.cancelled_caught:
            raise trio.BrokenResourceError("the client did not read its response in time")

    async def _answer_and_close(self, answer: _Answered) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response already started: nothing coherent can follow it
        status = answer.status
        body = answer.message.encode()
        headers = [
            (b"content-type", TEXT.encode()),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
        ]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        data = (
            b"HTTP/1.1 %d %s\r\n" % (status, reason(status))
            + b"".join(b"%s: %s\r\n" % header for header in headers)
            + b"\r\n"
            + body
        )
        with trio.move_on_after(min(self.limits.read_timeout_seconds, _DRAIN_SECONDS)):
            await self.stream.send_all(data)
            if answer.drain:
                await _drain(self.stream)


class _Closed(Exception):
    """An idle keep-alive connection timed out or closed between requests."""


# ---------------------------------------------------------------- binding
def split_bind(bind: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` for IPv6) as host and port.

    Raises:
        ValueError: no port.
    """
    host, colon, port = bind.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"expected host:port, got {bind!r}")
    return host.strip("[]"), int(port)


async def open_listeners(bind: str, *, reuse_port: bool = False) -> list[trio.SocketListener]:
    """Listening sockets for ``bind``.

    Raises:
        OSError: the address cannot be bound.
    """
    host, port = split_bind(bind)
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host or None)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # several processes accept on one port, the kernel spreading connections among them
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host or "0.0.0.0", port))  # noqa: S104 - an empty host means all
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]
