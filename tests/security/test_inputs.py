"""No input exhausts the gateway: bounded bodies, parts, read time and schedules.

The gateway runs as a real process (``cascadegw run``) so its memory can be read from /proc
while it is attacked.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
import trio.testing
import zmq

from gateway.app import open_gateway
from gateway.client import open_client, open_subscription
from gateway.core.model import Channel
from tests.e2e.processes import GatewayProcess, edge_pids, rss_bytes_of, standalone_config
from tests.support import NOON_UTC, in_test_providers, make_config, promo

MIB = 1024 * 1024
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
READ_TIMEOUT_SECONDS = 2


@asynccontextmanager
async def gateway_process(
    tmp_path: Path, *, ingest_extra: str = ""
) -> AsyncIterator[tuple[GatewayProcess, str, str]]:
    """The running gateway, its ZeroMQ endpoint and its public (webhooks, links) URL."""
    path, http_url, ingest, public_url = standalone_config(
        tmp_path,
        store_extra="create = true",
        http_extra=f"read_timeout_seconds = {READ_TIMEOUT_SECONDS}",
        ingest_extra=ingest_extra,
    )
    process = GatewayProcess(path, {}, http_url)
    await process.start()
    try:
        yield process, ingest, public_url
    finally:
        await process.stop()


def pid_of(process: GatewayProcess) -> int:
    assert process.process is not None
    return process.process.pid


# the request line and headers of a large body, per server: a forged provider webhook on the
# public server (its limit: webhook_max_body_bytes), a consent write on the admin server
BIG_BODY = {
    "public": (
        "POST /webhooks/email1 HTTP/1.1\r\nHost: gateway\r\n"
        "X-Twilio-Email-Event-Webhook-Signature: Zm9yZ2Vk\r\n"
        "X-Twilio-Email-Event-Webhook-Timestamp: 1\r\n"
    ),
    "admin": "PUT /v1/recipients/acme/r1/consents HTTP/1.1\r\nHost: gateway\r\n",
}


def url_of(server: str, process: GatewayProcess, public_url: str) -> str:
    return public_url if server == "public" else process.http_url


async def post_until_answered(
    http_url: str, *, chunked: bool, total_bytes: int, head: str = BIG_BODY["public"]
) -> tuple[bytes, int]:
    """Stream a body of ``total_bytes`` after ``head``; stop as soon as the gateway answers.

    Returns the status line and how many body bytes were sent before the answer.
    """
    host, port = http_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total_bytes}"
    await stream.send_all(f"{head}{length}\r\n\r\n".encode())
    chunk = b"[" + b" " * (64 * 1024 - 2) + b"]"
    answer = b""
    sent = 0
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            nonlocal answer
            while b"\r\n" not in answer:
                data = await stream.receive_some(4096)
                if not data:
                    break
                answer += data
            answered.set()
            nursery.cancel_scope.cancel()

        answered = trio.Event()
        nursery.start_soon(read)
        try:
            while sent < total_bytes:
                piece = (b"%x\r\n" % len(chunk)) + chunk + b"\r\n" if chunked else chunk
                await stream.send_all(piece)
                sent += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the gateway closed the connection after answering
        await answered.wait()
    await stream.aclose()
    return answer.split(b"\r\n")[0], sent


# both HTTP servers keep the same promises: the public one (webhooks, tracking links) on the
# lean server (gateway.httpserver), the admin one behind gateway.http.limits
SERVERS = pytest.mark.parametrize("server", ["public", "admin"])


class TestHttpBodies:
    @SERVERS
    @pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
    async def test_a_300_mb_body_is_refused_while_read(
        self, server: str, chunked: bool, tmp_path: Path
    ) -> None:
        async with gateway_process(tmp_path) as (process, _, public_url):
            url = url_of(server, process, public_url)
            before = rss_bytes_of(pid_of(process))
            peaks = PeakRss(pid_of(process))  # the peak while it is read, not what is left
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(trio.to_thread.run_sync, peaks.sample, abandon_on_cancel=True)
                )
                status, sent = await post_until_answered(
                    url, chunked=chunked, total_bytes=300 * MIB, head=BIG_BODY[server]
                )
                peaks.stop()
            growth = peaks.router_peak - before
            async with httpx.AsyncClient() as http:
                health = await http.get(f"{url}/healthz")
        assert status.startswith(b"HTTP/1.1 413")
        assert sent < 16 * MIB  # answered long before the body was through
        assert growth < 50 * MIB
        assert 200 == health.status_code

    @SERVERS
    async def test_stalled_bodies_are_closed_and_health_stays_fast(
        self, server: str, tmp_path: Path
    ) -> None:
        async with gateway_process(tmp_path) as (process, _, public_url):
            url = url_of(server, process, public_url)
            host, port = url.removeprefix("http://").split(":")
            stalled = []
            for _ in range(300):
                stream = await trio.open_tcp_stream(host, int(port))
                await stream.send_all(
                    BIG_BODY[server].encode()
                    + b"Content-Length: 10000\r\n\r\n{"  # under both limits
                )
                stalled.append(stream)
            async with httpx.AsyncClient() as http:
                started = trio.current_time()
                health = await http.get(f"{url}/healthz")
                health_seconds = trio.current_time() - started
            answers: list[bytes] = []
            with trio.fail_after(READ_TIMEOUT_SECONDS + 20):
                for stream in stalled:
                    # "HTTP/1.1 408", without the reason phrase, which is the server's choice
                    answers.append((await stream.receive_some(64))[:12])
                    await stream.aclose()
        assert 200 == health.status_code
        assert health_seconds < 1.0
        # each stalled body got a 408, or the connection was closed under it
        assert set(answers) <= {b"HTTP/1.1 408", b""}
        # mostly 408s; on the admin server hypercorn's own read timeout (as long) may close a
        # connection first when the machine is loaded (seen: 250 of 300 in a full suite run)
        assert answers.count(b"HTTP/1.1 408") > 150


def reply_to(sock: zmq.Socket[bytes], correlation: bytes) -> list[list[bytes]]:
    """Every message received until the reply carrying ``correlation`` (blocking, bounded)."""
    received: list[list[bytes]] = []
    while sock.poll(30_000):
        parts = sock.recv_multipart()
        received.append(parts)
        if parts[0] == correlation:
            return received
    raise AssertionError("no reply")


def _sample(metrics: str, name: str) -> float:
    """One sample's value from a /metrics page (0 when absent)."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _status_port(process: GatewayProcess) -> int:
    """The status (XPUB) port from the gateway's config file."""
    text = process.config_path.read_text()
    return int(text.split('status_bind = "tcp://127.0.0.1:', 1)[1].split('"', 1)[0])


