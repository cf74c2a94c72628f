"""The lean HTTP server (gateway/httpserver.py) over real sockets, on virtual time.

The clients are raw trio sockets: most of what is tested here (pipelining, dribbled headers, a
client that never reads) is what a well-behaved client library will not do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
import structlog.testing
import trio
import trio.testing

from gateway.httpserver import (
    Limits,
    Request,
    Response,
    Route,
    Router,
    Server,
    json_response,
    text_response,
)
from tests.support import wait_for

TIMEOUT_SECONDS = 5.0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # local sockets deliver in microseconds: 10 ms of real idleness means everyone waits on time
    return trio.testing.MockClock(autojump_threshold=0.01)


@dataclass
class Served:
    server: Server
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.host, self.port)


async def echo(request: Request) -> Response:
    return json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "params": dict(request.params),
            "body": request.body.decode(),
            "header": request.headers.get("x-test", ""),
        }
    )


def routes(*extra: Route) -> Router:
    return Router(
        [
            Route("GET", "/t/c/{token}", echo),
            Route("GET", "/t/o/{token}.gif", echo),
            Route("POST", "/webhooks/{provider}", echo, max_body_bytes=1000),
            Route("POST", "/small", echo),
            Route("GET", "/healthz", echo),
            *extra,
        ]
    )


@asynccontextmanager
async def serving(router: Router, **limits: object) -> AsyncIterator[Served]:
    settings = Limits(
        **{"read_timeout_seconds": TIMEOUT_SECONDS, "max_body_bytes": 100, **limits}  # type: ignore[arg-type]
    )
    server = Server(router, settings, name="test")
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve, "127.0.0.1:0")
        host, port = url.removeprefix("http://").split(":")
        yield Served(server, host, int(port))
        nursery.cancel_scope.cancel()


async def read_response(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes, bytes]:
    """One response from ``stream`` (status, head, body); ``buffer`` keeps what follows it."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(bytes(buffer))
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    buffer[:] = rest
    while len(buffer) < length:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(bytes(buffer))
        buffer += data
    body = bytes(buffer[:length])
    del buffer[:length]
    return int(head.split(b" ")[1]), head, body


async def closed(stream: trio.SocketStream) -> bool:
    """Whether the server closed ``stream`` (EOF, or a reset) with nothing more to say."""
    try:
        return await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True


class TestRouting:
    async def test_patterns_params_methods_and_misses(self, clock: trio.testing.MockClock) -> None:
        async with serving(routes()) as served, httpx.AsyncClient(base_url=served.url) as http:
            click = await http.get("/t/c/abc%2Ddef?x=1", headers={"X-Test": "yes"})
            pixel = await http.get("/t/o/tok.gif")
            webhook = await http.post("/webhooks/email1", content=b"[1]")
            missing = await http.get("/t/x/abc")
            wrong_method = await http.post("/t/c/abc")
            head = await http.head("/t/c/abc")
        assert 200 == click.status_code
        assert {
            "method": "GET",
            "path": "/t/c/abc-def",
            "query": "x=1",
            "params": {"token": "abc-def"},
            "body": "",
            "header": "yes",
        } == click.json()
        assert {"token": "tok"} == pixel.json()["params"]
        assert ({"provider": "email1"}, "[1]") == (
            webhook.json()["params"],
            webhook.json()["body"],
        )
        assert (404, "Not Found") == (missing.status_code, missing.text)
        assert (405, "Method Not Allowed") == (wrong_method.status_code, wrong_method.text)
        assert 200 == head.status_code
        assert b"" == head.content
        assert int(head.headers["content-length"]) > 0

    def test_a_route_twice_is_refused(self) -> None:
        with pytest.raises(ValueError, match="routed twice"):
            Router([Route("GET", "/a/{x}", echo), Route("GET", "/a/{x}", echo)])


