"""Child processes end with the router that started them.

A router that is killed outright (SIGKILL, the OOM killer) cannot stop its children, and an
orphaned ZeroMQ edge or webhook process would keep its port: the restarted gateway could not
bind it, or would share it with a process feeding a router that no longer exists. Linux can
signal a child when its parent dies (``PR_SET_PDEATHSIG``); each child asks for SIGTERM.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Final

_PR_SET_PDEATHSIG: Final = 1


def die_with_parent() -> None:
    """Be sent SIGTERM when the parent exits; exit now if it already has (we were orphaned
    before asking). Nothing elsewhere than Linux, where the supervisor's stop is the only way."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        raise SystemExit(0)
