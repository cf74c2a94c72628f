"""ZeroMQ under trio: the few rules that make pyzmq safe without an event-loop integration.

pyzmq has no trio support, and ``socket.FD`` is edge-triggered: it signals "the mailbox
changed", not "a message is readable" (docs/architecture.md, "Pitfalls"). So, for every socket here:

1. exactly one task owns it and is the only one to send, receive or read ``EVENTS`` on it;
2. after every wake-up the owner drains while ``EVENTS & POLLIN`` (up to a budget, then
   ``checkpoint()`` for fairness) and re-reads ``EVENTS`` after its last send before it parks;
3. only then does it park in ``wait_readable(fd)``;
4. ``notify_closing(fd)`` before the socket closes, so a parked waiter is woken, not stranded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import zmq


def readable(sock: zmq.Socket[bytes]) -> bool:
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def fd(sock: zmq.Socket[bytes]) -> int:
    return int(sock.getsockopt(zmq.FD))


async def wait_readable(sock: zmq.Socket[bytes]) -> None:
    """Park until the socket's mailbox changes; the caller re-checks ``readable`` after."""
    await trio.lowlevel.wait_readable(fd(sock))


async def recv_multipart(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Receive one multipart message, parking as needed (for sockets with a single reader)."""
    while not readable(sock):
        await wait_readable(sock)
    return sock.recv_multipart(zmq.NOBLOCK)


async def send_multipart(sock: zmq.Socket[bytes], parts: list[bytes]) -> None:
    """Send, waiting for room at the high-water mark instead of blocking the thread."""
    while True:
        try:
            sock.send_multipart(parts, zmq.NOBLOCK)
            return
        except zmq.Again:
            await trio.sleep(0.001)


def close(sock: zmq.Socket[bytes]) -> None:
    if sock.closed:
        return
    trio.lowlevel.notify_closing(fd(sock))
    sock.close(linger=0)


@asynccontextmanager
async def open_socket(
    context: zmq.Context[zmq.Socket[bytes]],
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    options: dict[int, int] | None = None,
) -> AsyncIterator[zmq.Socket[bytes]]:
    sock: zmq.Socket[bytes] = context.socket(kind)
    try:
        for option, value in (options or {}).items():
            sock.setsockopt(option, value)
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
        yield sock
    finally:
        close(sock)


def bound_endpoint(sock: zmq.Socket[bytes]) -> str:
    """The endpoint a socket actually bound (resolves ``tcp://127.0.0.1:*``)."""
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
