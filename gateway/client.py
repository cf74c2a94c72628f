"""A small Python client for CRMs and load tests: sync (``Client``) and trio (``open_client``).

It deliberately encodes with the plain ``msgpack`` library, not msgspec, so every test that
uses it also proves the wire format is plain msgpack that any language's library can speak.

Each request travels as ``[correlation-id, payload]`` on a DEALER socket; the gateway echoes
the correlation frame, so many requests may be in flight at once.

    with Client("tcp://127.0.0.1:5555") as client:
        client.consent(tenant="demo", recipient_id="r1", kind="advertising", action="grant",
                       source="signup-form")
        result = client.send(send_request("m1", "demo", recipient={"id": "r1", "email": "a@b.c"},
                                          category="promo", content={"email": {...}}))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgpack
import trio
import zmq

PROTOCOL_VERSION = 1

Payload = dict[str, Any]


class ClientError(Exception):
    """The gateway did not answer in time, or answered something unreadable."""


def secure(
    sock: zmq.Socket[bytes],
    *,
    server_key: str | None,
    public_key: str | None,
    secret_key: str | None,
) -> None:
    """Make ``sock`` a CURVE client of a gateway whose public key is ``server_key``.

    ``public_key``/``secret_key`` are this client's pair (``cascadegw keys generate``); its
    tenant lists the public key in ``client_keys``. All None: a plain connection (a gateway
    on loopback without ``ingest.curve_secret_key``).
    """
    if server_key is None and public_key is None and secret_key is None:
        return
    if server_key is None or public_key is None or secret_key is None:
        raise ValueError("CURVE needs the server's public key and this client's key pair")
    sock.curve_serverkey = server_key.encode()
    sock.curve_publickey = public_key.encode()
    sock.curve_secretkey = secret_key.encode()


def rfc3339(moment: datetime) -> str:
    """A time as the protocol carries it: an RFC 3339 string in UTC."""
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return rfc3339(value)  # the protocol's times are strings, never msgpack timestamps
    raise TypeError(f"can't encode {type(value).__name__}")


def _pack(value: object) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


# ---------------------------------------------------------------- request builders
def send_request(
    message_id: str,
    tenant: str,
    *,
    recipient: Mapping[str, Any],
    category: str,
    content: Mapping[str, Any],
    **fields: Any,
) -> Payload:
    """A ``send`` map; extra keyword fields (topic, priority, channels, send_at, ...) pass through."""
    request: Payload = {
        "v": PROTOCOL_VERSION,
        "op": "send",
        "id": message_id,
        "tenant": tenant,
        "recipient": dict(recipient),
        "category": category,
        "content": dict(content),
    }
    request.update({key: value for key, value in fields.items() if value is not None})
    return request


def cancel_request(message_id: str, tenant: str, *, reason: str | None = None) -> Payload:
    request: Payload = {"v": PROTOCOL_VERSION, "op": "cancel", "id": message_id, "tenant": tenant}
    if reason is not None:
        request["reason"] = reason
    return request


def event_request(
    message_id: str,
    tenant: str,
    *,
    kind: str,
    channel: str | None = None,
    at: datetime | None = None,
) -> Payload:
    request: Payload = {
        "v": PROTOCOL_VERSION,
        "op": "event",
        "id": message_id,
        "tenant": tenant,
        "kind": kind,
    }
    if channel is not None:
        request["channel"] = channel
    if at is not None:
        request["at"] = rfc3339(at)
    return request


def consent_request(
    tenant: str,
    recipient_id: str,
    *,
    kind: str,
    action: str,
    source: str,
    channel: str | None = None,
    topic: str | None = None,
    reason: str | None = None,
    at: datetime | None = None,
) -> Payload:
    request: Payload = {
        "v": PROTOCOL_VERSION,
        "op": "consent",
        "tenant": tenant,
        "recipient_id": recipient_id,
        "kind": kind,
        "action": action,
        "source": source,
    }
    for key, value in (("channel", channel), ("topic", topic), ("reason", reason)):
        if value is not None:
            request[key] = value
    if at is not None:
        request["at"] = rfc3339(at)
    return request


def status_request(message_id: str, tenant: str) -> Payload:
    return {"v": PROTOCOL_VERSION, "op": "status", "id": message_id, "tenant": tenant}


# ---------------------------------------------------------------- sync client
class Client:
    """A blocking client over one DEALER socket."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_seconds: float = 10.0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        server_key: str | None = None,
        public_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.sock: zmq.Socket[bytes] = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self._keys = {"server_key": server_key, "public_key": public_key, "secret_key": secret_key}
        secure(self.sock, **self._keys)
        self.sock.connect(endpoint)
        self.timeout_seconds = timeout_seconds
        self._ids = itertools.count(1)

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, payload: Payload | Sequence[Payload]) -> Any:
        """Send one request map (or a list of them) and return the decoded reply."""
        return self.request_raw(_pack(payload))

    def request_raw(self, frame: bytes) -> Any:
        """Send an already-encoded frame; for interop and fuzz tests."""
        correlation = next(self._ids).to_bytes(8, "big")
        deadline_ms = int(self.timeout_seconds * 1000)
        # a DEALER with nowhere to send (e.g. after a refused CURVE handshake) would block
        # the send forever
        self.sock.setsockopt(zmq.SNDTIMEO, deadline_ms)
        try:
            self.sock.send_multipart([correlation, frame])
        except zmq.Again as exc:
            raise ClientError(
                f"could not send within {self.timeout_seconds} s (is the gateway reachable, "
                "and does it accept this client's CURVE key?)"
            ) from exc
        while self.sock.poll(deadline_ms, zmq.POLLIN):
            parts = self.sock.recv_multipart()
            if len(parts) == 2 and parts[0] == correlation:
                return _unpack(parts[1])
        raise ClientError(f"no reply within {self.timeout_seconds} s")

    def send(self, request: Payload) -> Any:
        return self.request(request)

    def send_batch(self, requests: Sequence[Payload]) -> list[Any]:
        result: list[Any] = self.request(list(requests))
        return result

    def cancel(self, message_id: str, tenant: str, *, reason: str | None = None) -> Any:
        return self.request(cancel_request(message_id, tenant, reason=reason))

    def event(self, message_id: str, tenant: str, *, kind: str, channel: str | None = None) -> Any:
        return self.request(event_request(message_id, tenant, kind=kind, channel=channel))

    def consent(self, tenant: str, recipient_id: str, **fields: Any) -> Any:
        return self.request(consent_request(tenant, recipient_id, **fields))

    def status(self, message_id: str, tenant: str) -> Any:
        return self.request(status_request(message_id, tenant))

    def subscribe(
        self, endpoint: str, tenant: str = "", *, timeout_seconds: float = 10.0
    ) -> Iterator[Any]:
        """Status events published for ``tenant`` ("" = every tenant), until the timeout passes quietly."""
        sub: zmq.Socket[bytes] = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        secure(sub, **self._keys)
        sub.setsockopt(zmq.SUBSCRIBE, tenant.encode())
        sub.connect(endpoint)
        try:
            while sub.poll(int(timeout_seconds * 1000), zmq.POLLIN):
                _, payload = sub.recv_multipart()
                yield from _unpack(payload)  # each PUB message carries a list of events
        finally:
            sub.close(linger=0)


