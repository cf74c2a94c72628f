"""The ZeroMQ edge: the process CRMs connect to, so that what they send never grows the router.

libzmq assembles a multipart message whole before the application can read any part of it, and
has no limit on the number of parts (only on bytes per part): one client could make the process
holding the socket allocate 1,500 parts of a MiB before a line of ours runs. ``cascadegw run``
therefore keeps the public sockets (``ingest.bind``, ``ingest.status_bind``) in this small
process, with its address space capped at what it uses once serving plus
``ingest.edge_memory_bytes``. A message that would outgrow the cap fails its allocation: libzmq
drops that client's connection (or, when the failing allocation is one of its small ones, the
process aborts; the router's supervisor starts it again and clients reconnect by themselves).
The router, which holds the state, never sees it.

The edge terminates CURVE (it runs the ZAP handler, ``gateway.runtime.curve``), drops messages
with more parts than any client needs, answers frames over ``ingest.max_frame_bytes`` itself
(so the router never holds them either) and relays the rest. It keeps no state and does no I/O
but ZeroMQ, so it is a plain blocking ``zmq.Poller`` loop, not a trio program.

Between edge and router, over ipc in the journal's private directory: the edge's DEALER to the
router's ROUTER. Every message from the edge starts with a note frame, a kind byte and its
detail:

- ``r`` + the client's key (z85; empty without CURVE), then ``[client, *envelope, payload]``: a
  request for the router to decide;
- ``a``, then ``[client, *envelope, reply]``: a frame answered here (too large); the router
  sends the reply in its turn among that client's replies, which leave in arrival order;
- ``d``/``p``/``s`` + a label: a dropped message, a dropped reply, a subscription verdict, for
  the router's metrics (``gateway.runtime.labels``).

The router answers ``[client, *envelope, reply]`` and the edge routes it back. Status events go
from the router's XPUB to the edge's XSUB and out of the public XPUB, which applies each
subscriber's allowed topics (``curve.subscription``); the edge subscribes upstream to the
tenants somebody subscribed to, so the router sends nothing while nobody listens.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from typing import Final

import structlog
import zmq

from gateway.config import GatewayConfig, bind_error, bind_holder, load_config
from gateway.orphans import die_with_parent
from gateway.protocol import Result, decode_frame, encode_reply
from gateway.runtime import curve
from gateway.runtime.curve import Principals
from gateway.runtime.labels import IngestDrop, ReplyDrop
from gateway.runtime.logging import configure_logging

log = structlog.get_logger("gateway.edge")

REQUEST: Final = b"r"
ANSWERED: Final = b"a"
INGEST_DROP: Final = b"d"
REPLY_DROP: Final = b"p"
SUBSCRIPTION: Final = b"s"

REQUESTS_ENV: Final = "CASCADEGW_EDGE_REQUESTS"
"""The router's internal ROUTER endpoint the edge connects its DEALER to."""
STATUS_ENV: Final = "CASCADEGW_EDGE_STATUS"
"""The router's internal XPUB endpoint the edge subscribes to."""
REPORT_FD_ENV: Final = "CASCADEGW_REPORT_FD"
LOG_LEVEL_ENV: Final = "CASCADEGW_LOG_LEVEL"
SERVING: Final = "serving"
"""The report line's first word once both public sockets listen; their endpoints follow."""

LINK_TOPIC: Final = b"\x00edge"
"""The edge's subscription upstream as soon as it starts (see ``main``)."""

_DRAIN_BUDGET: Final = 1000
"""Messages relayed per socket per wake-up, so one busy direction cannot starve the other."""


INTERNAL_HWM: Final = 256
"""Messages queued on each end of the edge-router link. Every frame is bounded by
``ingest.max_frame_bytes`` before it leaves the edge, so the bytes waiting for the router are
bounded too (and the router's own queue from the edge with them)."""