def status_request(correlation: bytes) -> list[bytes]:
    request = {"v": 1, "op": "status", "id": "nope", "tenant": "acme"}
    return [correlation, msgpack.packb(request)]


def address_space_cap(pid: int) -> int:
    """The process's RLIMIT_AS soft limit, in bytes (from /proc, as set by the process)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            return int(line.split()[3])
    raise AssertionError("no address space limit line")


def mapped_bytes(pid: int) -> int:
    """The process's address space now (VmSize)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[0]) * PAGE_BYTES


class PeakRss:
    """Samples the resident memory of the router and its edge every few milliseconds (in a
    thread) for as long as it runs: peaks, not the after-the-fact figure a release hides."""

    def __init__(self, router_pid: int) -> None:
        self.router_pid = router_pid
        self.router_peak = 0
        self.edge_peak = 0
        self.edges_seen: set[int] = set()
        self._stop = False

    def sample(self) -> None:
        while not self._stop:
            self.router_peak = max(self.router_peak, rss_bytes_of(self.router_pid))
            for pid in edge_pids(self.router_pid):
                self.edges_seen.add(pid)
                # one that died under the attack (and was restarted) had its peak read
                with contextlib.suppress(OSError, ValueError):
                    self.edge_peak = max(self.edge_peak, rss_bytes_of(pid))
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop = True