# ---------------------------------------------------------------- trio client
class AsyncClient:
    """A trio client: many tasks may have requests in flight on its one socket.

    One reader task owns ``recv``; a sender wakes it after each send (a send may consume the
    edge the parked reader waits for, docs/architecture.md), so no reply is ever stranded.
    """

    def __init__(self, sock: zmq.Socket[bytes], *, timeout_seconds: float) -> None:
        self.sock = sock
        self.timeout_seconds = timeout_seconds
        self._ids = itertools.count(1)
        self._waiting: dict[bytes, trio.MemorySendChannel[bytes]] = {}
        self._reader_idle: trio.CancelScope | None = None

    async def request(self, payload: Payload | Sequence[Payload]) -> Any:
        return await self.request_raw(_pack(payload))

    async def request_raw(self, frame: bytes) -> Any:
        correlation = next(self._ids).to_bytes(8, "big")
        send, receive = trio.open_memory_channel[bytes](1)
        self._waiting[correlation] = send
        try:
            while True:
                try:
                    self.sock.send_multipart([correlation, frame], zmq.NOBLOCK)
                    break
                except zmq.Again:
                    await trio.sleep(0.001)
            self.wake_reader()
            with trio.fail_after(self.timeout_seconds):
                reply = await receive.receive()
        except trio.TooSlowError as exc:
            raise ClientError(f"no reply within {self.timeout_seconds} s") from exc
        finally:
            self._waiting.pop(correlation, None)
        return _unpack(reply)

    async def send(self, request: Payload) -> Any:
        return await self.request(request)

    async def send_batch(self, requests: Sequence[Payload]) -> list[Any]:
        result: list[Any] = await self.request(list(requests))
        return result

    async def cancel(self, message_id: str, tenant: str, *, reason: str | None = None) -> Any:
        return await self.request(cancel_request(message_id, tenant, reason=reason))

    async def event(
        self, message_id: str, tenant: str, *, kind: str, channel: str | None = None
    ) -> Any:
        return await self.request(event_request(message_id, tenant, kind=kind, channel=channel))

    async def consent(self, tenant: str, recipient_id: str, **fields: Any) -> Any:
        return await self.request(consent_request(tenant, recipient_id, **fields))

    async def status(self, message_id: str, tenant: str) -> Any:
        return await self.request(status_request(message_id, tenant))

    def wake_reader(self) -> None:
        """Tell the reader task to re-check the socket (after any send from another task)."""
        if self._reader_idle is not None:
            # once: trio's cancel() formats the current task's repr on every call
            self._reader_idle.cancel()
            self._reader_idle = None

    async def _read(self) -> None:
        sock = self.sock
        fd = int(sock.getsockopt(zmq.FD))
        while True:
            while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                parts = sock.recv_multipart(zmq.NOBLOCK)
                if len(parts) == 2:
                    waiter = self._waiting.get(parts[0])
                    if waiter is not None:
                        waiter.send_nowait(parts[1])
            with trio.CancelScope() as idle:
                self._reader_idle = idle
                await trio.lowlevel.wait_readable(fd)
            self._reader_idle = None