class TestConnections:
    async def test_keep_alive_serves_two_requests_on_one_connection(
        self, clock: trio.testing.MockClock
    ) -> None:
        async with serving(routes()) as served:
            stream = await served.connect()
            buffer = bytearray()
            await stream.send_all(b"GET /t/c/one HTTP/1.1\r\nHost: t\r\n\r\n")
            first = await read_response(stream, buffer)
            await stream.send_all(b"GET /t/c/two HTTP/1.1\r\nHost: t\r\n\r\n")
            second = await read_response(stream, buffer)
            connections = served.server.connections
            await stream.aclose()
        assert (200, 200) == (first[0], second[0])
        assert b'"token":"one"' in first[2]
        assert b'"token":"two"' in second[2]
        assert 1 == connections

    async def test_pipelined_requests_are_answered_in_order(
        self, clock: trio.testing.MockClock
    ) -> None:
        async def slow(request: Request) -> Response:
            await trio.sleep(1.0)  # the first one takes longest: order is not finishing order
            return await echo(request)

        async with serving(routes(Route("GET", "/slow/{token}", slow))) as served:
            stream = await served.connect()
            await stream.send_all(
                b"GET /slow/1 HTTP/1.1\r\nHost: t\r\n\r\n"
                b"POST /webhooks/p2 HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
                b"GET /t/c/3 HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            buffer = bytearray()
            answers = [await read_response(stream, buffer) for _ in range(3)]
            await stream.aclose()
        assert [200, 200, 200] == [status for status, _, _ in answers]
        assert b'"token":"1"' in answers[0][2]
        assert b'"provider":"p2"' in answers[1][2]
        assert b'"body":"hi"' in answers[1][2]
        assert b'"token":"3"' in answers[2][2]

    async def test_a_client_expecting_100_continue_is_told_to_send_its_body(
        self, clock: trio.testing.MockClock
    ) -> None:
        async with serving(routes()) as served:
            stream = await served.connect()
            await stream.send_all(
                b"POST /small HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            buffer = bytearray()
            go_on = await read_response(stream, buffer)
            await stream.send_all(b"ok")
            answer = await read_response(stream, buffer)
            await stream.aclose()
        assert 100 == go_on[0]
        assert (200, True) == (answer[0], b'"body":"ok"' in answer[2])

    async def test_cancelling_the_server_closes_its_connections(
        self, clock: trio.testing.MockClock
    ) -> None:
        async with trio.open_nursery() as nursery:
            server = Server(routes(), Limits(read_timeout_seconds=TIMEOUT_SECONDS))
            url = await nursery.start(server.serve, "127.0.0.1:0")
            host, port = url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            await wait_for(lambda: server.connections == 1)
            nursery.cancel_scope.cancel()
        assert await closed(stream)
        await stream.aclose()


class TestLimits:
    async def test_a_declared_body_over_the_limit_is_413_before_it_is_read(
        self, clock: trio.testing.MockClock
    ) -> None:
        async with serving(routes()) as served:
            stream = await served.connect()
            # nothing of the body is sent: the answer cannot have waited for it
            await stream.send_all(
                b"POST /webhooks/e HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n"
            )
            status, head, body = await read_response(stream, bytearray())
            await stream.aclose()
        assert 413 == status
        assert b"body over the 1000-byte limit" == body
        assert b"connection: close" in head.lower()

    async def test_a_chunked_body_growing_past_the_limit_is_413(
        self, clock: trio.testing.MockClock
    ) -> None:
        async with serving(routes()) as served:
            stream = await served.connect()
            await stream.send_all(
                b"POST /small HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"40\r\n"
                + b"x" * 64
                + b"\r\n" * 1
                + b"40\r\n"
                + b"x" * 64
                + b"\r\n"
            )
            status, _, body = await read_response(stream, bytearray())
            await stream.aclose()
        assert 413 == status
        assert b"body over the 100-byte limit" == body

    async def test_a_body_at_the_limit_is_served(self, clock: trio.testing.MockClock) -> None:
        async with serving(routes()) as served, httpx.AsyncClient(base_url=served.url) as http:
            response = await http.post("/small", content=b"y" * 100)
        assert 200 == response.status_code

    async def test_oversized_headers_are_431(self, clock: trio.testing.MockClock) -> None:
        async with serving(routes(), max_header_bytes=4096) as served:
            stream = await served.connect()
            await stream.send_all(
                b"GET /t/c/a HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
            )
            status, _, body = await read_response(stream, bytearray())
            await stream.aclose()
        assert 431 == status
        assert b"request headers too large" == body

    async def test_a_malformed_request_is_400(self, clock: trio.testing.MockClock) -> None:
        async with serving(routes()) as served:
            stream = await served.connect()
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            status, _, body = await read_response(stream, bytearray())
            gone = await closed(stream)
            await stream.aclose()
        assert (400, b"malformed request") == (status, body)
        assert gone

    async def test_dribbled_headers_get_408_and_a_close_after_the_read_timeout(
        self, clock: trio.testing.MockClock
    ) -> None:
        async with serving(routes()) as served:
            stream = await served.connect()
            started = trio.current_time()
            answer = bytearray()

            async def dribble() -> None:
                for byte in b"GET /t/c/slow HTTP/1.1\r\nHost: t\r\n":
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.5)  # a byte every half second: never a whole head

            async with trio.open_nursery() as nursery:
                nursery.start_soon(dribble)
                status, _, body = await read_response(stream, answer)
                nursery.cancel_scope.cancel()
            elapsed = trio.current_time() - started
            gone = await closed(stream)
            await stream.aclose()
        assert (408, b"the request did not arrive in time") == (status, body)
        assert TIMEOUT_SECONDS <= elapsed < TIMEOUT_SECONDS + 1
        assert gone

    async def test_a_stalled_body_gets_408(self, clock: trio.testing.MockClock) -> None:
        async with serving(routes()) as served:
            stream = await served.connect()
            await stream.send_all(b"POST /small HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n{")
            status, _, _ = await read_response(stream, bytearray())
            await stream.aclose()
        assert 408 == status

    async def test_an_idle_keep_alive_connection_is_closed_without_an_answer(
        self, clock: trio.testing.MockClock
    ) -> None:
        async with serving(routes()) as served:
            stream = await served.connect()
            started = trio.current_time()
            gone = await closed(stream)
            elapsed = trio.current_time() - started
            await stream.aclose()
        assert gone
        assert TIMEOUT_SECONDS <= elapsed < TIMEOUT_SECONDS + 1

    async def test_connections_past_the_cap_get_503(self, clock: trio.testing.MockClock) -> None:
        async with serving(routes(), max_connections=2) as served:
            held = [await served.connect(), await served.connect()]
            await wait_for(lambda: served.server.connections == 2)
            extra = await served.connect()
            await extra.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, body = await read_response(extra, bytearray())
            await extra.aclose()
            await held.pop().aclose()
            await wait_for(lambda: served.server.connections == 1)
            async with httpx.AsyncClient(base_url=served.url) as http:
                again = await http.get("/t/c/a")
            for stream in held:
                await stream.aclose()
        assert (503, b"too many connections, retry later") == (status, body)
        assert 200 == again.status_code

    async def test_requests_past_the_cap_get_503_but_health_answers(
        self, clock: trio.testing.MockClock
    ) -> None:
        release = trio.Event()
        entered = trio.Event()

        async def blocked(_: Request) -> Response:
            entered.set()
            await release.wait()
            return text_response("done")

        router = routes(Route("GET", "/blocked", blocked))
        async with (
            serving(router, max_concurrent_requests=1) as served,
            httpx.AsyncClient(base_url=served.url, timeout=1e6) as http,
            trio.open_nursery() as nursery,
        ):
            first: list[httpx.Response] = []

            async def hold() -> None:
                first.append(await http.get("/blocked"))

            nursery.start_soon(hold)
            await entered.wait()
            refused = await http.get("/t/c/a")
            health = await http.get("/healthz")
            release.set()
            await wait_for(lambda: bool(first))
            after = await http.get("/t/c/a")
        assert 503 == refused.status_code
        assert "too many requests at once, retry later" == refused.text
        assert 200 == health.status_code
        assert (200, "done") == (first[0].status_code, first[0].text)
        assert 200 == after.status_code

    async def test_a_client_that_never_reads_is_cut_off(
        self, clock: trio.testing.MockClock
    ) -> None:
        async def big(_: Request) -> Response:
            return Response(200, b"z" * (32 * 1024 * 1024))

        async with serving(routes(Route("GET", "/big", big))) as served:
            sock = trio.socket.socket()
            # a tiny receive window and no reads: the response can never be sent in full
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 1024)
            await sock.connect((served.host, served.port))
            await sock.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            await wait_for(lambda: served.server.connections == 1)
            started = trio.current_time()
            await wait_for(lambda: served.server.connections == 0, timeout_seconds=60)
            elapsed = trio.current_time() - started
            sock.close()
        assert TIMEOUT_SECONDS <= elapsed < TIMEOUT_SECONDS + 2


class TestErrors:
    async def test_a_failing_handler_is_500_and_logged_without_the_request(
        self, clock: trio.testing.MockClock
    ) -> None:
        async def broken(request: Request) -> Response:
            raise RuntimeError(f"failed for {request.params['token']}")

        router = routes(Route("GET", "/t/u/{token}", broken))
        async with serving(router) as served, httpx.AsyncClient(base_url=served.url) as http:
            with structlog.testing.capture_logs() as logs:
                failed = await http.get("/t/u/secret-token-person@example.com")
            still = await http.get("/t/c/a")
        assert 500 == failed.status_code
        assert "internal error" == failed.text
        (entry,) = [e for e in logs if e["event"] == "http_handler_failed"]
        assert ("RuntimeError", "/t/u/{token}", "GET") == (
            entry["error"],
            entry["route"],
            entry["method"],
        )
        assert "secret-token" not in repr(logs)
        assert 200 == still.status_code
