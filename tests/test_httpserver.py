"""The lean HTTP server (gateway/httpserver.py) over real sockets, on virtual time.

The clients are raw trio sockets: most of what is tested here (pipelining, dribbled headers, a
client that never reads) is what a well-behaved client library will not do.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

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
    body_budget,
    connection_cap,
    json_response,
    reason,
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
        assert b"HTTP/1.1 100 Continue" == go_on[1]
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


class TestFraming:
    async def test_content_length_with_transfer_encoding_is_400_and_closed(
        self, clock: trio.testing.MockClock
    ) -> None:
        async with serving(routes()) as served:
            stream = await served.connect()
            # framed by Transfer-Encoding, the GET after "0" would run as a second request
            await stream.send_all(
                b"POST /webhooks/e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /t/c/smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            buffer = bytearray()
            status, head, body = await read_response(stream, buffer)
            while not await closed(stream):
                pass  # whatever else arrives must not be a second answer
            await stream.aclose()
        assert (400, b"both Content-Length and Transfer-Encoding") == (status, body)
        assert b"connection: close" in head.lower()
        assert b"" == bytes(buffer)

    async def test_every_answer_carries_its_standard_reason_phrase(
        self, clock: trio.testing.MockClock
    ) -> None:
        async def teapot(_: Request) -> Response:
            return text_response("short and stout", 418)

        async def bad_gateway(_: Request) -> Response:
            return text_response("upstream", 502)

        router = routes(Route("GET", "/teapot", teapot), Route("GET", "/502", bad_gateway))
        async with serving(router) as served:
            heads = []
            for request in (
                b"GET /teapot HTTP/1.1\r\nHost: t\r\n\r\n",
                b"GET /502 HTTP/1.1\r\nHost: t\r\n\r\n",
                # h11 answers these itself: an unsupported and a repeated transfer coding
                b"POST /small HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                b"POST /small HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n",
            ):
                stream = await served.connect()
                await stream.send_all(request)
                heads.append((await read_response(stream, bytearray()))[1].split(b"\r\n")[0])
                await stream.aclose()
        assert [
            b"HTTP/1.1 418 I'm a Teapot",
            b"HTTP/1.1 502 Bad Gateway",
            b"HTTP/1.1 501 Not Implemented",
            b"HTTP/1.1 501 Not Implemented",
        ] == heads

    def test_no_status_goes_without_a_reason_phrase(self) -> None:
        assert all(reason(status) for status in range(100, 600))
        assert b"Content Too Large" == reason(413)


class TestWorkPerBody:
    """The parsing a body costs is bounded by the route's limit, not by its decoded size."""

    async def test_a_body_in_too_many_chunks_is_cut_off_before_it_is_whole(
        self, clock: trio.testing.MockClock
    ) -> None:
        pieces, _ = body_budget(1000)
        async with serving(routes()) as served:
            stream = await served.connect()
            # 1-byte chunks: 200 bytes of body, far under the route's 1000, and no end sent;
            # before the cap this waited for the rest (408 after the read timeout)
            await stream.send_all(
                b"POST /webhooks/e HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"1\r\nX\r\n" * (pieces + 1)
            )
            status, head, body = await read_response(stream, bytearray())
            await stream.aclose()
        assert 67 == pieces
        assert (400, f"body in over {pieces} pieces".encode()) == (status, body)
        assert b"connection: close" in head.lower()

    async def test_a_body_at_the_piece_budget_is_served(
        self, clock: trio.testing.MockClock
    ) -> None:
        pieces, _ = body_budget(1000)
        async with serving(routes()) as served:
            stream = await served.connect()
            await stream.send_all(
                b"POST /webhooks/e HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"1\r\nX\r\n" * pieces
                + b"0\r\n\r\n"
            )
            status, _, body = await read_response(stream, bytearray())
            await stream.aclose()
        assert 200 == status
        assert b'"body":"' + b"X" * pieces + b'"' in body

    async def test_a_body_whose_framing_outweighs_it_is_cut_off_by_wire_bytes(
        self, clock: trio.testing.MockClock
    ) -> None:
        _, wire = body_budget(1000)
        extension = b";" + b"e" * 8000  # 8 KB of chunk extension per byte of body
        # bytes that came with the head are not counted: at most one read (64 KiB) more
        chunks = (wire + 64 * 1024) // len(extension) + 1
        async with serving(routes()) as served:
            stream = await served.connect()
            await stream.send_all(
                b"POST /webhooks/e HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + (b"1" + extension + b"\r\nX\r\n") * chunks
            )
            status, _, body = await read_response(stream, bytearray())
            await stream.aclose()
        assert chunks < body_budget(1000)[0]  # the piece budget alone would let it through
        assert (413, f"body over {wire} bytes on the wire".encode()) == (status, body)