@asynccontextmanager
async def open_client(
    endpoint: str,
    *,
    timeout_seconds: float = 10.0,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    server_key: str | None = None,
    public_key: str | None = None,
    secret_key: str | None = None,
) -> AsyncIterator[AsyncClient]:
    """A trio client; the keys are as for ``secure``."""
    own = context is None
    ctx = context or zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure(sock, server_key=server_key, public_key=public_key, secret_key=secret_key)
    sock.connect(endpoint)
    client = AsyncClient(sock, timeout_seconds=timeout_seconds)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.notify_closing(int(sock.getsockopt(zmq.FD)))
        sock.close(linger=0)
        if own:
            ctx.term()


@asynccontextmanager
async def open_subscription(
    endpoint: str,
    tenant: str = "",
    *,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    server_key: str | None = None,
    public_key: str | None = None,
    secret_key: str | None = None,
) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    """Status events for ``tenant`` ("" = all the key may see) as a memory channel of maps.

    Topics match by prefix in ZeroMQ; the gateway refuses tenant names that prefix each other,
    so the subscription sees exactly one tenant's events.
    """
    own = context is None
    ctx = context or zmq.Context()
    sub: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    secure(sub, server_key=server_key, public_key=public_key, secret_key=secret_key)
    sub.setsockopt(zmq.SUBSCRIBE, tenant.encode())
    sub.connect(endpoint)
    send, receive = trio.open_memory_channel[Any](math.inf)

    async def pump() -> None:
        fd = int(sub.getsockopt(zmq.FD))
        while True:
            while int(sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                _, payload = sub.recv_multipart(zmq.NOBLOCK)
                for event in _unpack(payload):  # each PUB message carries a list of events
                    send.send_nowait(event)
            await trio.lowlevel.wait_readable(fd)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            try:
                yield receive
            finally:
                nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.notify_closing(int(sub.getsockopt(zmq.FD)))
        sub.close(linger=0)
        if own:
            ctx.term()
