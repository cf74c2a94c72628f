"""The ZeroMQ edge process as ``cascadegw run`` starts it: supervised, in order, never orphaned.

The edge holds the CRM-facing sockets (``gateway.runtime.edge``); these tests kill it, kill the
router under it and pipeline frames through it, against real processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import msgpack
import trio
import zmq

from bench.harness import answers_ok, descendants
from gateway.client import open_client
from tests.e2e.processes import GatewayProcess, edge_pids, standalone_config
from tests.support import promo


def status_frame(message_id: str) -> bytes:
    return bytes(msgpack.packb({"v": 1, "op": "status", "id": message_id, "tenant": "acme"}))


async def wait_until(condition: Callable[[], bool], *, timeout_seconds: float = 30.0) -> None:
    """Poll ``condition`` (blocking, so in a thread) until it holds."""
    with trio.fail_after(timeout_seconds):
        while True:
            if await trio.to_thread.run_sync(condition):
                return
            await trio.sleep(0.02)


def exited(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def running_gateway(
    tmp_path: Path, *, all_children: bool = False
) -> tuple[GatewayProcess, str]:
    """``cascadegw run``; with ``all_children``, a dispatch worker and a webhook process too."""
    path, http_url, ingest, _ = standalone_config(
        tmp_path,
        store_extra="create = true",
        http_extra='webhook_processes = 1\nwebhook_bind = "127.0.0.1:0"' if all_children else "",
        extra="[dispatch]\nworkers = 1\n" if all_children else "",
    )
    process = GatewayProcess(path, {}, http_url)
    await process.start()
    return process, ingest


def children(router_pid: int) -> dict[int, str]:
    """The router's child processes, pid -> command line."""
    found = {}
    for pid in descendants(router_pid)[1:]:
        with contextlib.suppress(OSError):
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


async def test_children_live_as_long_as_the_router_however_idle(tmp_path: Path) -> None:
    """trio starts processes from worker threads that end after ten idle seconds: nothing
    about a child's life may hang on that thread (PR_SET_PDEATHSIG did, and killed every
    child ten seconds into each idle spell)."""
    process, _ = await running_gateway(tmp_path, all_children=True)
    try:
        assert process.process is not None
        before = children(process.process.pid)
        await trio.sleep(13)
        after = children(process.process.pid)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{process.http_url}/metrics")).text
    finally:
        await process.stop()
    kinds = sorted(
        kind
        for kind in (
            "gateway.runtime.edge requests",
            "gateway.runtime.edge status",
            "gateway.http.webhook_app",
            " worker ",
        )
        for command in before.values()
        if kind in command
    )
    assert [
        " worker ",
        "gateway.http.webhook_app",
        "gateway.runtime.edge requests",
        "gateway.runtime.edge status",
    ] == kinds
    assert before == after
    assert 'gateway_process_restarts_total{process="zeromq_edge"} 0.0' in metrics
    assert 'gateway_process_restarts_total{process="zeromq_status"} 0.0' in metrics
    assert 'gateway_process_restarts_total{process="webhook"} 0.0' in metrics
    assert 'gateway_process_restarts_total{process="dispatch_worker"} 0.0' in metrics


async def test_a_killed_edge_is_restarted_and_serves_again(tmp_path: Path) -> None:
    process, ingest = await running_gateway(tmp_path)
    try:
        assert process.process is not None
        router = process.process.pid
        (edge,) = edge_pids(router)
        os.kill(edge, signal.SIGKILL)
        # not ready while no edge serves (it is started again after half a second)
        await wait_until(lambda: not answers_ok(f"{process.http_url}/readyz"))
        await process.wait_ready()
        (successor,) = edge_pids(router)
        async with open_client(ingest, timeout_seconds=30) as client:
            answer = await client.send(promo("after-restart"))
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{process.http_url}/metrics")).text
    finally:
        await process.stop()
    assert edge != successor
    assert "accepted" == answer["status"]
    assert 'gateway_process_restarts_total{process="zeromq_edge"} 1.0' in metrics


async def test_the_link_to_the_router_is_private(tmp_path: Path) -> None:
    """Whoever could connect to the router's side of the edge could name any client key."""
    process, _ = await running_gateway(tmp_path)
    try:
        run_dir = tmp_path / "var" / "run"
        sockets = sorted(path.name.split("-")[0] for path in run_dir.iterdir())
        mode = run_dir.stat().st_mode & 0o777
    finally:
        await process.stop()
    assert ["ingest", "status"] == sockets
    assert 0o700 == mode


