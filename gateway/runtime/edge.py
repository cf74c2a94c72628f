"""The ZeroMQ edges: the processes CRMs connect to, so that what they send never grows the router.

libzmq assembles a multipart message whole before the application can read any part of it, and
has no limit on the number of parts (only on bytes per part): one client could make the process
holding the socket allocate 1,500 parts of a MiB before a line of ours runs. ``cascadegw run``
therefore keeps the public sockets in two small processes, ``python -m gateway.runtime.edge
requests`` (``ingest.bind``) and ``... status`` (``ingest.status_bind``), each with its address
space capped at what it uses once serving plus ``ingest.edge_memory_bytes``. A message that
would outgrow the cap fails its allocation: libzmq drops that client's connection (or, when the
failing allocation is one of its small ones, the process aborts; the router's supervisor starts
it again and clients reconnect by themselves). The router, which holds the state, never sees it.
Status has its own process because subscriptions are the one input libzmq keeps before anyone
can refuse it (see ``STATUS``).

The requests edge terminates CURVE (it runs a ZAP handler, ``gateway.runtime.curve``), drops
messages with more parts or more envelope bytes than any client needs, answers frames over
``ingest.max_frame_bytes`` itself (the router holds only the short answer, kept in the
client's order) and relays the rest.
An edge keeps no state and does no I/O but ZeroMQ, so it is a plain blocking ``zmq.Poller``
loop, not a trio program; it exits when its lifeline reads end of file (``gateway.orphans``).

Between an edge and the router, over ipc in the journal's private directory: the edge's DEALER
to the router's ROUTER (the status edge sends only counts on it). Every message from the edge starts with a note frame, a kind byte and its
detail:

- ``r`` + the client's key (z85; empty without CURVE), then ``[client, *envelope, payload]``: a
  request for the router to decide;
- ``a``, then ``[client, *envelope, reply]``: a frame answered here (too large); the router
  sends the reply in its turn among that client's replies, which leave in arrival order;
- ``d``/``p``/``s`` + ``label=count``: dropped messages, dropped replies, subscription
  verdicts, for the router's metrics (``gateway.runtime.labels``).

The router answers ``[client, *envelope, reply]`` and the edge routes it back. Status events go
from the router's XPUB to the status edge's XSUB and out of the public XPUB, which applies each
subscriber's allowed topics (``curve.subscription``); the edge subscribes upstream to the
tenants somebody subscribed to, so the router sends nothing while nobody listens.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import Final

import structlog
import zmq

from gateway.clock import perf_seconds
from gateway.config import GatewayConfig, bind_error, bind_holder, load_config
from gateway.orphans import SERVING, inherited_lifeline, parent_gone, report_to_router
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
LOG_LEVEL_ENV: Final = "CASCADEGW_LOG_LEVEL"

REQUESTS: Final = "requests"
"""The role of the edge process that serves ``ingest.bind`` (the ROUTER)."""
STATUS: Final = "status"
"""The role of the one that serves ``ingest.status_bind`` (the XPUB): apart, so that a
subscriber who floods libzmq's subscription trie until that process runs out of memory takes
down status events for a moment, never requests."""

LINK_TOPIC: Final = b"\x00edge"
"""The edge's subscription upstream as soon as it starts (see ``main``)."""

_DRAIN_BUDGET: Final = 1000
"""Messages relayed per socket per wake-up, so one busy direction cannot starve the other."""


INTERNAL_HWM: Final = 32
"""Requests queued on each end of the edge-router link. Every request is bounded before it
leaves the edge (a payload of at most ``ingest.max_frame_bytes``, envelope frames of at most
``MAX_ENVELOPE_BYTES`` in all), so the router never holds more than twice this many of them
from clients (256 MiB at the default 4 MiB frame; a batch of 100 sends is about 30 KB). When
the edge stops taking them, it stops reading clients: they wait in libzmq's queues."""

REPLY_HWM: Final = 1000
"""Replies queued on each end of the link. One reply per request the router took, each one
result per request in it; a full link makes the router wait, never drop (``Ingest._flush``)."""

