"""Load-test cascadegw with locust: a ZeroMQ CRM user and a webhook (receipts) user.

Runs in its own virtualenv (`make bench-env`): locust gevent-monkey-patches the process, which
breaks trio, so nothing here imports the gateway. It speaks the wire protocol with plain msgpack.

    .bench-venv/bin/locust -f bench/locustfile.py --headless -u 20 -r 20 --run-time 30s \\
        CrmUser   # or WebhookUser, or both

Environment:
    CASCADEGW_ENDPOINT      ZeroMQ ROUTER endpoint (default tcp://127.0.0.1:5555)
    CASCADEGW_TENANT        tenant name (default demo)
    CASCADEGW_BATCH         send requests per frame (default 100)
    CASCADEGW_PRIORITY      lane of the sends: critical, normal, bulk (default normal)
    CASCADEGW_SEND_AT       seconds ahead to schedule sends (default: send now)
    CASCADEGW_MESSAGE_PREFIX  message id prefix (default: random per process)
    CASCADEGW_STEP_TIMEOUTS e.g. "push=1,email=2,viber=2,sms=5" (seconds; default: configured)
    CASCADEGW_FRAMES_PER_SECOND  per user pacing (default: as fast as replies come)
    CASCADEGW_MAX_MESSAGES  stop the run after this many messages (default: run-time only)
    CASCADEGW_WEBHOOK_URL   e.g. http://127.0.0.1:8081/webhooks/viber_sim (WebhookUser)
    CASCADEGW_VIBER_TOKEN   that Viber provider's auth token (signs the callbacks)
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import gevent
import msgpack
import zmq.green as zmq
from locust import FastHttpUser, User, between, constant, constant_throughput, events, task
from locust.exception import StopUser
from payloads import promo_send  # locust puts this file's directory on the path

ENDPOINT = os.environ.get("CASCADEGW_ENDPOINT", "tcp://127.0.0.1:5555")
TENANT = os.environ.get("CASCADEGW_TENANT", "demo")
BATCH = int(os.environ.get("CASCADEGW_BATCH", "100"))
PRIORITY = os.environ.get("CASCADEGW_PRIORITY", "normal")
SEND_AHEAD = os.environ.get("CASCADEGW_SEND_AT")
PREFIX = os.environ.get("CASCADEGW_MESSAGE_PREFIX") or uuid.uuid4().hex[:8]
STEP_TIMEOUTS = {
    channel: float(seconds)
    for channel, _, seconds in (
        item.partition("=")
        for item in os.environ.get("CASCADEGW_STEP_TIMEOUTS", "").split(",")
        if item
    )
}
FRAMES_PER_SECOND = float(os.environ.get("CASCADEGW_FRAMES_PER_SECOND", "0"))
MAX_MESSAGES = int(os.environ.get("CASCADEGW_MAX_MESSAGES", "0"))
REPLY_TIMEOUT_MS = 30_000
_ids = itertools.count()


def send_request(index: int) -> dict[str, Any]:
    message_id = f"{PREFIX}-{os.getpid()}-{index}"
    request = promo_send(index, message_id=message_id, tenant=TENANT, priority=PRIORITY)
    if SEND_AHEAD:
        # times travel as RFC 3339 strings (a msgpack timestamp is refused as invalid)
        send_at = datetime.now(UTC) + timedelta(seconds=float(SEND_AHEAD))
        request["send_at"] = send_at.isoformat().replace("+00:00", "Z")
    if STEP_TIMEOUTS:
        request["step_timeout_seconds"] = STEP_TIMEOUTS
    return request


class CrmUser(User):
    """A CRM pushing send batches over a DEALER socket; one frame in flight per user."""

    wait_time = constant_throughput(FRAMES_PER_SECOND) if FRAMES_PER_SECOND else constant(0)

    def on_start(self) -> None:
        self.context = zmq.Context.instance()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(ENDPOINT)
        self.correlation = itertools.count()

    def on_stop(self) -> None:
        self.sock.close(linger=0)

    @task
    def send_batch(self) -> None:
        first = next(_ids) * BATCH
        if MAX_MESSAGES and first >= MAX_MESSAGES:
            # quit from a greenlet of its own: quitting inside this user's greenlet kills the
            # caller halfway and the headless run then idles until --run-time
            gevent.spawn(self.environment.runner.quit)
            raise StopUser

        frame = msgpack.packb([send_request(first + offset) for offset in range(BATCH)])
        correlation = next(self.correlation).to_bytes(8, "big")
        started = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            self.sock.send_multipart([correlation, frame])
            while True:
                if not self.sock.poll(REPLY_TIMEOUT_MS):
                    raise TimeoutError("no reply")
                reply_correlation, payload = self.sock.recv_multipart()
                if reply_correlation == correlation:
                    break
            length = len(payload)
            refused = [r for r in msgpack.unpackb(payload) if r["status"] == "rejected"]
            if refused:
                reasons = sorted({r["reason"] for r in refused})
                exception = RuntimeError(
                    f"{len(refused)} of {BATCH} rejected: {', '.join(reasons)}"
                )
        except Exception as error:  # noqa: BLE001 - a load tool reports every failure as a failed request
            exception = error
        events.request.fire(
            request_type="zmq",
            name=f"send x{BATCH} ({PRIORITY})",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )


class WebhookUser(FastHttpUser):
    """A provider posting signed receipts (Viber callbacks) to the gateway's webhook endpoint."""

    wait_time = between(0, 0.01)
    host = os.environ.get("CASCADEGW_WEBHOOK_URL", "http://127.0.0.1:8081/webhooks/viber_sim")

    @task
    def delivered(self) -> None:
        token = os.environ.get("CASCADEGW_VIBER_TOKEN", "")
        body = json.dumps(
            {
                "event": random.choice(["delivered", "seen"]),
                "timestamp": int(time.time() * 1000),
                "message_token": random.randrange(1, 2**62),
                "user_id": f"vb-{random.randrange(1_000_000)}",
            }
        ).encode()
        signature = hmac.new(token.encode(), body, hashlib.sha256).hexdigest()
        with self.client.post(
            "",
            data=body,
            headers={"X-Viber-Content-Signature": signature, "Content-Type": "application/json"},
            name="webhook viber",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
