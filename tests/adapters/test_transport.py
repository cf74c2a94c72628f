"""The adapters' HTTP/1.1 pool against real local servers: reuse, bounds, dead keep-alive
connections, no request sent twice, failures, framing, size limit, TLS and the status mapping
on top of it."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Literal

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from adapters._http import error_for_status, make_client, map_transport_errors
from adapters._transport import ConnectionPool, HttpRequest, HttpResponse, TransportError
from gateway.core.errors import (
    AuthRejected,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from tests.adapters.local_http import Call, Raw, answer, local_server
from tests.support import wait_for

PROVIDER = "prov"
BODY = b'{"ok":true}'
LARGE = 64 * 1024 * 1024
"""A request body more than loopback's socket buffers hold: writing it blocks until the server
reads, so a server that stops after the head makes the write itself fail."""


async def send(client: ConnectionPool, request: HttpRequest) -> HttpResponse:
    """What an adapter does: send, with transport failures mapped to provider errors."""
    with map_transport_errors(PROVIDER):
        return await client.send(request)


def get(url: str) -> HttpRequest:
    return HttpRequest("GET", f"{url}/thing")


def post(url: str, body: bytes = BODY) -> HttpRequest:
    return HttpRequest("POST", f"{url}/send", {"Content-Type": "application/json"}, body)


def seen(calls: list[Call]) -> list[tuple[int, int]]:
    """``(connection, index)`` per request the server saw."""
    return [(c.connection, c.index) for c in calls]


async def own_answer(call: Call) -> HttpResponse:
    """An answer that names the request it answers."""
    return HttpResponse(200, {}, f"{call.connection}.{call.index}".encode())


class TestRequestsAndResponses:
    async def test_what_is_sent_and_what_comes_back(self) -> None:
        handler = answer(201, BODY, {"X-Message-Id": "m-1", "Content-Type": "application/json"})
        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            request = HttpRequest.with_json(
                "POST", f"{server.url}/v3/send?x=1", {"a": "é"}, headers={"Authorization": "k"}
            )
            response = await send(client, request)
        assert (201, BODY, True) == (response.status_code, response.content, response.is_success)
        assert "m-1" == response.headers["x-message-id"] == response.headers["X-MESSAGE-ID"]
        assert {"ok": True} == response.json()
        (call,) = server.calls
        seen = call.request
        assert ("POST", f"{server.url}/v3/send?x=1") == (seen.method, seen.url)
        assert '{"a":"é"}'.encode() == seen.body
        assert "k" == seen.headers["authorization"]
        assert "application/json" == seen.headers["content-type"]
        assert str(len(seen.body)) == seen.headers["content-length"]
        assert "cascadegw/0.1" == seen.headers["user-agent"]
        assert server.url.removeprefix("http://") == seen.headers["host"]

    async def test_a_form_post(self) -> None:
        async with local_server(answer()) as server, make_client(timeout_seconds=5) as client:
            await send(client, HttpRequest.with_form("POST", server.url, {"To": "+1 2", "B": "&"}))
        seen = server.calls[0].request
        assert (b"To=%2B1+2&B=%26", f"{server.url}/") == (seen.body, seen.url)
        assert "application/x-www-form-urlencoded" == seen.headers["content-type"]

    def test_only_http_urls(self) -> None:
        for url in ("ftp://host/x", "http:///nohost", "/relative"):
            with pytest.raises(ValueError, match="http or https"):
                HttpRequest("GET", url)

    def test_repeated_headers_are_joined_and_reprs_hide_values(self) -> None:
        response = HttpResponse(200, [("Vary", "a"), ("vary", "b"), ("Token", "secret")])
        assert "a, b" == response.headers["VARY"]
        assert "secret" not in repr(response.headers) + repr(response)
        request = HttpRequest("POST", "https://api.example/x", {"Authorization": "secret"})
        assert "secret" not in repr(request) + repr(request.headers)


class TestConnections:
    async def test_sequential_requests_share_one_connection(self) -> None:
        async with local_server(answer()) as server, make_client(timeout_seconds=5) as client:
            for _ in range(5):
                assert b"{}" == (await send(client, get(server.url))).content
        assert (1, [1, 2, 3, 4, 5]) == (server.connections, [c.index for c in server.calls])

    async def test_concurrency_is_bounded_by_max_connections(self) -> None:
        in_flight, all_busy, release = [0], trio.Event(), trio.Event()

        async def handler(call: Call) -> HttpResponse:
            in_flight[0] += 1
            if in_flight[0] == 3:
                all_busy.set()
            await release.wait()
            return HttpResponse(200, {}, b"{}")

        async with (
            local_server(handler) as server,
            make_client(timeout_seconds=30, max_connections=3) as client,
            trio.open_nursery() as nursery,
        ):
            for _ in range(10):
                nursery.start_soon(send, client, get(server.url))
            await all_busy.wait()
            release.set()
        # ten requests, three at a time, each connection opened once and reused
        assert (10, 3, 3) == (len(server.calls), server.connections, server.most_open_connections)

    async def test_an_idle_connection_the_server_closed_is_replaced(self) -> None:
        async with local_server(answer()) as server, make_client(timeout_seconds=5) as client:
            await send(client, post(server.url))
            await wait_for(lambda: server._idle != set(), what="the connection waits, idle")
            server.close_idle()
            response = await send(client, post(server.url))
        # found closed before use: the request went out once, on a new connection
        assert 200 == response.status_code
        assert [(1, 1), (2, 1)] == seen(server.calls) == seen(server.heads)

    @pytest.mark.parametrize(
        ("then", "message"),
        [("close", "closed before any answer"), ("reset", "failed before any answer")],
    )
    async def test_a_request_processed_on_a_reused_connection_is_not_sent_again(
        self, then: Literal["close", "reset"], message: str
    ) -> None:
        """The server read the whole POST, may have acted on it, then closed or reset the
        connection without answering. A POST is not idempotent: sending it again could send
        the message twice, so the failure goes to the caller, whose retries are visible."""

        async def handler(call: Call) -> HttpResponse | Raw:
            return (
                Raw(then=then)
                if (call.connection, call.index) == (1, 2)
                else await own_answer(call)
            )

        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            await send(client, post(server.url))
            with pytest.raises(ProviderUnavailable) as caught:
                await send(client, post(server.url))
            assert isinstance(caught.value.__cause__, TransportError)
            assert f"prov: the connection {message}" == str(caught.value)
            assert [(1, 1), (1, 2)] == seen(server.calls)  # received once, not again
            # the caller's next attempt gets a new connection
            assert b"2.1" == (await send(client, post(server.url))).content
        assert [(1, 1), (1, 2), (2, 1)] == seen(server.calls)

    @pytest.mark.parametrize("then", ["close", "reset"])
    async def test_a_reused_connection_lost_while_writing_is_retried_once(
        self, then: Literal["close", "reset"]
    ) -> None:
        """The server dropped the connection having read only the head: it did not get the
        body, so it cannot have acted on the request, which goes again on a new connection."""

        async def on_head(call: Call) -> Raw | None:
            return Raw(then=then) if (call.connection, call.index) == (1, 2) else None

        async with (
            local_server(own_answer, on_head=on_head) as server,
            make_client(timeout_seconds=30) as client,
        ):
            await send(client, post(server.url))
            response = await send(client, post(server.url, b"x" * LARGE))
        assert b"2.1" == response.content
        assert [(1, 1), (1, 2), (2, 1)] == seen(server.heads)
        assert [(1, 1), (2, 1)] == seen(server.calls)
        assert LARGE == len(server.calls[-1].request.body)

    async def test_a_request_lost_while_writing_twice_fails(self) -> None:
        async def on_head(call: Call) -> Raw | None:
            return Raw(then="reset") if call.request.headers["content-length"] != "11" else None

        async with (
            local_server(own_answer, on_head=on_head) as server,
            make_client(timeout_seconds=30) as client,
        ):
            await send(client, post(server.url))
            with pytest.raises(ProviderUnavailable, match="failed while sending the request"):
                await send(client, post(server.url, b"x" * LARGE))
        # once more on a new connection, not again: that connection failed as the first did
        assert ([(1, 1), (1, 2), (2, 1)], [(1, 1)]) == (seen(server.heads), seen(server.calls))

    async def test_a_new_connection_dropped_before_answering_is_not_retried(self) -> None:
        async with (
            local_server(lambda call: _raw(b"")) as server,
            make_client(timeout_seconds=5) as client,
        ):
            with pytest.raises(ProviderUnavailable, match="closed before any answer"):
                await send(client, get(server.url))
        assert 1 == len(server.calls)

    async def test_a_connection_lost_mid_answer_is_not_retried(self) -> None:
        partial = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"name":'

        async def handler(call: Call) -> HttpResponse | Raw:
            return Raw(partial) if call.index == 2 else HttpResponse(200, {}, b"{}")

        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            await send(client, get(server.url))
            with pytest.raises(ProviderUnavailable) as caught:
                await send(client, get(server.url))
            # the next request gets a new connection
            assert 200 == (await send(client, get(server.url))).status_code
        assert "prov: the connection closed mid-answer" == str(caught.value)
        assert [(1, 1), (1, 2), (2, 1)] == [(c.connection, c.index) for c in server.calls]

    @pytest.mark.parametrize(
        "extra",
        [b'HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"old":1}', b"garbage"],
        ids=["a second response", "garbage"],
    )
    async def test_bytes_after_an_answer_are_never_read_as_the_next_answer(
        self, extra: bytes
    ) -> None:
        """More bytes than the Content-Length in the same packet: h11 holds them, and the next
        request on that connection would take them for its answer (every later answer one
        request behind). The connection is dropped instead."""

        async def handler(call: Call) -> HttpResponse | Raw:
            if (call.connection, call.index) == (1, 1):
                return Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}" + extra, "serve")
            return await own_answer(call)

        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            assert b"{}" == (await send(client, post(server.url))).content
            assert b"2.1" == (await send(client, post(server.url))).content
            assert b"2.2" == (await send(client, post(server.url))).content
        assert [(1, 1), (2, 1), (2, 2)] == seen(server.calls)

    @pytest.mark.parametrize(
        ("headers", "next_call"), [({}, b"1.2"), ({"Connection": "close"}, b"2.1")]
    )
    async def test_an_answer_before_the_body_was_read(
        self, headers: dict[str, str], next_call: bytes
    ) -> None:
        """A 413 sent on the head alone: the connection is reused only if h11 saw both sides
        finish (the server read the body after answering, and kept the connection)."""

        async def on_head(call: Call) -> HttpResponse | None:
            if (call.connection, call.index) == (1, 1):
                return HttpResponse(413, headers, b'{"error":"too large"}')
            return None

        async with (
            local_server(own_answer, on_head=on_head) as server,
            make_client(timeout_seconds=5) as client,
        ):
            assert 413 == (await send(client, post(server.url))).status_code
            assert next_call == (await send(client, post(server.url))).content
        assert [] == [c for c in server.calls if (c.connection, c.index) == (1, 1)]

    async def test_connection_close_is_honoured(self) -> None:
        handler = answer(headers={"Connection": "close"})
        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            for _ in range(3):
                assert 200 == (await send(client, get(server.url))).status_code
        assert (3, [1, 1, 1]) == (server.connections, [c.index for c in server.calls])

    async def test_aclose_closes_idle_connections_and_refuses_more(self) -> None:
        async with local_server(answer()) as server:
            client = make_client(timeout_seconds=5)
            await send(client, get(server.url))
            assert 1 == server.open_connections
            await client.aclose()
            await wait_for(lambda: server.open_connections == 0, what="the server saw the close")
            with pytest.raises(ProviderUnavailable, match="closed"):
                await send(client, get(server.url))
        assert 1 == len(server.calls)


async def _raw(data: bytes) -> Raw:
    return Raw(data)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps once every task has waited 100 ms of real time: the local
    server answers far sooner than that whenever it answers at all."""
    return trio.testing.MockClock(autojump_threshold=0.1)