PUBLIC_REPLY_HWM: Final = 1_000
"""Replies the requests edge keeps for one client: a burst of replies to a client that reads
them fills this faster than libzmq's I/O thread writes them out, so it cannot be small; what
clients that never read make the edge hold is bounded by its memory watch instead."""

HEADROOM_BYTES: Final = 48 * 1024 * 1024
"""How close to its address-space cap an edge lets itself come: past this it exits to be
restarted (``Edge.check_memory``), because at the cap libzmq's allocations fail one by one and
the edge was seen to hang, alive and serving nobody, rather than die."""

MEMORY_SHORT_SECONDS: Final = 2.0
"""How long the address space may stay within ``HEADROOM_BYTES`` of the cap before the edge
gives up and exits."""

MAX_ENVELOPE_BYTES: Final = 1024
"""Correlation frames are echoed with the reply: a client may not make anyone echo much."""


class Edge:
    """The relay between the public sockets and the router's internal ones."""

    def __init__(
        self,
        *,
        public: zmq.Socket[bytes] | None,
        back: zmq.Socket[bytes],
        xpub: zmq.Socket[bytes] | None,
        xsub: zmq.Socket[bytes] | None,
        zap: zmq.Socket[bytes] | None,
        config: GatewayConfig,
        principals: Principals | None,
        memory_cap_bytes: int | None,
        exit_process: Callable[[int], object] = os._exit,
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
        self.tenants = frozenset(name.encode() for name in config.tenants)
        """The topics a subscriber may ask for besides "" (``curve.subscription``)."""
        self.lifeline = inherited_lifeline()
        self.notes: dict[tuple[bytes, str], int] = {}
        """Counts for the router not yet sent (``_note``)."""
        self.unlogged: dict[tuple[bytes, str], int] = {}
        self.logged_at: dict[tuple[bytes, str], float] = {}
        self.memory_cap_bytes = memory_cap_bytes
        """The address-space cap ``check_memory`` keeps clear of (None: no cap set)."""
        self.exit_process = exit_process
        self.memory_checked_at = -math.inf
        self.memory_short_since: float | None = None

    def run(self) -> None:
        """Relay until the process is terminated."""
        poller = zmq.Poller()
        for sock in (self.public, self.back, self.xpub, self.xsub):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap, zmq.POLLIN)
        if self.lifeline is not None:
            poller.register(self.lifeline, zmq.POLLIN)  # readable: the router is gone
        stalled = False
        while True:
            # counts not yet sent, and the memory check, run every second even when idle
            ready = dict(poller.poll(1000))
            self.check_memory(perf_seconds())
            if self.lifeline is not None and self.lifeline in ready and parent_gone(self.lifeline):
                log.warning("edge_exiting", reason="the router is gone")
                return
            if self.zap is not None and self.zap in ready:
                self._answer_zap()
            if ready.get(self.back, 0) & zmq.POLLIN:
                self._relay_replies()
            if self.public is not None and (
                ready.get(self.back, 0) & zmq.POLLOUT or self.public in ready
            ):
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
            if self.notes:
                self._send_notes()

    def check_memory(self, now: float) -> None:
        """Exit (to be restarted) when the address space stays within ``HEADROOM_BYTES`` of
        the cap for ``MEMORY_SHORT_SECONDS``; read at most ten times a second."""
        cap = self.memory_cap_bytes
        if cap is None or now - self.memory_checked_at < 0.1:
            return
        self.memory_checked_at = now
        mapped = mapped_bytes()
        if mapped <= cap - HEADROOM_BYTES:
            self.memory_short_since = None
            return
        # a hostile message passing through peaks and is dropped by libzmq within a moment;
        # only memory that stays this short means nothing will free it
        if self.memory_short_since is None:
            self.memory_short_since = now
        elif now - self.memory_short_since >= MEMORY_SHORT_SECONDS:
            log.error("edge_memory_exhausted", mapped=mapped, cap=cap)
            # no cleanup: at this point even it could fail; the supervisor starts a new edge
            self.exit_process(3)

    def _writable(self, sock: zmq.Socket[bytes]) -> bool:
        return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLOUT)

    def _readable(self, sock: zmq.Socket[bytes]) -> bool:
        return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def _relay_requests(self) -> bool:
        """Relay what clients sent; False when the router's queue is full (resume on POLLOUT)."""
        public, back = self.public, self.back
        assert public is not None
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
                self._note(INGEST_DROP, IngestDrop.TOO_MANY_PARTS)
                continue
            if count < 2:
                continue  # a ROUTER always prepends the identity: nothing to answer
            if sum(len(part) for part in parts[1:-1]) > MAX_ENVELOPE_BYTES:
                self._note(INGEST_DROP, IngestDrop.ENVELOPE_TOO_LARGE)
                continue
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
            if public is None:
                continue  # the status edge takes no replies: nothing should come
            try:
                public.send_multipart(parts, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                reason = (
                    ReplyDrop.PEER_GONE if exc.errno == zmq.EHOSTUNREACH else ReplyDrop.PEER_FULL
                )
                self._note(REPLY_DROP, reason)

    def _subscriptions(self) -> None:
        xpub = self.xpub
        assert xpub is not None
        while self._readable(xpub):
            message = xpub.recv(zmq.NOBLOCK, copy=False)
            key = curve.user_id(message) if self.principals is not None else None
            change = curve.subscription(message.bytes, key, self.principals, self.tenants)
            if change is None:
                continue
            option, topics = change
            if option == zmq.SUBSCRIBE:
                self._note(SUBSCRIPTION, "accepted" if topics else "refused")
            for topic in topics:
                xpub.setsockopt(option, topic)  # XPUB_MANUAL: for the subscriber just read
                if option == zmq.SUBSCRIBE and topic not in self.upstream:
                    self._subscribe_upstream(topic)

    def _subscribe_upstream(self, topic: bytes) -> None:
        """Have the router send this tenant's events (every tenant's, for ""): it then sends
        only tenants somebody here listens to. Never undone: which subscriber an
        unsubscription came from is libzmq's secret, and a client must not be able to stop
        another's events; the set is bounded by the tenants."""
        assert self.xsub is not None
        self.upstream.add(topic)
        self.xsub.send(bytes([curve.SUBSCRIBE]) + topic)

    def _relay_events(self) -> None:
        xsub, xpub = self.xsub, self.xpub
        assert xsub is not None
        assert xpub is not None
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
        """Count something for the router's metrics; sent by ``_send_notes``."""
        key = (kind, label)
        self.notes[key] = self.notes.get(key, 0) + 1

    def _send_notes(self) -> None:
        """One note per count with what accumulated since the last: a flood of refusals
        must neither fill the link (and lose counts) nor take one message each."""
        for (kind, label), count in list(self.notes.items()):
            try:
                self.back.send(kind + f"{label}={count}".encode(), zmq.NOBLOCK)
            except zmq.Again:
                return  # the router is busy: kept for the next round
            del self.notes[kind, label]
            if not (kind == SUBSCRIPTION and label == "accepted"):
                self._log_counted(kind, label, count)

    def _log_counted(self, kind: bytes, label: str, count: int) -> None:
        """A line per second per kind at most: a flood of refusals or drops must not become
        a flood of logs."""
        key = (kind, label)
        self.unlogged[key] = self.unlogged.get(key, 0) + count
        now = perf_seconds()
        if now - self.logged_at.get(key, -math.inf) >= 1.0:
            log.warning(
                _LOG_EVENTS.get(kind, "edge_counted"), reason=label, count=self.unlogged.pop(key)
            )
            self.logged_at[key] = now


_LOG_EVENTS: Final = {
    INGEST_DROP: "frames_dropped",
    REPLY_DROP: "replies_dropped",
    SUBSCRIPTION: "subscriptions",
}


def mapped_bytes() -> int:
    """This process's address space now (VmSize)."""
    with open("/proc/self/statm", "rb") as statm:
        pages = int(statm.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def cap_address_space(extra_bytes: int) -> int:
    """Cap this process's address space at what it maps now plus ``extra_bytes``; the cap."""
    cap = mapped_bytes() + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


def _bind(config: GatewayConfig, sock: zmq.Socket[bytes], key: str, address: str) -> str:
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        holder = bind_holder(config, key, address)
        report_to_router(str(bind_error(key, address, exc.errno, exc.strerror, holder=holder)))
        raise SystemExit(2) from exc
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)


def main() -> None:
    # Ctrl-C reaches the whole process group: the edge keeps relaying the router's last
    # replies while it drains, and is terminated by its supervisor after
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(level=os.environ.get(LOG_LEVEL_ENV, "info"))
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role not in (REQUESTS, STATUS):
        raise SystemExit(f"usage: python -m gateway.runtime.edge {REQUESTS}|{STATUS}")
    with open(os.environ["CASCADEGW_CONFIG"], "rb") as file:
        config = load_config(file.read(), os.environ)
    ingest = config.ingest
    principals = curve.principals(config)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    zap = curve.open_zap_socket(context) if principals is not None else None
    # both roles count toward the router's metrics over this link; requests also go over it
    back: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    back.setsockopt(zmq.LINGER, 0)
    back.setsockopt(zmq.RECONNECT_IVL, 10)  # the router binds once the edge serves
    back.setsockopt(zmq.SNDHWM, INTERNAL_HWM)
    back.setsockopt(zmq.RCVHWM, REPLY_HWM)
    public = xpub = xsub = None
    if role == REQUESTS:
        public = context.socket(zmq.ROUTER)
        public.setsockopt(zmq.LINGER, 0)
        public.setsockopt(zmq.ROUTER_MANDATORY, 1)  # else replies to vanished peers vanish
        public.setsockopt(zmq.RCVHWM, 1_000)
        public.setsockopt(zmq.SNDHWM, PUBLIC_REPLY_HWM)  # more are dropped, counted peer_full
        # bytes per part: bigger frames up to this get an `invalid` reply; past it libzmq
        # drops the connection (it cannot answer what it refused)
        public.setsockopt(zmq.MAXMSGSIZE, 8 * ingest.max_frame_bytes)
        if ingest.curve_secret_key is not None:
            curve.make_server(public, ingest.curve_secret_key.reveal())
        endpoint = _bind(config, public, "ingest.bind", ingest.bind)
    else:
        xpub = context.socket(zmq.XPUB)
        xsub = context.socket(zmq.XSUB)
        for sock in (xpub, xsub):
            sock.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.SNDHWM, 100_000)
        xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        # room for the handshake's commands (CURVE's INITIATE with its metadata) and a
        # subscription to any tenant name; more drops the subscriber
        xpub.setsockopt(zmq.MAXMSGSIZE, 1024)
        xsub.setsockopt(zmq.RECONNECT_IVL, 10)
        if ingest.curve_secret_key is not None:
            curve.make_server(xpub, ingest.curve_secret_key.reveal())
        endpoint = _bind(config, xpub, "ingest.status_bind", ingest.status_bind)
        xsub.connect(os.environ[STATUS_ENV])
        # the link's sign of life for the router, which waits for a subscription before it
        # takes requests; no event's topic (a tenant name) starts with this byte
        xsub.send(bytes([curve.SUBSCRIBE]) + LINK_TOPIC)
    back.connect(os.environ[REQUESTS_ENV])
    cap = cap_address_space(ingest.edge_memory_bytes)
    log.info("edge_serving", role=role, endpoint=endpoint, memory_cap=cap)
    report_to_router(f"{SERVING} {endpoint}")
    Edge(
        public=public,
        back=back,
        xpub=xpub,
        xsub=xsub,
        zap=zap,
        config=config,
        principals=principals,
        memory_cap_bytes=cap,
    ).run()


if __name__ == "__main__":
    main()
