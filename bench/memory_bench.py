"""Memory per known recipient in the router's live state (issue 13, item 4: goal <= 300 B).

    python bench/memory_bench.py [--recipients 200000] [--top 0]

Each recipient gets what a typical marketing recipient carries: one advertising consent, three
recent sends (a message that escalated push -> email -> SMS counts three entries) and one
SMS address in the opt-out index. They are built through the same ``State`` calls the runtime
makes (``apply_consent``, ``record_send``, ``address_refs`` + ``remember_address``), with the
fresh string copies the runtime hands them (a recipient key is rebuilt for every call, a
consent's source is decoded from the wire, a send names its message's key).

Two figures, both divided by the number of recipients:
- tracemalloc: the bytes Python asked the allocator for and still holds (the objects alone);
- RSS: the growth of the process's resident memory while building (adds allocator rounding
  and the free space inside pools and dict tables, i.e. what the machine pays).

Prints figures; asserts nothing. The dict tables grow by doubling, so the per-recipient figure
depends on where N falls between two sizes; compare runs at the same N.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tracemalloc
from typing import Final

from gateway.core.caps import SendEntry
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord
from gateway.core.model import Category, Channel, recipient_key
from gateway.store.state import State

NOW: Final = 1_795_435_200.0
WEEK_SECONDS: Final = 7 * 86400.0
TENANT: Final = "acme"
STEPS: Final = (Channel.PUSH, Channel.EMAIL, Channel.SMS)
STEP_SECONDS: Final = 3600.0


def fresh(text: str) -> str:
    """A new string object equal to ``text``, as a decoder would produce."""
    return "".join(list(text))


def build(count: int) -> State:
    state = State(horizon_seconds=WEEK_SECONDS)
    state.address_key = b"k" * 32
    for index in range(count):
        recipient_id = f"customer-{index:08d}"
        at = NOW + index
        state.apply_consent(
            recipient_key(TENANT, recipient_id),
            ConsentRecord(ConsentKind.ADVERTISING, ConsentAction.GRANT, at, fresh("crm")),
        )
        message = f"{TENANT}:promo-{index:08d}"
        for step, channel in enumerate(STEPS):
            entry = SendEntry(at + step * STEP_SECONDS, message, Category.PROMO, channel)
            state.record_send(recipient_key(TENANT, recipient_id), entry)
        ref = state.address_refs(Channel.SMS, f"+7999{index:07d}")[0]
        state.remember_address(ref, recipient_key(TENANT, recipient_id))
    return state


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=200_000)
    parser.add_argument("--top", type=int, default=0, help="show the N largest allocation sites")
    args = parser.parse_args()
    count: int = args.recipients
    print(f"python {platform.python_version()} on {platform.machine()}, {count:,} recipients")
    print("each: one consent, three sends of one message, one SMS address indexed")

    gc.collect()
    before_bytes = resident_bytes() if sys.platform == "linux" else 0
    state = build(count)
    gc.collect()
    if sys.platform == "linux":
        rss_per_recipient = (resident_bytes() - before_bytes) / count
        print(f"RSS delta:   {rss_per_recipient:7.0f} B per recipient")
    del state
    gc.collect()

    tracemalloc.start()
    state = build(count)
    gc.collect()
    traced_bytes, _ = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot() if args.top else None
    tracemalloc.stop()
    print(f"tracemalloc: {traced_bytes / count:7.0f} B per recipient")
    if snapshot is not None:
        for stat in snapshot.statistics("lineno")[: args.top]:
            print(f"  {stat.size / count:7.1f} B  {stat.traceback[0]}")
    del state


if __name__ == "__main__":
    main()