class TestFailures:
    async def test_refused(self) -> None:
        with trio.socket.socket() as probe:
            await probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # nothing listens on the port now
        async with make_client(timeout_seconds=5) as client:
            with pytest.raises(ProviderUnavailable, match=f"cannot connect to 127.0.0.1:{port}"):
                await send(client, HttpRequest("GET", f"http://127.0.0.1:{port}/"))

    async def test_no_answer_times_out_at_the_deadline(self, clock: trio.testing.MockClock) -> None:
        async def never(call: Call) -> HttpResponse:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        async with local_server(never) as server, make_client(timeout_seconds=30) as client:
            start = trio.current_time()
            with pytest.raises(ProviderTimeout, match="prov: timed out"):
                await send(client, get(server.url))
            elapsed_seconds = trio.current_time() - start
        assert 30 <= elapsed_seconds < 31, elapsed_seconds
        assert 1 == len(server.calls)

    async def test_the_deadline_covers_waiting_for_a_connection(
        self, clock: trio.testing.MockClock
    ) -> None:
        async def slow(call: Call) -> HttpResponse:
            await trio.sleep(8)
            return HttpResponse(200, {}, b"{}")

        first: list[HttpResponse] = []

        async def send_first(client: ConnectionPool, url: str) -> None:
            first.append(await send(client, get(url)))

        async with (
            local_server(slow) as server,
            make_client(timeout_seconds=10, max_connections=1) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(send_first, client, server.url)
            await trio.sleep(5)
            start = trio.current_time()
            # 3 s waiting for the connection + 8 s answering: past the 10 s deadline
            with pytest.raises(ProviderTimeout):
                await send(client, get(server.url))
            elapsed_seconds = trio.current_time() - start
        assert 10 <= elapsed_seconds < 11, elapsed_seconds
        assert ([200], 2) == ([r.status_code for r in first], len(server.calls))


class TestFraming:
    async def test_chunked_answers_are_read_whole_and_the_connection_kept(self) -> None:
        content = b'{"name": "projects/p/messages/' + b"9" * 60 + b'"}'
        handler = answer(200, content, {"Transfer-Encoding": "chunked"})
        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            for _ in range(2):
                response = await send(client, get(server.url))
                assert (content, "chunked") == (
                    response.content,
                    response.headers["transfer-encoding"],
                )
        assert 1 == server.connections

    @pytest.mark.parametrize("framing", ["content-length", "chunked"])
    async def test_an_answer_over_the_limit_is_refused(self, framing: str) -> None:
        headers = {"Transfer-Encoding": "chunked"} if framing == "chunked" else {}
        limit = 1000

        async def handler(call: Call) -> HttpResponse:
            size = limit if call.request.url.endswith("/fits") else limit + 1
            return HttpResponse(200, headers, b"x" * size)

        async with (
            local_server(handler) as server,
            ConnectionPool(timeout_seconds=5, max_response_bytes=limit) as client,
        ):
            fits = await send(client, HttpRequest("GET", f"{server.url}/fits"))
            with pytest.raises(ProviderUnavailable, match="larger than 1000 bytes"):
                await send(client, HttpRequest("GET", f"{server.url}/big"))
        assert limit == len(fits.content)

    @pytest.mark.parametrize(
        ("raw", "content", "reused"),
        [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", b"{}", True),
            (b"HTTP/1.1 200\r\ncontent-length:2\r\n\r\n{}", b"{}", True),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                b"{}",
                True,
            ),
            (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b"", True),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b'2;name=value\r\n{"\r\n3\r\na":\r\n2\r\n1}\r\n0\r\nX-Trailer: t\r\n\r\n',
                b'{"a":1}',
                True,
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", b"{}", False),
            (
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\n{}",
                b"{}",
                False,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n"
                b"2\r\n{}\r\n0\r\n\r\n",
                b"{}",
                False,
            ),
        ],
        ids=[
            "content-length",
            "no reason phrase, lower case, no space",
            "100 continue skipped",
            "204 has no body",
            "chunked with extensions and trailers",
            "HTTP/1.0",
            "connection close among tokens",
            "chunked and a content-length",
        ],
    )
    async def test_answers_the_framing_rules_allow(
        self, raw: bytes, content: bytes, reused: bool
    ) -> None:
        """Each answer arrives in one piece and, on a connection the server keeps open, is read
        whole; the connection carries the next request only when the answer allows it."""

        async def handler(call: Call) -> HttpResponse | Raw:
            if (call.connection, call.index) == (1, 1):
                return Raw(raw, "serve")
            return await own_answer(call)

        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            assert content == (await send(client, get(server.url))).content
            following = (await send(client, get(server.url))).content
        assert (b"1.2" if reused else b"2.1") == following

    async def test_an_answer_delimited_by_the_connection_end(self) -> None:
        handler = answer(200, b"")

        async def to_the_end(call: Call) -> HttpResponse | Raw:
            if (call.connection, call.index) == (1, 1):
                return Raw(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000, "close")
            return await handler(call)

        async with local_server(to_the_end) as server, make_client(timeout_seconds=5) as client:
            assert b"x" * 100_000 == (await send(client, get(server.url))).content
            assert 200 == (await send(client, get(server.url))).status_code
        assert [(1, 1), (2, 1)] == seen(server.calls)

    async def test_an_answer_arriving_a_byte_at_a_time(self) -> None:
        """Framing does not depend on how the answer is cut into reads."""
        answer_bytes = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, _dribbler(answer_bytes), 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            async with make_client(timeout_seconds=5) as client:
                for _ in range(2):  # and the connection is reused
                    response = await send(client, get(f"http://127.0.0.1:{port}"))
                    assert b"abcde" == response.content
            nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        "raw",
        [
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: a\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (70 * 1024) + b"\r\n\r\n",
        ],
        ids=[
            "HTTP/2 status line",
            "four-digit status",
            "not HTTP",
            "obsolete line folding",
            "space in a field name",
            "negative length",
            "two lengths",
            "unknown transfer coding",
            "chunk size with 0x",
            "chunk longer than its size",
            "unasked upgrade",
            "head over 64 KiB",
        ],
    )
    async def test_answers_that_break_the_framing_are_refused(self, raw: bytes) -> None:
        """Refused with one message that quotes nothing of the answer; the next request gets
        a new connection."""

        async def handler(call: Call) -> HttpResponse | Raw:
            if (call.connection, call.index) == (1, 1):
                return Raw(raw, "serve")
            return await own_answer(call)

        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            with pytest.raises(ProviderUnavailable) as caught:
                await send(client, get(server.url))
            assert "prov: the server's answer is not valid HTTP/1.1" == str(caught.value)
            assert b"2.1" == (await send(client, get(server.url))).content

    @pytest.mark.parametrize(
        "partial",
        [b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}"],
    )
    async def test_a_connection_closed_mid_head_or_body(self, partial: bytes) -> None:
        async with (
            local_server(lambda call: _raw(partial)) as server,
            make_client(timeout_seconds=5) as client,
        ):
            with pytest.raises(ProviderUnavailable, match="prov: the connection closed mid-answer"):
                await send(client, get(server.url))

    @pytest.mark.parametrize(
        "request_",
        [
            HttpRequest("POST", "http://127.0.0.1:1/send", {"X-Token": "a\r\nX-Injected: 1"}),
            HttpRequest("POST", "http://127.0.0.1:1/send", {"X Bad": "a"}),
            HttpRequest("GET", "http://127.0.0.1:1/a b"),
            HttpRequest("G ET", "http://127.0.0.1:1/"),
        ],
        ids=["CR LF in a value", "space in a name", "space in the target", "space in the method"],
    )
    async def test_a_request_that_is_not_valid_http_is_not_sent(
        self, request_: HttpRequest
    ) -> None:
        """A CR LF in a header value (from a template or a credential) would start a header of
        its own; nothing is written, and the message does not quote the value."""
        async with make_client(timeout_seconds=5) as client:
            with pytest.raises(ProviderUnavailable) as caught:
                await send(client, request_)
        assert "prov: the request is not valid HTTP/1.1" == str(caught.value)