async def test_a_killed_router_takes_its_children_along(tmp_path: Path) -> None:
    """An orphaned edge would keep the ZeroMQ ports, and the restarted gateway could not bind
    them (and exits 2, which its service manager does not restart); orphaned workers and
    webhook processes would wait for a router that is gone."""
    process, ingest = await running_gateway(tmp_path, all_children=True)
    assert process.process is not None
    orphans = list(children(process.process.pid))
    process.process.kill()  # the router alone, as the OOM killer would
    await process.process.wait()
    await wait_until(lambda: all(exited(pid) for pid in orphans), timeout_seconds=5)
    stale = sorted(path.name for path in (tmp_path / "var" / "run").iterdir())
    await process.start()  # the same config: the same ports
    fresh = sorted(path.name for path in (tmp_path / "var" / "run").iterdir())
    try:
        async with open_client(ingest, timeout_seconds=30) as client:
            answer = await client.send(promo("after-crash"))
    finally:
        await process.stop()
    assert 4 == len(orphans)
    assert "accepted" == answer["status"]
    # the dead router's ipc sockets were removed when the next one started
    assert 5 == len(stale)  # ingest, status, events, jobs, results
    assert not set(stale) & set(fresh)


async def test_a_frame_the_edge_answers_keeps_its_place_in_the_client_order(
    tmp_path: Path,
) -> None:
    """A frame over ``ingest.max_frame_bytes`` is answered by the edge, but its reply leaves in
    the client's arrival order, between the replies to the frames around it."""
    process, ingest = await running_gateway(tmp_path)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(ingest)
        oversize = b"\x91" + b"\xc0" * (5 * 1024 * 1024)  # an array of nils, 5 MiB
        for frame in (status_frame("first"), oversize, status_frame("last")):
            sock.send(frame)  # no correlation frames: the client matches replies by position
        replies = []
        for _ in range(3):
            assert await trio.to_thread.run_sync(sock.poll, 30_000)
            replies.append(msgpack.unpackb(sock.recv()))
    finally:
        sock.close(linger=0)
        context.term()
        await process.stop()
    first, refused, last = replies
    assert ("first", "last") == (first["id"], last["id"])
    assert ("rejected", "invalid") == (refused[0]["status"], refused[0]["reason"])
    assert "limit" in refused[0]["detail"]


def pipeline(endpoint: str, frames: list[bytes]) -> list[bytes]:
    """One DEALER sends every frame without waiting, then reads a reply per frame (blocking)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    replies: list[bytes] = []
    try:
        for frame in frames:
            sock.send(frame)
        while len(replies) < len(frames) and sock.poll(30_000):
            replies.append(sock.recv())
    finally:
        sock.close(linger=0)
        context.term()
    return replies


async def test_pipelined_clients_get_every_reply_in_order(tmp_path: Path) -> None:
    """Every client's replies share the one link from the router to the edge: when it is full
    the router waits for room instead of dropping replies (it dropped half of 1,000)."""
    process, ingest = await running_gateway(tmp_path)
    try:
        statuses = [status_frame(f"missing-{n}") for n in range(1000)]
        sends = {
            client: [msgpack.packb(promo(f"c{client}-{n}")) for n in range(100)]
            for client in range(10)
        }
        async with trio.open_nursery() as nursery:
            results: dict[object, list[bytes]] = {}

            async def run(name: object, frames: list[bytes]) -> None:
                results[name] = await trio.to_thread.run_sync(pipeline, ingest, frames)

            nursery.start_soon(run, "statuses", statuses)
            for client, frames in sends.items():
                nursery.start_soon(run, client, frames)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{process.http_url}/metrics")).text
    finally:
        await process.stop()
    answered = [msgpack.unpackb(reply)["id"] for reply in results["statuses"]]
    assert [f"missing-{n}" for n in range(1000)] == answered
    for client in sends:
        replies = [msgpack.unpackb(reply) for reply in results[client]]
        assert [f"c{client}-{n}" for n in range(100)] == [reply["id"] for reply in replies]
        assert {"accepted"} == {reply["status"] for reply in replies}
    assert 'gateway_replies_dropped_total{reason="peer_full"} 0.0' in metrics


async def test_a_frame_of_700000_nils_gets_one_short_answer(tmp_path: Path) -> None:
    """Refusing each element of an oversize batch answered a 4 MiB frame with 65 MB and
    crashed the requests edge building it."""
    process, ingest = await running_gateway(tmp_path)
    try:
        # an array of 700,000: one 4 MiB bin (over max_frame_bytes, so the edge answers) and nils
        big = b"\xc6" + (4 << 20).to_bytes(4, "big") + b"x" * (4 << 20)
        nils = b"\xdd" + (700_000).to_bytes(4, "big") + big + b"\xc0" * 699_999
        (reply,) = await trio.to_thread.run_sync(pipeline, ingest, [nils])
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{process.http_url}/metrics")).text
    finally:
        await process.stop()
    (result,) = msgpack.unpackb(reply)
    assert ("rejected", "invalid") == (result["status"], result["reason"])
    assert len(reply) < 200
    assert 'gateway_process_restarts_total{process="zeromq_edge"} 0.0' in metrics
