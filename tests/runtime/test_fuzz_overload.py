"""Hostile and excessive traffic: garbage never crashes the router; overload is refused, not queued."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
import zmq

from gateway.app import open_gateway
from gateway.client import open_client
from tests.support import NOON_UTC, in_test_providers, make_config, promo, rss_bytes, wait_for

# 100,000 hostile frames and a 10^5-message overload: `make test` runs it, `make unit` does not
pytestmark = pytest.mark.slow

FUZZ_FRAMES = 100_000
VALID_EVERY = 97


def _pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _mutations(rng: random.Random, valid: list[bytes]) -> bytes:
    """One hostile frame: random bytes, a mutated valid frame, or a well-formed wrong request."""
    choice = rng.random()
    if choice < 0.25:
        return rng.randbytes(rng.randint(0, 64))
    if choice < 0.65:
        frame = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            operation = rng.random()
            position = rng.randrange(len(frame)) if frame else 0
            if operation < 0.4 and frame:
                frame[position] = rng.randrange(256)
            elif operation < 0.7:
                frame.insert(position, rng.randrange(256))
            elif frame:
                del frame[position]
        return bytes(frame)
    if choice < 0.9:
        request: dict[Any, Any] = dict(promo(f"fuzz{rng.randrange(10**9)}"))
        key = rng.choice([*request.keys(), "extra", 7])
        request[key] = rng.choice(
            [None, -1, 2**63, "x" * rng.randint(0, 300), [1, "a"], {"k": b"\xff"}, 3.5, True]
        )
        if rng.random() < 0.3:
            return _pack([request, rng.randbytes(3)])
        return _pack(request)
    if choice < 0.95:
        return _pack([rng.random() for _ in range(rng.randint(0, 2000))])  # over max_batch
    return b"\x91" * rng.randint(1, 40_000)  # nested-array bomb


def _fuzz(endpoint: str, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    valid = [msgpack.packb(promo(f"seed{i}")) for i in range(5)] + [
        msgpack.packb([promo("seedb1"), promo("seedb2")])
    ]
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    counts = {"replies": 0, "accepted": 0, "valid_sent": 0, "undecodable_replies": 0}
    in_flight = 0
    # below ZeroMQ's default high-water marks (1,000 queued each way): the gateway drops a
    # reply its client has no room for (`reply_dropped`, peer_full), and with 2,000 in flight a
    # client slowed by a busy machine lost replies it then waited for
    window = 500
    sent = 0
    try:
        while sent < FUZZ_FRAMES or in_flight:
            while sent < FUZZ_FRAMES and in_flight < window:
                if sent % VALID_EVERY == 0:
                    frame = msgpack.packb(promo(f"ok{sent}", recipient={"id": f"r{sent}"}))
                    tag = b"v"
                    counts["valid_sent"] += 1
                else:
                    frame = _mutations(rng, valid)
                    tag = b"f"
                sock.send_multipart([tag + sent.to_bytes(4, "big"), frame])
                sent += 1
                in_flight += 1
            if not sock.poll(30_000):
                raise TimeoutError(f"no reply with {in_flight} frames in flight")
            while sock.poll(0):
                correlation, payload = sock.recv_multipart()
                in_flight -= 1
                counts["replies"] += 1
                try:
                    reply = msgpack.unpackb(payload)
                except (ValueError, msgpack.UnpackException):  # counted and asserted to be zero
                    counts["undecodable_replies"] += 1
                    continue
                results = reply if isinstance(reply, list) else [reply]
                if correlation[:1] == b"v":
                    assert ["accepted"] == [r["status"] for r in results], results
                    counts["accepted"] += 1
                else:
                    for result in results:
                        assert result["status"] in {"accepted", "rejected", "duplicate", "ok"}, (
                            result
                        )
                        if result["status"] == "rejected":
                            assert result["reason"], result
                            assert result["detail"], result
        return counts
    finally:
        sock.close()
        context.term()


class TestFuzz:
    """Garbage in, a precise `invalid` out, for every frame; valid traffic flows beside it."""

    async def test_a_hundred_thousand_hostile_frames(self, tmp_path: Path) -> None:
        config = make_config(
            tmp_path,
            environ={
                "CASCADEGW__INGEST__MAX_FRAME_BYTES": "65536",
                "CASCADEGW__INGEST__MAX_BATCH": "100",
            },
        )
        providers = in_test_providers(config)
        async with open_gateway(config, adapters=providers, wall_at_start=NOON_UTC) as gateway:
            counts = await trio.to_thread.run_sync(_fuzz, gateway.ingest_endpoint, 20261123)
            async with open_client(gateway.ingest_endpoint) as client:
                alive = await client.status("ok0", "acme")
            wanted = {f"acme:ok{i}" for i in range(0, FUZZ_FRAMES, VALID_EVERY)}
            await wait_for(lambda: wanted <= set(providers["push1"].keys()), what="sent")
        assert FUZZ_FRAMES == counts["replies"]
        assert 0 == counts["undecodable_replies"]
        assert counts["valid_sent"] == counts["accepted"]
        assert "ok" == alive["status"]
        sent_keys = set(providers["push1"].keys())
        assert {f"acme:ok{i}" for i in range(0, FUZZ_FRAMES, VALID_EVERY)} <= sent_keys


class TestOverload:
    """A saturated dispatch queue answers `overloaded` and memory stays flat."""

    async def test_overloaded_replies_and_bounded_memory(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(
            tmp_path,
            extra="[dispatch.max_queued]\ncritical = 1000\nnormal = 1000\nbulk = 1000\n",
            provider_options="",
        )
        providers = in_test_providers(config, delay_seconds=3600)  # the provider has stalled
        async with open_gateway(config, adapters=providers, wall_at_start=NOON_UTC) as gateway:
            for queue in gateway.dispatcher.queues.by_provider.values():
                queue.concurrency = 1
            async with open_client(gateway.ingest_endpoint, timeout_seconds=1e6) as client:
                statuses: dict[str, int] = {}

                async def flood(first: int, count: int) -> None:
                    for start in range(first, first + count, 100):
                        batch = [promo(f"m{i}", priority="bulk") for i in range(start, start + 100)]
                        for result in await client.send_batch(batch):
                            key = result.get("reason", result["status"])
                            statuses[key] = statuses.get(key, 0) + 1

                await flood(0, 5_000)  # fills the bulk lane
                baseline = rss_bytes()
                await flood(5_000, 100_000)
                growth = rss_bytes() - baseline
                otp = await client.send(promo("otp", category="service", priority="critical"))
        assert statuses["accepted"] <= 1_001 + 100  # the lane limit (+ one batch racing the check)
        assert statuses["overloaded"] >= 100_000
        assert growth < 32 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB under overload"
        assert "accepted" == otp["status"]  # the critical lane is not blocked by the bulk backlog