def _dribbler(data: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A server that answers every request with ``data``, one byte per write."""

    async def serve(stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                received = await stream.receive_some(65536)
                if not received:
                    return
                buffer += received
            buffer = buffer.split(b"\r\n\r\n", 1)[1]
            for index in range(len(data)):
                await stream.send_all(data[index : index + 1])
                await trio.sleep(0.0005)  # one byte per segment, mostly

    return serve


# ---------------------------------------------------------------- TLS
def _certificates(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA (its PEM file) and a server context with a leaf it signed for 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cascadegw test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain_file, key_file = directory / "server.pem", directory / "server.key"
    chain_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(chain_file, key_file)
    server.set_alpn_protocols(["h2", "http/1.1"])
    return ca_file, server


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    return _certificates(tmp_path)


class TestTls:
    async def test_https_trusting_ssl_cert_file(
        self, tls: tuple[Path, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ca_file, server_context = tls
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        async with (
            local_server(answer(200, BODY), ssl_context=server_context) as server,
            make_client(timeout_seconds=5) as client,
        ):
            assert server.url.startswith("https://")
            for _ in range(2):
                assert BODY == (await send(client, get(server.url))).content
        # one connection, and HTTP/1.1 although the server would have spoken h2
        assert (1, ["http/1.1"]) == (server.connections, server.alpn)

    async def test_an_untrusted_certificate_is_refused(
        self, tls: tuple[Path, ssl.SSLContext], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, server_context = tls
        (tmp_path / "other").mkdir()
        other_ca, _ = _certificates(tmp_path / "other")
        monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
        async with (
            local_server(answer(), ssl_context=server_context) as server,
            make_client(timeout_seconds=5) as client,
        ):
            with pytest.raises(ProviderUnavailable, match=r"TLS handshake with 127\.0\.0\.1:"):
                await send(client, get(server.url))
        assert [] == server.calls


# ---------------------------------------------------------------- the status mapping on top
@pytest.mark.parametrize(
    ("status", "headers", "expected", "retry_after_seconds"),
    [
        (429, {"Retry-After": "7"}, RateLimited, 7.0),
        (429, {}, RateLimited, None),
        (503, {"Retry-After": "2"}, ProviderUnavailable, 2.0),
        (500, {}, ProviderUnavailable, None),
        (408, {}, ProviderUnavailable, None),
        (401, {}, AuthRejected, None),
        (403, {}, AuthRejected, None),
        (400, {}, InvalidRequest, None),
    ],
)
async def test_status_mapping_over_the_wire(
    status: int,
    headers: dict[str, str],
    expected: type[ProviderError],
    retry_after_seconds: float | None,
) -> None:
    async with (
        local_server(answer(status, b"", headers)) as server,
        make_client(timeout_seconds=5) as client,
    ):
        response = await send(client, get(server.url))
    error = error_for_status(PROVIDER, response)
    assert (type(error), error.status_code, error.retry_after_seconds) == (
        expected,
        status,
        retry_after_seconds,
    )
    assert f"prov: HTTP {status}" == str(error)
