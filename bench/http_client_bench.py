"""Client CPU per provider request: httpx (as the adapters configured it) against our pool.

The server runs in a separate process (started here), answering every request with the same
small JSON body over keep-alive, so the CPU measured in this process is the client's alone:
building the request, sending it, parsing the answer, and the pool's bookkeeping. Run it on
an otherwise quiet machine::

    .venv/bin/python bench/http_client_bench.py [--requests 3000] [--rounds 3]

It prints a table of process CPU microseconds per request (median of the rounds) and the
requests per second, at each concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Final

import httpx
import trio

from adapters._transport import ConnectionPool, HttpRequest

CONCURRENCIES: Final = (1, 16, 64)
ANSWER: Final = b'{"name":"projects/bench/messages/0123456789"}'
PAYLOAD: Final = (
    b'{"message":{"token":"bench-token-0123456789","notification":{"title":"Sale","body":'
    b'"Up to 50% off"},"data":{"cgw_key":"acme:0123456789"},"android":{"priority":"NORMAL"}}}'
)
HEADERS: Final = {"Authorization": "Bearer bench.token", "Content-Type": "application/json"}
TIMEOUT_SECONDS: Final = 10.0


# ---------------------------------------------------------------- the server process
class _Answering(asyncio.Protocol):
    """Answers each complete request (head + Content-Length body) with ``ANSWER``."""

    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
        + ANSWER
    )

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = 0
            if at >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end >= 0 else None])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            assert self.transport is not None
            self.transport.write(self.response)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Answering, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- the clients
def make_httpx_client(*, timeout_seconds: float, max_connections: int) -> httpx.AsyncClient:
    """The adapters' httpx client as ``adapters._http.make_client`` built it before the pool."""
    return httpx.AsyncClient(
        http2=False,
        timeout=httpx.Timeout(timeout_seconds),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        headers={"User-Agent": "cascadegw/0.1"},
    )


async def _drive(
    send_one: Callable[[], Awaitable[int]], *, concurrency: int, requests: int
) -> None:
    per_task = requests // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            status = await send_one()
            assert status == 200, status

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)


def _measure(client_name: str, url: str, *, concurrency: int, requests: int) -> tuple[float, float]:
    """(CPU microseconds per request, requests per second) of one run."""
    result: list[tuple[float, float]] = []

    async def main() -> None:
        if client_name == "httpx":
            async with make_httpx_client(
                timeout_seconds=TIMEOUT_SECONDS, max_connections=concurrency
            ) as http:

                async def send_httpx() -> int:
                    request = httpx.Request("POST", url, headers=HEADERS, content=PAYLOAD)
                    return (await http.send(request)).status_code

                result.append(await _timed(send_httpx, concurrency, requests))
        else:
            async with ConnectionPool(
                timeout_seconds=TIMEOUT_SECONDS, max_connections=concurrency
            ) as pool:

                async def send_pool() -> int:
                    request = HttpRequest("POST", url, HEADERS, PAYLOAD)
                    return (await pool.send(request)).status_code

                result.append(await _timed(send_pool, concurrency, requests))

    trio.run(main)
    return result[0]


async def _timed(
    send_one: Callable[[], Awaitable[int]], concurrency: int, requests: int
) -> tuple[float, float]:
    # warm up: open the connections and fill caches before counting
    await _drive(send_one, concurrency=concurrency, requests=concurrency * 20)
    done = (requests // concurrency) * concurrency
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    await _drive(send_one, concurrency=concurrency, requests=requests)
    cpu_seconds = time.process_time() - cpu_start
    wall_seconds = time.perf_counter() - wall_start
    return cpu_seconds / done * 1e6, done / wall_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="per round and concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve())
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/v1/projects/bench/messages:send"
        rows: list[str] = []
        for concurrency in CONCURRENCIES:
            cells = []
            for client_name in ("httpx", "pool"):
                runs = [
                    _measure(client_name, url, concurrency=concurrency, requests=args.requests)
                    for _ in range(args.rounds)
                ]
                cpu = statistics.median(r[0] for r in runs)
                rate = statistics.median(r[1] for r in runs)
                cells.append(f"{cpu:9.0f} µs {rate:8.0f}/s")
            rows.append(f"{concurrency:>11} | " + " | ".join(cells))
        print(f"client CPU per request, median of {args.rounds} rounds of {args.requests}")
        print(f"{'concurrency':>11} | {'httpx':^22} | {'adapters pool':^22}")
        print("\n".join(rows))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