_FD_SERVER = """
import resource, sys, trio
from gateway.httpserver import Limits, Route, Router, Server, fit_connections_to_fd_limit
from gateway.httpserver import text_response

limit, wanted = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
cap = fit_connections_to_fd_limit(wanted, name="fd")

async def ok(_):
    return text_response("ok")

async def main():
    server = Server(
        Router([Route("GET", "/", ok)]),
        Limits(max_connections=cap, read_timeout_seconds=120.0),
        name="fd",
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve, "127.0.0.1:0")
        print("serving", url.rsplit(":", 1)[1], cap, flush=True)

trio.run(main)
"""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TestDescriptors:
    """The connection cap must answer before the process runs out of descriptors."""

    @pytest.mark.parametrize(
        ("wanted", "fd_limit", "cap"),
        [
            (2000, 1024, 768),  # the usual soft limit: 256 kept for the rest of the process
            (2000, 400, 200),  # a tiny limit keeps half
            (500, 1024, 500),  # room enough: the configured cap
            (2000, 4096, 2000),
            (2000, resource.RLIM_INFINITY, 2000),
            (10, 1, 1),  # never 0: the server still answers someone
        ],
    )
    def test_the_effective_cap_leaves_a_reserve(self, wanted: int, fd_limit: int, cap: int) -> None:
        assert cap == connection_cap(wanted, fd_limit)

    async def test_a_flood_past_a_low_fd_limit_gets_503s_not_accept_failures(
        self, tmp_path: Path
    ) -> None:
        # a real process at 128 descriptors asked for 1000 connections: it serves 64 and
        # refuses the rest, instead of running out of descriptors before the cap answers
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _FD_SERVER, "128", "1000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert process.stdout is not None
        output = bytearray()
        try:
            with trio.fail_after(60):
                while (started := re.search(rb"serving (\d+) (\d+)\n", output)) is None:
                    output += await process.stdout.receive_some()
            port, cap = int(started[1]), int(started[2])
            assert 64 == cap
            refused = 0
            with trio.fail_after(60):
                # the server holds the first 64 (idle, unanswered) and refuses the others
                streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(200)]

                async def answer_of(stream: trio.SocketStream) -> None:
                    nonlocal refused
                    status, _, _ = await read_response(stream, bytearray())
                    assert 503 == status
                    refused += 1

                async with trio.open_nursery() as nursery:
                    for stream in streams:
                        nursery.start_soon(answer_of, stream)
                    await wait_for(lambda: refused == 200 - 64, timeout_seconds=60)
                    nursery.cancel_scope.cancel()
                for stream in streams:
                    await stream.aclose()
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    after = await http.get("/")
        finally:
            process.kill()
            await process.wait()
            output += await process.stdout.receive_some() or b""
        assert 200 == after.status_code
        assert b"http_connection_cap_lowered" in output
        assert b"http_accept_failing" not in output
        assert b"Traceback" not in output

    async def test_accept_failures_are_logged_once_per_burst_and_retried_with_a_pause(
        self, clock: trio.testing.MockClock
    ) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        async with serving(routes()) as served:
            # the clients' descriptors exist before the limit drops; connecting needs no more
            clients = [trio.socket.socket() for _ in range(6)]
            with structlog.testing.capture_logs() as logs:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 2, hard))
                try:
                    for client in clients:
                        await client.connect((served.host, served.port))
                    await wait_for(lambda: served.server.accept_failures >= 1)
                    first_failure = trio.current_time()
                    await wait_for(lambda: served.server.accept_failures >= 8)
                    elapsed = trio.current_time() - first_failure
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                # the descriptors are back: the connections still waiting are accepted
                await wait_for(lambda: any(e["event"] == "http_accept_recovered" for e in logs))
            for client in clients:
                client.close()
        failing = [entry for entry in logs if entry["event"] == "http_accept_failing"]
        recovered = [entry for entry in logs if entry["event"] == "http_accept_recovered"]
        assert [("EMFILE", "warning")] == [(e["error"], e["log_level"]) for e in failing]
        assert not any("exc_info" in entry or "exception" in entry for entry in logs)
        assert 1 == len(recovered)
        assert recovered[0]["failures"] >= 8
        # pauses of 0.1, 0.2, 0.4, 0.8, 1, 1, 1 s between the first failure and the eighth
        assert elapsed >= 4.5


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
