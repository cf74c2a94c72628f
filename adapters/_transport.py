"""The adapters' HTTP/1.1 client: h11 on trio, one keep-alive pool per origin.

Why not httpx: its connection pool's bookkeeping costs more CPU per request the more requests
are in flight (``bench/http_client_bench.py`` measures it), and provider sends are where the
gateway spends its CPU. This client does only what the adapters need: a whole request out, a
whole (bounded) response back, connections reused while both sides keep them alive.

Failures are ``TransportError`` (``TransportTimeout`` for the deadline); ``adapters._http``
turns them into ``ProviderError`` s. Error messages name the host at most, never a header or
body: those carry credentials and recipients.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, Protocol
from urllib.parse import urlencode, urlsplit

import h11
import msgspec
import trio

USER_AGENT: Final = "cascadegw/0.1"
MAX_RESPONSE_BYTES: Final = 1024 * 1024
"""Provider answers are small JSON documents; anything larger is refused, so that a hostile or
broken endpoint cannot make the gateway buffer without end."""
RECEIVE_BYTES: Final = 65536
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

Origin = tuple[str, str, int]
"""``(scheme, host, port)``: requests to one origin share connections."""


class TransportError(Exception):
    """The request failed below HTTP: no connection, connection lost, not HTTP/1.1, too big."""


class TransportTimeout(TransportError):
    """No complete answer within the client's ``timeout_seconds``."""


class _RequestNotSent(TransportError):
    """The connection failed while the request was being written: part of it never left.

    The server cannot have acted on a request it did not wholly receive, so this one alone may
    be sent again. A failure after the whole request was written is a plain ``TransportError``
    even when no answer byte came: the server may have processed the request (a POST is not
    idempotent: a second send can be a second SMS).
    """


class Headers(Mapping[str, str]):
    """Immutable headers with case-insensitive lookup; repeated names are joined with ``, ``."""

    __slots__ = ("_items", "_lookup")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        lookup: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            lookup[key] = f"{lookup[key]}, {value}" if key in lookup else value
        self._items = pairs
        self._lookup = lookup

    @classmethod
    def _from_wire(cls, raw: Iterable[tuple[bytes, bytes]]) -> Headers:
        return cls((name.decode("latin-1"), value.decode("latin-1")) for name, value in raw)

    def __getitem__(self, name: str) -> str:
        return self._lookup[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup

    def __iter__(self) -> Iterator[str]:
        return iter(self._lookup)

    def __len__(self) -> int:
        return len(self._lookup)

    def raw(self) -> list[tuple[str, str]]:
        """The headers as given, in order, names as spelled."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({sorted(self._lookup)!r})"  # names only: values hold credentials


class HttpRequest:
    """One request, built once by an adapter's pure ``build_*`` function.

    ``Host``, ``Content-Length`` and ``User-Agent`` are added for the wire unless given.

    Raises:
        ValueError: the URL is not ``http``/``https`` with a host.
    """

    __slots__ = ("_wire_headers", "body", "headers", "method", "origin", "target", "url")

    def __init__(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError("an http or https URL with a host is needed")
        self.method = method
        self.url = url
        self.headers = Headers(headers)
        self.body = body
        self.origin: Origin = (scheme, parts.hostname, parts.port or _DEFAULT_PORTS[scheme])
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        wire = [
            (name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers.raw()
        ]
        if "host" not in self.headers:
            wire.insert(0, (b"Host", parts.netloc.rpartition("@")[2].encode("idna")))
        if "content-length" not in self.headers and (body or method in ("POST", "PUT", "PATCH")):
            wire.append((b"Content-Length", str(len(body)).encode("ascii")))
        if "user-agent" not in self.headers:
            wire.append((b"User-Agent", USER_AGENT.encode("ascii")))
        self._wire_headers = wire

    @classmethod
    def with_json(
        cls, method: str, url: str, payload: object, headers: Mapping[str, str] | None = None
    ) -> HttpRequest:
        """A request whose body is ``payload`` as compact UTF-8 JSON."""
        return cls(
            method,
            url,
            {**(headers or {}), "Content-Type": "application/json"},
            msgspec.json.encode(payload),
        )

    @classmethod
    def with_form(
        cls,
        method: str,
        url: str,
        fields: Mapping[str, str],
        headers: Mapping[str, str] | None = None,
    ) -> HttpRequest:
        """A request whose body is ``fields`` URL-encoded (an HTML form post)."""
        return cls(
            method,
            url,
            {**(headers or {}), "Content-Type": "application/x-www-form-urlencoded"},
            urlencode(fields).encode("ascii"),
        )

    def __repr__(self) -> str:
        return f"HttpRequest({self.method} {self.origin[0]}://{self.origin[1]}:{self.origin[2]})"


class HttpResponse:
    """A whole response: status, headers (case-insensitive) and the body."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(
        self,
        status_code: int,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        content: bytes = b"",
    ) -> None:
        self.status_code = status_code
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.content = content

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        """The body decoded as JSON (``msgspec.DecodeError`` when it is not)."""
        return msgspec.json.decode(self.content)

    def __repr__(self) -> str:
        return f"HttpResponse({self.status_code}, {len(self.content)} bytes)"