class Edge:
    """The relay between the public sockets and the router's internal ones."""

    def __init__(
        self,
        *,
        public: zmq.Socket[bytes],
        back: zmq.Socket[bytes],
        xpub: zmq.Socket[bytes],
        xsub: zmq.Socket[bytes],
        zap: zmq.Socket[bytes] | None,
        config: GatewayConfig,
        principals: Principals | None,
    ) -> None:
        self.public = public
        self.back = back
        self.xpub = xpub
        self.xsub = xsub
        self.zap = zap
        self.principals = principals
        self.max_frame_bytes = config.ingest.max_frame_bytes
        self.max_batch = config.ingest.max_batch
        self.most_parts = config.ingest.max_envelope_parts + 2  # identity, envelope, payload
        self.upstream: set[bytes] = set()
        """Topics the edge subscribed to at the router."""

    def run(self) -> None:
        """Relay until the process is terminated."""
        poller = zmq.Poller()
        for sock in (self.public, self.back, self.xpub, self.xsub):
            poller.register(sock, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap, zmq.POLLIN)
        stalled = False
        while True:
            ready = dict(poller.poll())
            if self.zap is not None and self.zap in ready:
                self._answer_zap()
            if ready.get(self.back, 0) & zmq.POLLIN:
                self._relay_replies()
            if ready.get(self.back, 0) & zmq.POLLOUT or self.public in ready:
                # read clients only while the router can take more: what waits, waits in
                # libzmq's bounded queues, not in ours
                now_stalled = not self._relay_requests()
                if now_stalled != stalled:  # the poller rebuilds its lists on every change
                    stalled = now_stalled
                    poller.modify(self.public, 0 if stalled else zmq.POLLIN)
                    poller.modify(self.back, zmq.POLLIN | (zmq.POLLOUT if stalled else 0))
            if self.xpub in ready:
                self._subscriptions()
            if self.xsub in ready:
                self._relay_events()

    def _writable(self, sock: zmq.Socket[bytes]) -> bool:
        return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLOUT)

    def _readable(self, sock: zmq.Socket[bytes]) -> bool:
        return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def _relay_requests(self) -> bool:
        """Relay what clients sent; False when the router's queue is full (resume on POLLOUT)."""
        public, back = self.public, self.back
        for _ in range(_DRAIN_BUDGET):
            if not self._readable(public):
                return True
            if not self._writable(back):
                return False
            first = public.recv(zmq.NOBLOCK, copy=False)
            parts = [first]
            count = 1
            while public.getsockopt(zmq.RCVMORE):
                count += 1
                part = public.recv(zmq.NOBLOCK, copy=False)
                if count <= self.most_parts:
                    parts.append(part)
            if count > self.most_parts:
                log.warning("frame_dropped", reason=IngestDrop.TOO_MANY_PARTS.value, parts=count)
                self._note(INGEST_DROP, IngestDrop.TOO_MANY_PARTS)
                continue
            if count < 2:
                continue  # a ROUTER always prepends the identity: nothing to answer
            payload = parts[-1]
            if len(payload) > self.max_frame_bytes:
                frame = decode_frame(
                    payload.buffer, max_frame_bytes=self.max_frame_bytes, max_batch=self.max_batch
                )
                # a frame refused for its size decodes to refusals only
                refusals = [item for item in frame.items if isinstance(item, Result)]
                reply = encode_reply(frame.batch, refusals)
                back.send_multipart([ANSWERED, *parts[:-1], reply], zmq.NOBLOCK, copy=False)
                continue
            key = curve.user_id(first) if self.principals is not None else None
            note = REQUEST + (key or "").encode()
            back.send_multipart([note, *parts], zmq.NOBLOCK, copy=False)
        return True

    def _relay_replies(self) -> None:
        back, public = self.back, self.public
        for _ in range(_DRAIN_BUDGET):
            if not self._readable(back):
                return
            parts = back.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                public.send_multipart(parts, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                reason = (
                    ReplyDrop.PEER_GONE if exc.errno == zmq.EHOSTUNREACH else ReplyDrop.PEER_FULL
                )
                log.warning("reply_dropped", reason=reason.value)
                self._note(REPLY_DROP, reason)

    def _subscriptions(self) -> None:
        xpub = self.xpub
        while self._readable(xpub):
            message = xpub.recv(zmq.NOBLOCK, copy=False)
            key = curve.user_id(message) if self.principals is not None else None
            change = curve.subscription(message.bytes, key, self.principals)
            if change is None:
                continue
            option, topics = change
            if option == zmq.SUBSCRIBE:
                self._note(SUBSCRIPTION, "accepted" if topics else "refused")
                if not topics:
                    log.warning("subscription_refused")
            for topic in topics:
                xpub.setsockopt(option, topic)  # XPUB_MANUAL: for the subscriber just read
                if option == zmq.SUBSCRIBE and topic not in self.upstream:
                    self._subscribe_upstream(topic)

    def _subscribe_upstream(self, topic: bytes) -> None:
        """Have the router send this tenant's events (every tenant's, for ""): it then sends
        only tenants somebody here listens to. Never undone: which subscriber an
        unsubscription came from is libzmq's secret, and a client must not be able to stop
        another's events; the set is bounded by the tenants."""
        self.upstream.add(topic)
        self.xsub.send(bytes([curve.SUBSCRIBE]) + topic)

    def _relay_events(self) -> None:
        xsub, xpub = self.xsub, self.xpub
        for _ in range(_DRAIN_BUDGET):
            if not self._readable(xsub):
                return
            # XPUB drops at a subscriber's high-water mark instead of blocking
            xpub.send_multipart(xsub.recv_multipart(zmq.NOBLOCK, copy=False), copy=False)

    def _answer_zap(self) -> None:
        zap, principals = self.zap, self.principals
        assert zap is not None
        assert principals is not None
        while self._readable(zap):
            reply = curve.zap_reply(zap.recv_multipart(zmq.NOBLOCK), principals)
            if reply[2] != b"200":
                log.warning("zeromq_client_refused", reason="unknown client key")
            zap.send_multipart(reply)

    def _note(self, kind: bytes, label: str) -> None:
        # a count lost while the router is this busy: the log line stands
        with contextlib.suppress(zmq.Again):
            self.back.send(kind + label.encode(), zmq.NOBLOCK)


def cap_address_space(extra_bytes: int) -> int:
    """Cap this process's address space at what it maps now plus ``extra_bytes``; the cap."""
    with open("/proc/self/statm", "rb") as statm:
        pages = int(statm.read().split()[0])
    cap = pages * os.sysconf("SC_PAGE_SIZE") + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


def _report(line: str) -> None:
    fd = os.environ.get(REPORT_FD_ENV)
    if fd is not None:
        os.write(int(fd), line.replace("\n", " ").encode() + b"\n")


def _bind(config: GatewayConfig, sock: zmq.Socket[bytes], key: str, address: str) -> str:
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        holder = bind_holder(config, key, address)
        _report(str(bind_error(key, address, exc.errno, exc.strerror, holder=holder)))
        raise SystemExit(2) from exc
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)


