"""The adapters' HTTP/1.1 client: trio sockets, one keep-alive pool per origin.

Why not httpx: its connection pool's bookkeeping costs more CPU per request the more requests
are in flight (``bench/http_client_bench.py`` measures it), and provider sends are where the
gateway spends its CPU. Why not h11 (the server side's protocol library): its event objects
and state machine cost more than the whole rest of the request (client CPU per request at 16
in flight: 120 µs with h11, 52 µs without, same benchmark), and a client that sends one whole
request and reads one whole answer needs only the framing rules of RFC 9112, written out
below. This client does only what the adapters need: a whole request
out, a whole (bounded) response back, connections reused while both sides keep them alive.

Failures are ``TransportError`` (``TransportTimeout`` for the deadline); ``adapters._http``
turns them into ``ProviderError`` s. Error messages name the host at most, never a header or
body: those carry credentials and recipients.
"""

from __future__ import annotations

import functools
import re
import select
import ssl
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, Protocol
from urllib.parse import urlencode, urlsplit

import msgspec
import trio

USER_AGENT: Final = "cascadegw/0.1"
MAX_RESPONSE_BYTES: Final = 1024 * 1024
"""Provider answers are small JSON documents; anything larger is refused, so that a hostile or
broken endpoint cannot make the gateway buffer without end."""
RECEIVE_BYTES: Final = 65536
MAX_HEAD_BYTES: Final = 64 * 1024
"""Status line and headers of an answer (and a chunked answer's trailers): providers send a
few hundred bytes; a head that never ends is refused instead of buffered."""
_MAX_CHUNK_LINE_BYTES: Final = 1024
_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_FIELD_VALUE: Final = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
"""Visible characters, spaces and tabs: no CR, LF or NUL (a header cannot end early)."""
_TARGET: Final = re.compile(rb"[\x21-\x7e]+")
_CHUNK_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,15}")
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

    __slots__ = ("_head", "body", "headers", "method", "origin", "target", "url")

    def __init__(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        self.origin, self.target, host = _split_url(url)
        self.method = method
        self.url = url
        self.headers = Headers(headers)
        self.body = body
        wire = [
            (name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers.raw()
        ]
        if "host" not in self.headers:
            wire.insert(0, (b"Host", host))
        if "content-length" not in self.headers and (body or method in ("POST", "PUT", "PATCH")):
            wire.append((b"Content-Length", str(len(body)).encode("ascii")))
        if "user-agent" not in self.headers:
            wire.append((b"User-Agent", USER_AGENT.encode("ascii")))
        self._head = _request_head(method, self.target, wire)

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


@functools.lru_cache(maxsize=1024)
def _split_url(url: str) -> tuple[Origin, str, bytes]:
    """``(origin, target, Host header)`` of a URL; an adapter sends to a handful of URLs, so
    each is parsed once.

    Raises:
        ValueError: not ``http``/``https`` with a host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("an http or https URL with a host is needed")
    origin = (scheme, parts.hostname, parts.port or _DEFAULT_PORTS[scheme])
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return origin, target, parts.netloc.rpartition("@")[2].encode("idna")


def _request_head(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The request line and headers on the wire, or None when they would not be valid HTTP/1.1
    (a CR or LF in a value would end the header early: ``exchange`` refuses to send it)."""
    try:
        method_bytes, target_bytes = method.encode("ascii"), target.encode("ascii")
    except UnicodeEncodeError:
        return None
    if not (_TOKEN.fullmatch(method_bytes) and _TARGET.fullmatch(target_bytes)):
        return None
    lines = [method_bytes + b" " + target_bytes + b" HTTP/1.1"]
    for name, value in headers:
        if not (_TOKEN.fullmatch(name) and _FIELD_VALUE.fullmatch(value)):
            return None
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


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


class _Malformed(Exception):
    """The answer breaks HTTP/1.1 framing (what it was is not quoted: it may hold a credential)."""


class _Connection:
    """One keep-alive connection: the bytes read past the answer so far, and whether the
    answer just read lets the connection carry another request."""

    __slots__ = ("_buffer", "_fd", "_keep", "_stream")

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        self._stream = stream
        self._fd = raw.socket.fileno()
        self._buffer = bytearray()
        self._keep = False

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
        head = request._head
        assert head is not None  # the pool refused it before connecting
        self._keep = False
        buffer = self._buffer
        buffer.clear()
        written = False
        try:
            await self._stream.send_all(head + request.body if request.body else head)
            written = True
            return await self._read_answer(request, max_response_bytes)
        except (trio.BrokenResourceError, OSError) as exc:
            if not written:
                raise _RequestNotSent("the connection failed while sending the request") from exc
            raise TransportError("the connection was lost mid-answer") from exc
        except _Malformed as exc:
            raise TransportError("the server's answer is not valid HTTP/1.1") from exc

    async def _fill(self) -> None:
        """Read what has arrived into the buffer (at least one byte).

        Raises:
            TransportError: the server closed the connection first (before or mid-answer).
        """
        data = await self._stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise TransportError("the connection closed mid-answer")
        self._buffer += data

    async def _read_answer(self, request: HttpRequest, max_response_bytes: int) -> HttpResponse:
        buffer = self._buffer
        try:
            await self._fill()
        except (trio.BrokenResourceError, OSError) as exc:
            raise TransportError("the connection failed before any answer") from exc
        except TransportError:
            raise TransportError("the connection closed before any answer") from None
        while True:  # informational answers (100 Continue, 103 Early Hints) are skipped
            end = buffer.find(b"\r\n\r\n")
            while end < 0 and len(buffer) <= MAX_HEAD_BYTES:
                searched = max(0, len(buffer) - 3)
                await self._fill()
                end = buffer.find(b"\r\n\r\n", searched)
            if end < 0 or end > MAX_HEAD_BYTES:
                raise _Malformed
            keep_alive, status_code, fields = _parse_head(bytes(buffer[:end]))
            del buffer[: end + 4]
            if status_code >= 200:
                break
            if status_code == 101:  # no upgrade was asked for
                raise _Malformed
        headers = Headers(fields)
        keep_alive = keep_alive and "close" not in _tokens(headers.get("connection"))
        if request.method == "HEAD" or status_code in (204, 304):
            content = b""
        elif "transfer-encoding" in headers:
            codings = _tokens(headers["transfer-encoding"])
            if not codings or codings[-1] != "chunked":
                raise _Malformed  # a body that only the connection's end delimits: not ours
            keep_alive = keep_alive and "content-length" not in headers
            content = await self._read_chunked(max_response_bytes)
        elif "content-length" in headers:
            declared = headers["content-length"].strip()
            if not (declared.isascii() and declared.isdigit()):
                raise _Malformed
            length = int(declared)
            if length > max_response_bytes:
                raise TransportError(_too_large(max_response_bytes))
            while len(buffer) < length:
                await self._fill()
            content = bytes(buffer[:length])
            del buffer[:length]
        else:  # the body runs to the end of the connection
            keep_alive = False
            content = await self._read_to_end(max_response_bytes)
        # bytes past the answer (more than its Content-Length, a second response) would be
        # taken for the next request's answer: such a connection is not used again
        self._keep = keep_alive and not buffer
        return HttpResponse(status_code, headers, content)

    async def _read_chunked(self, max_response_bytes: int) -> bytes:
        buffer = self._buffer
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await self._line(_MAX_CHUNK_LINE_BYTES)
            digits = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(digits):
                raise _Malformed
            length = int(digits, 16)
            if not length:
                break
            size += length
            if size > max_response_bytes:
                raise TransportError(_too_large(max_response_bytes))
            while len(buffer) < length + 2:
                await self._fill()
            if buffer[length : length + 2] != b"\r\n":
                raise _Malformed
            chunks.append(bytes(buffer[:length]))
            del buffer[: length + 2]
        trailers = 0
        while line := await self._line(MAX_HEAD_BYTES):  # trailer fields, then an empty line
            trailers += len(line)
            if trailers > MAX_HEAD_BYTES:
                raise _Malformed
        return b"".join(chunks)

    async def _line(self, limit: int) -> bytes:
        buffer = self._buffer
        end = buffer.find(b"\r\n")
        while end < 0:
            if len(buffer) > limit:
                raise _Malformed
            await self._fill()
            end = buffer.find(b"\r\n")
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        return line

    async def _read_to_end(self, max_response_bytes: int) -> bytes:
        buffer = self._buffer
        while True:
            if len(buffer) > max_response_bytes:
                raise TransportError(_too_large(max_response_bytes))
            data = await self._stream.receive_some(RECEIVE_BYTES)
            if not data:
                content = bytes(buffer)
                buffer.clear()
                return content
            buffer += data

    def reusable(self) -> bool:
        """Whether both sides finished this request-response cycle cleanly and the connection
        may carry the next one: not after ``Connection: close`` (either side), an answer read
        to the connection's end, a failed exchange, or bytes past the answer (more than its
        ``Content-Length``, a second response: the next request would read them as its answer,
        every later answer one request behind). Bytes that arrive later make the socket
        readable, which ``looks_alive`` catches."""
        return self._keep and not self._buffer


def _parse_head(head: bytes) -> tuple[bool, int, list[tuple[str, str]]]:
    """``(keep_alive by version, status code, header fields)`` of an answer's head.

    Raises:
        _Malformed: not an HTTP/1.x status line, or a field that is not ``name: value``
            (obsolete line folding included).
    """
    status_line, *lines = head.split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0")
        or not (len(code) == 3 and code.isdigit())
        or rest[3:4] not in (b"", b" ")
    ):
        raise _Malformed
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not (colon and _TOKEN.fullmatch(name) and _FIELD_VALUE.fullmatch(value)):
            raise _Malformed
        fields.append((name.decode("latin-1"), value.decode("latin-1")))
    return version == b"HTTP/1.1", int(code), fields


def _tokens(value: str | None) -> list[str]:
    """A comma-separated header's items, lower case (``Connection``, ``Transfer-Encoding``)."""
    if not value:
        return []
    return [item.strip().lower() for item in value.split(",") if item.strip()]


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
        if request._head is None:
            raise TransportError("the request is not valid HTTP/1.1")
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
