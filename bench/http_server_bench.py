"""Server CPU per webhook-shaped POST: hypercorn + Starlette against the lean server.

Each server runs in a subprocess of its own with the same handler (read the body, answer "ok"),
each behind the bounds the gateway puts in front of it (``gateway.http.limits`` for the ASGI
stack, ``gateway.httpserver.Limits`` for the lean one). This process sends both the same load:
``--requests`` POSTs of a SendGrid-sized signed event batch over ``--connections`` keep-alive
connections, after a warm-up. The figure is the server process's user + system CPU time
(``/proc/<pid>/stat``) over the measured requests, divided by their number.

    .venv/bin/python bench/http_server_bench.py [--requests 10000] [--connections 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
TICK_MICROSECONDS = 1_000_000 / os.sysconf("SC_CLK_TCK")
BODY = (
    b'[{"email":"ann@example.com","event":"delivered","timestamp":1764950400,'
    b'"sg_event_id":"ZGVsaXZlcmVkLTAtMjQ4NTI5MjctTG5lQ3p3","sg_message_id":"14c5d75ce93.dfd.6'
    b'4b469.filter0001.16648.5515E0B88.0","smtp-id":"<14c5d75ce93.dfd.64b469@ismtpd-555>",'
    b'"response":"250 2.0.0 OK","ip":"127.0.0.1","cgw_key":"acme:m-000001"}]'
) * 3
HEADERS = {
    "Content-Type": "application/json",
    "User-Agent": "SendGrid Event API",
    "X-Twilio-Email-Event-Webhook-Signature": "MEUCIQC" + "A" * 88,
    "X-Twilio-Email-Event-Webhook-Timestamp": "1764950400",
}
SERVERS = ("hypercorn+starlette", "lean")


# ---------------------------------------------------------------- the servers (subprocesses)
async def serve_lean(port_file: Path) -> None:
    from gateway.httpserver import Limits, Request, Response, Route, Router, Server, text_response

    async def webhook(request: Request) -> Response:
        assert request.body
        return text_response("ok")

    router = Router([Route("POST", "/webhooks/{provider}", webhook, max_body_bytes=1 << 20)])
    server = Server(router, Limits(read_timeout_seconds=10.0))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve, "127.0.0.1:0")
        await trio.Path(port_file).write_text(url.rsplit(":", 1)[1])


async def serve_asgi(port_file: Path) -> None:
    import hypercorn.config
    import hypercorn.trio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from gateway.http.limits import Limits

    async def webhook(request: Request) -> Response:
        assert await request.body()
        return Response("ok")

    app = Limits(
        Starlette(routes=[Route("/webhooks/{provider}", webhook, methods=["POST"])]),
        body_limit=lambda _: 1 << 20,
        read_timeout_seconds=10.0,
        max_concurrent_requests=1000,
    )
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.read_timeout = 10
    config.keep_alive_timeout = 10.0
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn.trio.serve, app, config)
        await trio.Path(port_file).write_text(binds[0].rsplit(":", 1)[1])


# ---------------------------------------------------------------- the load (this process)
def cpu_microseconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_MICROSECONDS  # utime, stime


async def load(port: int, requests: int, connections: int) -> None:
    """``requests`` POSTs over ``connections`` keep-alive connections, each answered 200."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30
    ) as http:

        async def worker(count: int) -> None:
            for _ in range(count):
                response = await http.post("/webhooks/email1", content=BODY, headers=HEADERS)
                assert response.status_code == 200, response.status_code

        async with trio.open_nursery() as nursery:
            for index in range(connections):
                share = requests // connections + (index < requests % connections)
                nursery.start_soon(worker, share)


def measure(kind: str, requests: int, connections: int) -> float:
    """Server CPU µs per request for the server ``kind``."""
    with tempfile.TemporaryDirectory() as scratch:
        port_file = Path(scratch) / "port"
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--port-file", str(port_file)],
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {kind} server did not start")
                time.sleep(0.05)  # a poll interval while the subprocess starts
            port = int(port_file.read_text())
            trio.run(load, port, max(requests // 10, connections), connections)  # warm-up
            before = cpu_microseconds(server.pid)
            trio.run(load, port, requests, connections)
            return (cpu_microseconds(server.pid) - before) / requests
        finally:
            server.terminate()
            server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description="server CPU per webhook POST, two servers")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve = serve_lean if args.serve == "lean" else serve_asgi
        trio.run(serve, args.port_file)
        return
    print(
        f"server CPU per webhook POST ({len(BODY)}-byte body, {args.requests} requests over "
        f"{args.connections} keep-alive connections)"
    )
    for kind in SERVERS:
        print(f"  {kind:<20} {measure(kind, args.requests, args.connections):7.0f} µs")


if __name__ == "__main__":
    main()
