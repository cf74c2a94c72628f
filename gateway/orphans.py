"""Child processes end with the router that started them, at once.

A router that is killed outright (SIGKILL, the OOM killer) cannot stop its children, and an
orphaned ZeroMQ edge or webhook process would keep its port: the restarted gateway could not
bind it (and exits 2, which its service manager does not restart), or would share it with a
process feeding a router that no longer exists.

The router holds the write end of one pipe for as long as it lives and never writes to it;
every supervised child gets the read end (``LIFELINE_FD_ENV``). The kernel closes the write end
when the router dies, however it dies, so the read end becomes readable (end of file) and the
child exits. ``PR_SET_PDEATHSIG`` would be simpler but fires when the *thread* that started
the child ends, and trio starts processes from worker threads that end after ten idle seconds.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Final

import trio

LIFELINE_FD_ENV: Final = "CASCADEGW_LIFELINE_FD"

REPORT_FD_ENV: Final = "CASCADEGW_REPORT_FD"
"""The descriptor the router reads a child's reports on (``report_to_router``)."""
SERVING: Final = "serving"
"""The first word of a child's report once it listens (what it bound may follow); any other
line is the one-line reason it cannot (``gateway.runtime.workers.ReportPipe``)."""

_lifeline: tuple[int, int] | None = None


def lifeline() -> int:
    """The read end to pass to a child (made once per router process; its write end stays
    open, unwritten, until the process exits)."""
    global _lifeline  # one pipe per process, for every child it starts
    if _lifeline is None:
        _lifeline = os.pipe()  # both ends close on exec, except where passed on purpose
    return _lifeline[0]


def report_to_router(line: str) -> None:
    """One line to the router on the descriptor it passed (``REPORT_FD_ENV``), if any."""
    fd = os.environ.get(REPORT_FD_ENV)
    if fd is not None:
        os.write(int(fd), line.replace("\n", " ").encode() + b"\n")


def inherited_lifeline() -> int | None:
    """The read end this process was started with, or None (not started by a router)."""
    fd = os.environ.get(LIFELINE_FD_ENV)
    return int(fd) if fd is not None else None


def parent_gone(fd: int) -> bool:
    """Whether the readable lifeline ``fd`` says the router is gone (end of file). Anything
    else read from it (nobody should write there) is discarded: it must not make every child,
    and every restarted one, exit."""
    return os.read(fd, 4096) == b""


async def exit_with_parent(
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """In a trio child: exit the moment the router is gone (runs forever otherwise)."""
    fd = inherited_lifeline()
    task_status.started()
    if fd is None:
        await trio.sleep_forever()
    while True:
        await trio.lowlevel.wait_readable(fd)
        if parent_gone(fd):
            # nothing here outlives the router usefully, and it may hold a port the next needs
            os._exit(0)


async def guarded(main: Callable[[], Awaitable[None]]) -> None:
    """Run a child's ``main`` until it returns or the router is gone (``trio.run(guarded,
    main)``). The watch is a system task: ``main``'s own exits (``SystemExit(2)`` with one
    line) leave as they are, not wrapped in a nursery's exception group."""
    trio.lowlevel.spawn_system_task(exit_with_parent)
    await main()