def main() -> None:
    # Ctrl-C reaches the whole process group: the edge keeps relaying the router's last
    # replies while it drains, and is terminated by its supervisor after
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()  # an orphan would hold the ports the restarted gateway needs
    configure_logging(level=os.environ.get(LOG_LEVEL_ENV, "info"))
    with open(os.environ["CASCADEGW_CONFIG"], "rb") as file:
        config = load_config(file.read(), os.environ)
    ingest = config.ingest
    principals = curve.principals(config)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    zap = curve.open_zap_socket(context) if principals is not None else None
    public: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    xpub: zmq.Socket[bytes] = context.socket(zmq.XPUB)
    back: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    xsub: zmq.Socket[bytes] = context.socket(zmq.XSUB)
    for sock in (public, xpub, back, xsub):
        sock.setsockopt(zmq.LINGER, 0)
    public.setsockopt(zmq.ROUTER_MANDATORY, 1)  # else replies to vanished peers vanish silently
    public.setsockopt(zmq.RCVHWM, 1_000)
    public.setsockopt(zmq.SNDHWM, 1_000)
    # bytes per part: bigger frames up to this get an `invalid` reply; past it libzmq drops
    # the connection (it cannot answer what it refused)
    public.setsockopt(zmq.MAXMSGSIZE, 8 * ingest.max_frame_bytes)
    xpub.setsockopt(zmq.SNDHWM, 100_000)
    xpub.setsockopt(zmq.XPUB_MANUAL, 1)
    xpub.setsockopt(zmq.MAXMSGSIZE, 4096)
    for sock in (back, xsub):  # the router binds once the edge serves: link up soon after
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
    back.setsockopt(zmq.SNDHWM, INTERNAL_HWM)
    back.setsockopt(zmq.RCVHWM, INTERNAL_HWM)
    if ingest.curve_secret_key is not None:
        curve.make_server(public, ingest.curve_secret_key.reveal())
        curve.make_server(xpub, ingest.curve_secret_key.reveal())
    ingest_endpoint = _bind(config, public, "ingest.bind", ingest.bind)
    status_endpoint = _bind(config, xpub, "ingest.status_bind", ingest.status_bind)
    back.connect(os.environ[REQUESTS_ENV])
    xsub.connect(os.environ[STATUS_ENV])
    # the link's sign of life for the router, which waits for a subscription before it takes
    # requests; no event's topic (a tenant name) starts with this byte, so it matches none
    xsub.send(bytes([curve.SUBSCRIBE]) + LINK_TOPIC)
    cap = cap_address_space(ingest.edge_memory_bytes)
    log.info("edge_serving", ingest=ingest_endpoint, status=status_endpoint, memory_cap=cap)
    _report(f"{SERVING} {ingest_endpoint} {status_endpoint}")
    Edge(
        public=public,
        back=back,
        xpub=xpub,
        xsub=xsub,
        zap=zap,
        config=config,
        principals=principals,
    ).run()


if __name__ == "__main__":
    main()
