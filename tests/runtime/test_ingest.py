"""Ingest over real ZeroMQ sockets: durable acks, group commit, duplicates, batches, draining."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import trio
import trio.testing
import zmq

from gateway.app import open_gateway
from gateway.client import open_client, status_request
from gateway.core.model import Lane
from gateway.store.base import Batch
from tests.support import NOON_UTC, in_test_providers, make_config, promo, wait_for

LONG = 1e6  # client timeouts in virtual seconds: the mock clock may jump while we wait


def journal_rows(path: Path, table: str = "messages") -> int:
    with sqlite3.connect(path) as db:
        (count,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - test constant
    return int(count)


class TestDurableAcks:
    """A send is answered only once it is in the journal, and nothing is dispatched before."""

    async def test_the_ack_waits_for_the_commit(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        release = trio.Event()
        async with open_gateway(config, adapters=providers, wall_at_start=NOON_UTC) as gateway:
            commit = gateway.journal.commit

            holding = trio.Event()

            async def held_commit(batch: Batch) -> None:
                holding.set()
                await release.wait()
                await commit(batch)

            gateway.journal.commit = held_commit  # type: ignore[method-assign]
            replies: list[Any] = []
            async with open_client(gateway.ingest_endpoint, timeout_seconds=LONG) as client:

                async def send() -> None:
                    replies.append(await client.send(promo("m1")))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    await holding.wait()  # the request is admitted; its commit is held
                    assert [] == replies
                    assert 0 == journal_rows(tmp_path / "journal.db")
                    assert [] == providers["push1"].sent
                    release.set()
            assert "accepted" == replies[0]["status"]
            assert 1 == journal_rows(tmp_path / "journal.db")
            await wait_for(lambda: providers["push1"].keys() == ["acme:m1"])

    async def test_concurrent_frames_share_commits(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        async with open_gateway(
            config, adapters=in_test_providers(config), wall_at_start=NOON_UTC
        ) as gateway:
            commits_before = gateway.committer.commits
            replies: list[Any] = []
            async with open_client(gateway.ingest_endpoint, timeout_seconds=LONG) as client:

                async def send(index: int) -> None:
                    replies.append(await client.send(promo(f"m{index}")))

                async with trio.open_nursery() as nursery:
                    for index in range(200):
                        nursery.start_soon(send, index)
            assert 200 == len(replies)
            assert {"accepted"} == {reply["status"] for reply in replies}
            assert 200 == journal_rows(tmp_path / "journal.db")
            # group commit: the 200 frames (and their first sends' after-commit work) share
            # far fewer transactions than one per frame
            assert gateway.committer.commits - commits_before < 100


class TestDuplicates:
    """The CRM's message id is the idempotency key: a repeat answers `duplicate`, sends nothing."""

    async def test_a_repeated_id_is_a_duplicate_and_sent_once(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with (
            open_gateway(config, adapters=providers, wall_at_start=NOON_UTC) as gateway,
            open_client(gateway.ingest_endpoint, timeout_seconds=LONG) as client,
        ):
            first = await client.send(promo("m1"))
            again = await client.send(promo("m1"))
            in_batch = await client.send_batch([promo("m2"), promo("m2")])
            await wait_for(lambda: len(providers["push1"].sent) >= 2)
        assert "accepted" == first["status"]
        assert "duplicate" == again["status"]
        assert "m1" == again["id"]
        assert again["message"]["channels"] == ["push", "email", "viber", "sms"]
        assert ["accepted", "duplicate"] == [r["status"] for r in in_batch]
        assert ["acme:m1", "acme:m2"] == providers["push1"].keys()

    async def test_duplicates_survive_a_restart(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with (
            open_gateway(config, adapters=providers, wall_at_start=NOON_UTC) as gateway,
            open_client(gateway.ingest_endpoint, timeout_seconds=LONG) as client,
        ):
            assert "accepted" == (await client.send(promo("m1")))["status"]
            # the send's result is committed, not merely seen by the provider: closing between
            # the two makes recovery resend it (at least once), which is not what this test is about
            await wait_for(
                lambda: (
                    bool(providers["push1"].sent)
                    and gateway.dispatcher.inflight() == 0
                    and gateway.committer.pending_rows == 0
                )
            )
        async with (
            open_gateway(config, adapters=providers, wall_at_start=NOON_UTC + 60) as gateway,
            open_client(gateway.ingest_endpoint, timeout_seconds=LONG) as client,
        ):
            again = await client.send(promo("m1"))
            # a duplicate is a journal query, never a job: nothing is queued or on its way
            queued = sum(gateway.dispatcher.queues.depth(lane) for lane in Lane)
            assert (0, 0) == (queued, gateway.dispatcher.inflight())
        assert "duplicate" == again["status"]
        assert ["acme:m1"] == providers["push1"].keys()


class TestFrames:
    """Batches answer one result per request, in order; bad items don't disturb neighbours."""

    async def test_batch_results_are_in_request_order(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        async with (
            open_gateway(
                config, adapters=in_test_providers(config), wall_at_start=NOON_UTC
            ) as gateway,
            open_client(gateway.ingest_endpoint, timeout_seconds=LONG) as client,
        ):
            bad_email = promo("m2", recipient={"email": "not-an-address"})
            unknown_tenant = promo("m4", tenant="nobody")
            results = await client.send_batch(
                [
                    promo("m1"),
                    bad_email,
                    {"v": 1, "op": "teleport"},
                    unknown_tenant,
                    status_request("m1", "acme"),
                ]
            )
        assert ["accepted", "rejected", "rejected", "rejected", "ok"] == [
            r["status"] for r in results
        ]
        assert ["m1", "m2", None, "m4", "m1"] == [r.get("id") for r in results]
        assert "invalid" == results[1]["reason"]
        assert "$.recipient.email" in results[1]["detail"]
        assert "invalid" == results[2]["reason"]
        assert "unknown_tenant" == results[3]["reason"]

    async def test_correlation_frames_are_echoed_and_req_sockets_work(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        async with open_gateway(
            config, adapters=in_test_providers(config), wall_at_start=NOON_UTC
        ) as gateway:
            reply = await trio.to_thread.run_sync(_req_roundtrip, gateway.ingest_endpoint)
        assert "accepted" == reply["status"]


def _req_roundtrip(endpoint: str) -> Any:
    """A plain REQ socket (an empty delimiter frame) from a CRM that knows nothing of trio."""
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(msgpack.packb(promo("via-req")))
        if not sock.poll(10_000):
            raise TimeoutError("no reply")
        return msgpack.unpackb(sock.recv())
    finally:
        sock.close()
        context.term()


class TestDraining:
    """The ZeroMQ FD is edge-triggered: a burst of pipelined frames must all be answered."""

    async def test_a_burst_of_pipelined_frames_is_fully_answered(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        async with open_gateway(
            config, adapters=in_test_providers(config), wall_at_start=NOON_UTC
        ) as gateway:
            answered = await trio.to_thread.run_sync(_burst, gateway.ingest_endpoint, 3000)
        assert 3000 == answered


def _burst(endpoint: str, frames: int) -> int:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    try:
        for index in range(frames):
            sock.send_multipart(
                [index.to_bytes(4, "big"), msgpack.packb(status_request(f"x{index}", "acme"))]
            )
        seen: set[int] = set()
        while len(seen) < frames and sock.poll(10_000):
            correlation, payload = sock.recv_multipart()
            assert "not_found" == msgpack.unpackb(payload)["reason"]
            seen.add(int.from_bytes(correlation, "big"))
        return len(seen)
    finally:
        sock.close()
        context.term()
