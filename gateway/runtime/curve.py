"""Who is on the other end of a ZeroMQ socket: CURVE keys, a ZAP handler, tenants per key.

With ``ingest.curve_secret_key`` set, the ROUTER (requests) and XPUB (status events) sockets
are CURVE servers. Every handshake is put to the ZAP handler here (RFC 27/ZAP), which admits
a client only if some tenant lists its public key in ``client_keys`` and hands libzmq the key
as the connection's User-Id. Each message then carries it, so ingest knows which tenants the
sender may act for, and the publisher which tenants a subscriber may see.

Without a secret key nothing is authenticated (the embedded default, on loopback only: the
config refuses anything else).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import structlog
import trio
import zmq
import zmq.utils.z85

from gateway.config import GatewayConfig
from gateway.runtime import zmqio

log = structlog.get_logger("gateway.curve")

ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
ZAP_DOMAIN: Final = b"cascadegw"

Principals = Mapping[str, frozenset[str]]
"""Client public key (z85) -> the tenants it may act for."""


def principals(config: GatewayConfig) -> Principals | None:
    """Tenants per client key, or None when CURVE is off."""
    if config.ingest.curve_secret_key is None:
        return None
    tenants: dict[str, set[str]] = {}
    for name, tenant in config.tenants.items():
        for key in tenant.client_keys:
            tenants.setdefault(key, set()).add(name)
    return {key: frozenset(names) for key, names in tenants.items()}


SUBSCRIBE: Final = 1
UNSUBSCRIBE: Final = 0


def subscription(
    data: bytes, key: str | None, principals: Principals | None, tenants: frozenset[bytes]
) -> tuple[int, list[bytes]] | None:
    """What one XPUB subscription message may change: ``(zmq.SUBSCRIBE or zmq.UNSUBSCRIBE,
    topics)``, or None for a message that is not a subscription.

    A topic is everything ("") or one of ``tenants``: libzmq keeps each subscriber's topics in
    a trie, which a flood of made-up topics would grow until the process ran out of memory.
    Without CURVE (``principals`` None) that is all. With it, ``key`` is the subscriber's
    (None for libzmq's own messages, e.g. a departed subscriber's unsubscriptions) and only
    its tenants pass: everything means every tenant it may see, and a tenant it may not see
    gives no topics (refused).
    """
    if not data or data[0] not in (SUBSCRIBE, UNSUBSCRIBE):
        return None
    option = zmq.SUBSCRIBE if data[0] == SUBSCRIBE else zmq.UNSUBSCRIBE
    topic = data[1:]
    if topic and topic not in tenants:
        return option, []
    if principals is None:
        return option, [topic]
    allowed = principals.get(key, frozenset()) if key is not None else frozenset()
    if not topic:
        return option, [tenant.encode() for tenant in sorted(allowed)]
    if topic.decode(errors="replace") in allowed:
        return option, [topic]
    return option, []


def user_id(frame: zmq.Frame) -> str | None:
    """The client key the ZAP handler gave the connection a frame came on (None: no metadata,
    as on libzmq's own messages)."""
    try:
        key = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return key if isinstance(key, str) else None


def make_server(sock: zmq.Socket[bytes], secret_key: str) -> None:
    """Make ``sock`` a CURVE server whose handshakes the ZAP handler must approve."""
    sock.curve_secretkey = secret_key.encode()
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN
    # no ZAP handler must mean "refuse", never "allow" (libzmq's default is to allow)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def open_zap_socket(context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    """Bind the ZAP endpoint; must happen before any CURVE server socket binds."""
    sock: zmq.Socket[bytes] = context.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(ZAP_ENDPOINT)
    return sock


def zap_reply(request: list[bytes], known: Principals) -> list[bytes]:
    """The ZAP reply to one request: 200 with the key as User-Id, or 400."""
    version, request_id = request[0], request[1]
    mechanism = request[5] if len(request) > 5 else b""
    credentials = request[6:]
    if mechanism == b"CURVE" and credentials and len(credentials[0]) == 32:
        key = zmq.utils.z85.encode(credentials[0]).decode()
        if key in known:
            return [version, request_id, b"200", b"OK", key.encode(), b""]
    return [version, request_id, b"400", b"unknown client key", b"", b""]


async def serve_zap(
    sock: zmq.Socket[bytes],
    known: Principals,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ZAP requests for as long as the gateway runs (one task owns the REP socket)."""
    try:
        task_status.started()
        while True:
            request = await zmqio.recv_multipart(sock)
            reply = zap_reply(request, known)
            if reply[2] != b"200":
                log.warning("zeromq_client_refused", reason="unknown client key")
            sock.send_multipart(reply)
    finally:
        zmqio.close(sock)
