"""The edge's memory watch: out of room for good means exit (and be restarted), not hang.

At its address-space cap libzmq's allocations fail one by one, and an edge held there by
clients that never read was seen to hang, alive and serving nobody. A hostile message passing
through peaks and is dropped within a moment, so only memory that stays short counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from gateway.runtime import edge
from gateway.runtime.edge import HEADROOM_BYTES, MEMORY_SHORT_SECONDS, Edge, mapped_bytes
from tests.support import make_config


@pytest.fixture
def sockets() -> Iterator[dict[str, zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    made = {"public": context.socket(zmq.ROUTER), "back": context.socket(zmq.DEALER)}
    yield made
    for sock in made.values():
        sock.close(linger=0)
    context.term()


def watch(
    sockets: dict[str, zmq.Socket[bytes]], tmp_path: Path, cap: int
) -> tuple[Edge, list[int]]:
    exits: list[int] = []
    watched = Edge(
        public=sockets["public"],
        back=sockets["back"],
        xpub=None,
        xsub=None,
        zap=None,
        config=make_config(tmp_path),
        principals=None,
        memory_cap_bytes=cap,
        exit_process=exits.append,
    )
    return watched, exits


def test_short_of_room_for_a_moment_is_no_reason_to_exit(
    sockets: dict[str, zmq.Socket[bytes]], tmp_path: Path
) -> None:
    watched, exits = watch(sockets, tmp_path, mapped_bytes())  # already within the headroom
    watched.check_memory(100.0)
    watched.check_memory(100.0 + MEMORY_SHORT_SECONDS / 2)
    assert [] == exits


def test_short_of_room_for_good_exits_to_be_restarted(
    sockets: dict[str, zmq.Socket[bytes]], tmp_path: Path
) -> None:
    watched, exits = watch(sockets, tmp_path, mapped_bytes())
    watched.check_memory(100.0)
    watched.check_memory(100.0 + MEMORY_SHORT_SECONDS)
    assert [3] == exits


def test_room_again_starts_the_count_over(
    sockets: dict[str, zmq.Socket[bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = mapped_bytes() + 4 * HEADROOM_BYTES
    watched, exits = watch(sockets, tmp_path, cap)
    readings = iter([cap, cap - 2 * HEADROOM_BYTES, cap, cap])  # short, fine, short, short
    monkeypatch.setattr(edge, "mapped_bytes", lambda: next(readings))
    for now in (100.0, 101.0, 102.0, 102.0 + MEMORY_SHORT_SECONDS - 0.5):
        watched.check_memory(now)
    assert [] == exits  # short twice, but never for MEMORY_SHORT_SECONDS in a row