EDGE_CAP_BYTES = 64 * MIB


async def attack(ingest: str, router: int, parts: list[bytes]) -> tuple[list[list[bytes]], PeakRss]:
    """Send ``parts`` as one message, then a status request on the same connection, sampling
    the processes' memory throughout. Returns every message received until that request's
    reply (an echo of the attack would come before it, in order) and the peaks."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ingest)
    peaks = PeakRss(router)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(trio.to_thread.run_sync, peaks.sample, abandon_on_cancel=True)
            )
            await trio.to_thread.run_sync(sock.send_multipart, parts)
            sock.send_multipart(status_request(b"after"))
            received = await trio.to_thread.run_sync(reply_to, sock, b"after")
            peaks.stop()
    finally:
        sock.close(linger=0)
        context.term()
    return received, peaks


class TestZeroMqMessages:
    async def test_1500_parts_are_dropped_unanswered_and_bounded(self, tmp_path: Path) -> None:
        """libzmq assembles a multipart message whole before anyone reads it; the edge process
        holding the public socket is capped, so 1.5 GB of parts never reach the router."""
        async with gateway_process(
            tmp_path, ingest_extra=f"edge_memory_bytes = {EDGE_CAP_BYTES}"
        ) as (process, ingest, _):
            router = pid_of(process)
            (edge,) = edge_pids(router)
            cap = address_space_cap(edge)
            mapped = mapped_bytes(edge)
            router_before = rss_bytes_of(router)
            payload = msgpack.packb({"v": 1, "op": "status", "id": "m", "tenant": "acme"})
            received, peaks = await attack(ingest, router, [b"x" * MIB] * 1500 + [payload])
        assert [b"after"] == [parts[0] for parts in received]
        # the edge's cap: what it mapped once serving (~100-220 MB, most of it never
        # resident; it may unmap some later, so today's mapping is only a lower bound) plus
        # edge_memory_bytes
        assert mapped <= cap < 300 * MIB + EDGE_CAP_BYTES
        assert peaks.edge_peak <= cap
        assert peaks.edge_peak < 300 * MIB  # against 1.5 GB unbounded
        assert peaks.router_peak - router_before < 50 * MIB

    @pytest.mark.parametrize("payload_mib", [0, 5], ids=["small-payload", "oversize-payload"])
    async def test_big_envelope_frames_are_dropped_at_the_edge(
        self, payload_mib: int, tmp_path: Path
    ) -> None:
        """Correlation frames are echoed with the reply, so their bytes are bounded too: seven
        of 30 MiB never reach the router, whether the edge or the router would answer."""
        async with gateway_process(tmp_path) as (process, ingest, _):
            router = pid_of(process)
            router_before = rss_bytes_of(router)
            payload = status_request(b"big")[1] + b" " * (payload_mib * MIB)
            received, peaks = await attack(ingest, router, [b"x" * (30 * MIB)] * 7 + [payload])
        assert [b"after"] == [parts[0] for parts in received]  # nothing echoed before it
        assert peaks.router_peak - router_before < 50 * MIB

    async def test_a_subscription_flood_never_reaches_requests(self, tmp_path: Path) -> None:
        """libzmq keeps every subscription it reads in a trie before anyone can refuse it, so
        a flood of made-up topics can run the status edge out of memory. It is its own
        process: requests go on, and subscribers get events again once it is restarted."""
        async with gateway_process(tmp_path) as (process, ingest, _):
            status_endpoint = ingest.rsplit(":", 1)[0] + ":" + str(_status_port(process))
            context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            flood: zmq.Socket[bytes] = context.socket(zmq.XSUB)
            flood.setsockopt(zmq.LINGER, 0)
            flood.connect(status_endpoint)
            sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ingest)
            answered = 0
            for chunk in range(60):
                for n in range(chunk * 500, chunk * 500 + 500):
                    flood.send(b"\x01" + b"%08d" % n + b"t" * 1000)
                sock.send_multipart(status_request(b"during-%d" % chunk))
                received = await trio.to_thread.run_sync(reply_to, sock, b"during-%d" % chunk)
                answered += received[-1][0] == b"during-%d" % chunk
                await trio.sleep(0.02)
            flood.close(linger=0)
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"{process.http_url}/metrics")).text
            # a subscriber after the flood gets events (the status edge restarted if it died)
            async with (
                open_subscription(status_endpoint, "acme") as events,
                open_client(ingest, timeout_seconds=30) as client,
            ):
                with trio.fail_after(60):
                    seen = None
                    while seen is None:
                        await client.send(promo(f"after-{trio.current_time()}"))
                        with trio.move_on_after(1):
                            seen = await events.receive()
            sock.close(linger=0)
            context.term()
        assert 60 == answered
        assert 'gateway_process_restarts_total{process="zeromq_edge"} 0.0' in metrics
        assert _sample(metrics, 'gateway_status_subscriptions_total{verdict="refused"}') > 0
        assert "acme" == seen["tenant"]

    async def test_clients_that_never_read_cannot_wedge_the_edge(self, tmp_path: Path) -> None:
        """Connections pipelining frames of 1,000 invalid requests (each answered with ~69 KB)
        and never reading make the edge hold their replies. Near its cap it was seen to hang
        for good, serving nobody; now it drops them or exits and is restarted, and a client
        that reads is served again soon after."""
        async with gateway_process(
            tmp_path, ingest_extra=f"edge_memory_bytes = {EDGE_CAP_BYTES}"
        ) as (process, ingest, _):
            context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            hogs = []
            garbage = b"\xdc" + (1000).to_bytes(2, "big") + b"\xc0" * 1000
            for _ in range(4):
                hog: zmq.Socket[bytes] = context.socket(zmq.DEALER)
                hog.setsockopt(zmq.LINGER, 0)
                hog.setsockopt(zmq.SNDHWM, 0)
                # read nothing, ever: libzmq would otherwise take 1,000 replies off the wire
                hog.setsockopt(zmq.RCVHWM, 1)
                hog.setsockopt(zmq.RCVBUF, 4096)
                hog.setsockopt(zmq.RECONNECT_IVL, 60_000)  # dropped: gone for good
                hog.connect(ingest)
                hogs.append(hog)
            for hog in hogs:
                for _ in range(300):
                    hog.send(garbage)
            restarts = 'gateway_process_restarts_total{process="zeromq_edge"}'
            async with httpx.AsyncClient() as http:
                with trio.fail_after(120):  # the router answered every hog frame, or the edge died
                    while True:
                        metrics = (await http.get(f"{process.http_url}/metrics")).text
                        if _sample(metrics, "gateway_frames_total") >= 1200:
                            break
                        if _sample(metrics, restarts) >= 1:
                            break
                        await trio.sleep(0.2)
            answered = False
            with trio.move_on_after(30):
                while not answered:
                    probe: zmq.Socket[bytes] = context.socket(zmq.DEALER)
                    probe.setsockopt(zmq.LINGER, 0)
                    probe.connect(ingest)
                    probe.send_multipart(status_request(b"probe"))
                    answered = await trio.to_thread.run_sync(probe.poll, 3000) != 0
                    probe.close(linger=0)
            (edge,) = edge_pids(pid_of(process))
            edge_rss = rss_bytes_of(edge)
            for sock in hogs:
                sock.close(linger=0)
            context.term()
        assert answered
        assert edge_rss < 300 * MIB

    async def test_a_20_mib_frame_gets_an_invalid_answer(self, tmp_path: Path) -> None:
        async with gateway_process(tmp_path) as (_, ingest, _):
            context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ingest)
            sock.send_multipart([b"big", b"\x91" + b"\xc0" * (20 * MIB)])
            received = await trio.to_thread.run_sync(reply_to, sock, b"big")
            sock.close(linger=0)
            context.term()
        (reply,) = msgpack.unpackb(received[-1][1])  # a batch: a list back, even now
        assert ("rejected", "invalid") == (reply["status"], reply["reason"])
        assert "limit" in reply["detail"]


class TestSchedules:
    """A send may not wait longer than ``ingest.max_schedule_ahead_seconds`` (30 days)."""

    @pytest.mark.parametrize(
        ("field", "moment"),
        [
            ("send_at", datetime(9999, 1, 1, tzinfo=UTC)),
            ("expires_at", datetime(9999, 12, 31, tzinfo=UTC)),
            ("send_at", datetime.fromtimestamp(NOON_UTC + 31 * 86400, UTC)),
        ],
        ids=["send_at-9999", "expires_at-9999", "send_at-31-days"],
    )
    async def test_too_far_ahead_is_invalid(
        self, field: str, moment: datetime, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        async with (
            open_gateway(config, adapters=in_test_providers(config), wall_at_start=NOON_UTC) as gw,
            open_client(gw.ingest_endpoint, timeout_seconds=1e6) as client,
        ):
            far: dict[str, Any] = {field: moment}
            refused = await client.send(promo("far", **far))
            near = await client.send(
                promo("near", send_at=datetime.fromtimestamp(NOON_UTC + 29 * 86400, UTC))
            )
        assert ("rejected", "invalid") == (refused["status"], refused["reason"])
        assert f"`$.{field}`" in refused["detail"]
        assert "accepted" == near["status"]


class TestSlowReaders:
    async def test_a_client_that_never_reads_its_response_gives_its_slot_back(
        self, tmp_path: Path
    ) -> None:
        path, http_url, _, _ = standalone_config(
            tmp_path,
            store_extra="create = true",
            http_extra=f"read_timeout_seconds = {READ_TIMEOUT_SECONDS}\nmax_concurrent_requests = 10",
        )
        process = GatewayProcess(path, {}, http_url)
        await process.start()
        try:
            host, port = http_url.removeprefix("http://").split(":")
            hogs = []
            for _ in range(10):
                sock = trio.socket.socket()
                # a tiny receive window and no reads: the response can never be sent in full
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 1024)
                await sock.connect((host, int(port)))
                await sock.send(b"GET /metrics HTTP/1.1\r\nHost: g\r\n\r\n")
                hogs.append(sock)
            async with httpx.AsyncClient() as http:
                health = await http.get(f"{http_url}/healthz")  # never counted against the cap
                with trio.fail_after(READ_TIMEOUT_SECONDS + 20):
                    while True:  # served again once the hogs are cut off
                        page = await http.get(f"{http_url}/readyz")
                        probe = await http.get(f"{http_url}/v1/messages/acme/nope")
                        if probe.status_code != 503:
                            break
                        await trio.sleep(0.2)
            for sock in hogs:
                sock.close()
        finally:
            await process.stop()
        assert 200 == health.status_code
        assert 200 == page.status_code
        assert 404 == probe.status_code  # no such message: served


class TestTrackingRepeats:
    async def test_hammering_a_link_is_counted_not_journalled(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        async with (
            open_gateway(config, adapters=in_test_providers(config), wall_at_start=NOON_UTC) as gw,
            open_client(gw.ingest_endpoint, timeout_seconds=1e6) as client,
        ):
            await client.send(promo("m1", channels=["email"]))
            url = gw.links.click_url(
                "acme:m1", Channel.EMAIL, "https://shop.example", now=gw.clock.now()
            )
            # not httpx's 5 s: on the MockClock one jump can pass it with a request in flight
            async with httpx.AsyncClient(timeout=1e6) as http:
                for _ in range(50):
                    hit = await http.get(gw.public_http_url + "/t/c/" + url.rsplit("/", 1)[1])
                    assert 302 == hit.status_code
            status = await client.status("m1", "acme")
            repeats = gw.registry.get_sample_value(
                "gateway_tracking_requests_total", {"kind": "click", "verdict": "repeat"}
            )
        kinds = [event["kind"] for event in status["message"]["timeline"]]
        assert 1 == kinds.count("clicked")
        assert 49 == repeats
