"""A real HTTP/1.1 server on 127.0.0.1 for client tests, scripted by a handler per request.

The handler sees each request with the connection it came on and answers with an
``HttpResponse`` (kept alive unless it says ``Connection: close``; chunked when it names
``Transfer-Encoding: chunked``) or with ``Raw`` bytes written as they are, after which the
server closes the connection (an empty ``Raw`` closes it without answering), resets it, or
goes on serving it.

An optional head handler sees each request once its head arrived, before its body is read: it
may let the server read on (``None``), answer early (as a server refusing a large body with 413
does) or drop the connection with the body unread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import count
from socket import SO_LINGER, SOL_SOCKET
from ssl import SSLContext
from struct import pack
from typing import Literal

import h11
import trio

from adapters._transport import HttpRequest, HttpResponse


@dataclass(frozen=True)
class Raw:
    """Bytes to write instead of a well-formed answer, and what happens to the connection then."""

    data: bytes = b""
    then: Literal["close", "reset", "serve"] = "close"
    """``close``: an orderly close (FIN). ``reset``: a TCP reset (RST), as a crashing server or a
    load balancer gives. ``serve``: read the next request from the bytes that follow (plain TCP
    only for ``reset``)."""


@dataclass(frozen=True)
class Call:
    """One request as the server received it."""

    request: HttpRequest
    connection: int
    """1 for the server's first connection, 2 for the next, ..."""
    index: int
    """1 for the connection's first request, 2 for the next, ..."""


Handler = Callable[[Call], Awaitable[HttpResponse | Raw]]
HeadHandler = Callable[[Call], Awaitable[HttpResponse | Raw | None]]
"""Called with the request's head (its ``body`` empty); ``None`` reads the body on, an
``HttpResponse`` answers before the body is read (the body is read and dropped after it),
``Raw`` leaves the body unread."""


@dataclass
class LocalServer:
    handler: Handler
    on_head: HeadHandler | None = None
    url: str = ""
    calls: list[Call] = field(default_factory=list)
    """Every request the server received whole: those it could act on."""
    heads: list[Call] = field(default_factory=list)
    """Every request whose head arrived (its ``body`` empty), received whole or not."""
    connections: int = 0
    open_connections: int = 0
    most_open_connections: int = 0
    alpn: list[str | None] = field(default_factory=list)
    """The protocol ALPN settled on, per TLS connection."""
    _idle: set[trio.abc.Stream] = field(default_factory=set)

    def close_idle(self) -> None:
        """Close every (plain TCP) connection waiting for its next request, as a server's
        keep-alive timeout does."""
        for stream in list(self._idle):
            assert isinstance(stream, trio.SocketStream)
            stream.socket.close()

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        self.open_connections += 1
        self.most_open_connections = max(self.most_open_connections, self.open_connections)
        number = self.connections
        state = h11.Connection(h11.SERVER)
        try:
            for index in count(1):
                head = await self._read_head(stream, state)
                if head is None:
                    return
                if index == 1 and isinstance(stream, trio.SSLStream):
                    self.alpn.append(stream.selected_alpn_protocol())
                early = Call(_as_request(head, b""), number, index)
                self.heads.append(early)
                answer = None if self.on_head is None else await self.on_head(early)
                if answer is None:
                    body = await self._read_body(stream, state)
                    if body is None:
                        return
                    call = Call(_as_request(head, body), number, index)
                    self.calls.append(call)
                    answer = await self.handler(call)
                    if not isinstance(answer, Raw):
                        await stream.send_all(_encode(state, answer))
                elif not isinstance(answer, Raw):
                    await stream.send_all(_encode(state, answer))
                    if await self._read_body(stream, state) is None:
                        return
                if isinstance(answer, Raw):
                    await stream.send_all(answer.data)
                    if answer.then != "serve":
                        if answer.then == "reset":
                            assert isinstance(stream, trio.SocketStream)
                            stream.socket.setsockopt(SOL_SOCKET, SO_LINGER, pack("ii", 1, 0))
                        return
                    # the raw answer bypassed h11: a fresh state machine for what follows
                    unread = state.trailing_data[0]
                    state = h11.Connection(h11.SERVER)
                    if unread:  # (no bytes would tell h11 the connection closed)
                        state.receive_data(unread)
                    continue
                if state.our_state is not h11.DONE or state.their_state is not h11.DONE:
                    return
                state.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _next_event(self, stream: trio.abc.Stream, state: h11.Connection) -> object:
        while True:
            event = state.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._idle.add(stream)
            try:
                data = await stream.receive_some(65536)
            finally:
                self._idle.discard(stream)
            state.receive_data(bytes(data))

    async def _read_head(
        self, stream: trio.abc.Stream, state: h11.Connection
    ) -> h11.Request | None:
        event = await self._next_event(stream, state)
        # anything else is ConnectionClosed: the client is done with this connection
        return event if isinstance(event, h11.Request) else None

    async def _read_body(self, stream: trio.abc.Stream, state: h11.Connection) -> bytes | None:
        body: list[bytes] = []
        while True:
            event = await self._next_event(stream, state)
            if isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(body)
            else:  # ConnectionClosed: the client gave up mid-body
                return None


def _as_request(head: h11.Request, body: bytes) -> HttpRequest:
    headers = [(n.decode(), v.decode()) for n, v in head.headers]
    host = dict(headers)["host"]
    return HttpRequest(head.method.decode(), f"http://{host}{head.target.decode()}", headers, body)


def _encode(state: h11.Connection, response: HttpResponse) -> bytes:
    headers = response.headers.raw()
    chunked = response.headers.get("transfer-encoding", "") == "chunked"
    if not chunked:
        headers.append(("Content-Length", str(len(response.content))))
    data = state.send(h11.Response(status_code=response.status_code, headers=headers))
    assert data is not None
    pieces = [response.content[i : i + 7] for i in range(0, len(response.content), 7)]
    for piece in pieces if chunked else [response.content]:
        data += state.send(h11.Data(data=piece)) or b""
    return data + (state.send(h11.EndOfMessage()) or b"")


@asynccontextmanager
async def local_server(
    handler: Handler, *, on_head: HeadHandler | None = None, ssl_context: SSLContext | None = None
) -> AsyncIterator[LocalServer]:
    """Serve ``handler`` on an ephemeral port until the block ends (HTTPS with a context)."""
    server = LocalServer(handler, on_head)
    async with trio.open_nursery() as nursery:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = [listener]
        server.url = f"http://127.0.0.1:{port}"
        if ssl_context is not None:
            listeners = [trio.SSLListener(listener, ssl_context, https_compatible=True)]
            server.url = f"https://127.0.0.1:{port}"
        nursery.start_soon(trio.serve_listeners, server.serve_connection, listeners)
        yield server
        nursery.cancel_scope.cancel()


def answer(
    status_code: int = 200, content: bytes = b"{}", headers: dict[str, str] | None = None
) -> Callable[[Call], Awaitable[HttpResponse]]:
    """A handler that gives every request the same answer."""

    async def handler(call: Call) -> HttpResponse:
        return HttpResponse(status_code, headers or {}, content)

    return handler
