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