class HttpClient(Protocol):
    """What an adapter needs of its client: one request in, one response out."""

    async def send(self, request: HttpRequest) -> HttpResponse:
        """Raises: TransportError (TransportTimeout for the deadline)."""
        ...


class _Connection:
    """One keep-alive connection and its h11 state machine."""

    __slots__ = ("_fd", "_state", "_stream")

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        self._stream = stream
        self._fd = raw.socket.fileno()
        self._state = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        """Drop the connection now (no TLS close_notify: HTTP framing ends each message)."""
        raw = (
            self._stream.transport_stream
            if isinstance(self._stream, trio.SSLStream)
            else self._stream
        )
        raw.socket.close()

    def looks_alive(self) -> bool:
        """An idle connection has nothing to read; readable means EOF, a reset, or garbage."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return not poller.poll(0)

    async def exchange(self, request: HttpRequest, max_response_bytes: int) -> HttpResponse:
        """Send ``request`` and read its whole answer (``reusable`` says what comes next).

        Raises:
            _RequestNotSent: failed while writing the request (the server did not get all of it).
            TransportError: failed after the whole request was written (with or without part of
                an answer), or the answer is not HTTP/1.1, or too large.
        """
        state = self._state
        try:
            payload = state.send(
                h11.Request(
                    method=request.method, target=request.target, headers=request._wire_headers
                )
            )
            if request.body:
                payload += state.send(h11.Data(data=request.body))
            payload += state.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            # never quote h11's message: it can hold a header value (a credential)
            raise TransportError("the request is not valid HTTP/1.1") from exc
        written = received = eof = False
        status_code = 0
        headers: Headers | None = None
        chunks: list[bytes] = []
        size = 0
        try:
            await self._stream.send_all(payload)
            written = True
            while True:
                event = state.next_event()
                if event is h11.NEED_DATA:
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                    if not data and not received:
                        raise TransportError("the connection closed before any answer")
                    received, eof = True, not data
                    state.receive_data(bytes(data))
                elif isinstance(event, h11.Response):
                    status_code = event.status_code
                    headers = Headers._from_wire(event.headers)
                    declared = headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_response_bytes:
                        raise TransportError(_too_large(max_response_bytes))
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > max_response_bytes:
                        raise TransportError(_too_large(max_response_bytes))
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                # an InformationalResponse (100 Continue, 103 Early Hints) is skipped
        except (trio.BrokenResourceError, OSError) as exc:
            if not written:
                raise _RequestNotSent("the connection failed while sending the request") from exc
            if not received:
                raise TransportError("the connection failed before any answer") from exc
            raise TransportError("the connection was lost mid-answer") from exc
        except h11.RemoteProtocolError as exc:
            if eof:
                raise TransportError("the connection closed mid-answer") from exc
            raise TransportError("the server's answer is not valid HTTP/1.1") from exc
        assert headers is not None  # h11 yields the Response before any Data or its end
        return HttpResponse(status_code, headers, b"".join(chunks))

    def reusable(self) -> bool:
        """Start the next request-response cycle if both sides finished this one cleanly.

        Not when the server sent anything after the end of its answer (more bytes than its
        ``Content-Length``, a second response): h11 keeps those bytes, and the next request on
        this connection would read them as its answer, every later answer one request behind.
        Bytes that arrive later make the socket readable, which ``looks_alive`` catches.
        """
        state = self._state
        if state.our_state is not h11.DONE or state.their_state is not h11.DONE:
            return False  # Connection: close, an answer read until EOF, a request cut short
        unread, closed = state.trailing_data
        if unread or closed:
            return False
        state.start_next_cycle()  # both sides IDLE now (h11 raises if either is not DONE)
        return True


def _too_large(limit: int) -> str:
    return f"the answer is larger than {limit} bytes"


class _OriginPool:
    __slots__ = ("idle", "slots")

    def __init__(self, max_connections: int) -> None:
        # a slot is a connection in use or being opened; idle ones exist only while slots are
        # free, so open connections never exceed max_connections
        self.slots = trio.Semaphore(max_connections)
        self.idle: list[_Connection] = []


class ConnectionPool:
    """An HTTP/1.1 client: per origin, up to ``max_connections`` keep-alive connections.

    Callers beyond ``max_connections`` wait for a connection. Idle connections are reused
    last-in first-out (the warmest one; the others may time out on the server's side, which is
    cheaper than keeping all of them busy). An idle connection found closed or readable is
    dropped unused. A request is sent again (once, on a new connection) only when a reused
    connection failed while the request was being written: the server did not get all of it,
    so it cannot have acted on it. A failure after the whole request was written is a
    ``TransportError`` even before any answer byte: the server may have processed the request,
    and a POST is not idempotent, so the caller decides (the dispatcher retries with backoff,
    counts it and records it in the timeline).

    Args:
        timeout_seconds: one deadline per request: waiting for a connection, connecting,
            sending and reading the whole answer.
        max_connections: per origin.
        max_response_bytes: larger answers fail (``TransportError``).
        ssl_context: for ``https``; default ``ssl.create_default_context()`` (which reads
            ``SSL_CERT_FILE``), HTTP/1.1 offered by ALPN.
    """

    def __init__(
        self,
        *,
        timeout_seconds: float,
        max_connections: int = 64,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._timeout_seconds = timeout_seconds
        self._max_connections = max_connections
        self._max_response_bytes = max_response_bytes
        self._ssl_context = ssl_context
        self._origins: dict[Origin, _OriginPool] = {}
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close idle connections now and busy ones when their request ends."""
        self._closed = True
        for pool in self._origins.values():
            while pool.idle:
                pool.idle.pop().close()
        await trio.lowlevel.checkpoint()

    async def send(self, request: HttpRequest) -> HttpResponse:
        """Send ``request`` and read its whole answer, whatever its status.

        Raises:
            TransportTimeout: no complete answer within ``timeout_seconds``.
            TransportError: refused, reset, closed mid-answer, not HTTP/1.1, too large.
        """
        if self._closed:
            raise TransportError("the client is closed")
        pool = self._origins.get(request.origin)
        if pool is None:
            pool = self._origins[request.origin] = _OriginPool(self._max_connections)
        with trio.move_on_after(self._timeout_seconds):
            async with pool.slots:
                return await self._send(pool, request)
        raise TransportTimeout(f"no complete answer within {self._timeout_seconds:g} s")

    async def _send(self, pool: _OriginPool, request: HttpRequest) -> HttpResponse:
        while pool.idle:
            connection = pool.idle.pop()
            if not connection.looks_alive():
                connection.close()
                continue
            try:
                return await self._exchange(pool, connection, request)
            except _RequestNotSent:
                # closed by the server while idle, noticed while writing: the server did not
                # receive the whole request, so it cannot have acted on it; once more, on a new
                # connection (a failure after the whole request was written is not retried here:
                # the server may have processed it, and a second POST would be a second send)
                break
        connection = await self._connect(request.origin)
        return await self._exchange(pool, connection, request)

    async def _exchange(
        self, pool: _OriginPool, connection: _Connection, request: HttpRequest
    ) -> HttpResponse:
        try:
            response = await connection.exchange(request, self._max_response_bytes)
        except BaseException:
            connection.close()  # its state is unknown: a timeout, an error, a cancellation
            raise
        if connection.reusable() and not self._closed:
            pool.idle.append(connection)
        else:
            connection.close()
        return response

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise TransportError(f"cannot connect to {host}:{port}") from exc
        if scheme == "http":
            return _Connection(tcp)
        stream = trio.SSLStream(
            tcp, self._tls_context(), server_hostname=host, https_compatible=True
        )
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            tcp.socket.close()
            raise TransportError(f"TLS handshake with {host}:{port} failed") from exc
        except BaseException:
            tcp.socket.close()
            raise
        return _Connection(stream)

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context
