"""Admission CPU on the router's thread, per message, at batch 100: decode, policy, staging.

    python bench/admission_bench.py [--frames 400] [--rounds 5]

A real gateway (SQLite journal, metrics, publisher) is opened in this process with quiet hours
all day, so every send is admitted and deferred (no provider traffic), and frames of 100 sends
as the locustfile builds them are handed to the router as ingest hands them: decoded, then
``Router.handle_frame``. The figure is the trio thread's CPU time (``time.thread_time``) per
message: what ``make bench``'s admission scenario measures minus ZeroMQ, the edge process and
the journal's SQLite thread, so a change to the admission path shows without the noise of the
rest. Prints figures; asserts nothing. Lowest of ``--rounds`` rounds, as for any timing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import free_port, free_port_block  # noqa: E402
from bench.payloads import promo_send  # noqa: E402
from bench.run import CONFIG, QUIET_ALL_DAY  # noqa: E402
from gateway.app import open_gateway  # noqa: E402
from gateway.cli import tune_gc  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.protocol import decode_frame  # noqa: E402

BATCH = 100


def send(index: int) -> dict[str, object]:
    """The locustfile's send request (bench/payloads.py)."""
    return promo_send(index, message_id=f"bench-{index}", tenant="demo", priority="normal")


def config_text(directory: Path) -> str:
    base = free_port_block(4)
    return CONFIG.format(
        ingest_port=free_port(),
        status_port=free_port(),
        http_port=free_port(),
        public_port=free_port(),
        store=directory / "journal.db",
        synchronous="normal",
        quiet=QUIET_ALL_DAY,
        rate=20000,
        concurrency=8,
        cpu_breakdown="false",
        **{
            f"sim_port_{name}": base + n
            for n, name in enumerate(("fcm", "sendgrid", "twilio", "viber"))
        },
    )


async def measure(frames: int, rounds: int) -> list[float]:
    directory = Path(tempfile.mkdtemp(prefix="cascadegw-admission-"))
    config = load_config(config_text(directory).encode(), {})
    figures = []
    async with open_gateway(config, adapters={}, serve_http=False) as gateway:
        router, committer = gateway.router, gateway.committer
        index = 0
        for _ in range(rounds):
            payloads = []
            for _ in range(frames):
                payloads.append(msgpack.packb([send(index + n) for n in range(BATCH)]))
                index += BATCH
            started = time.thread_time()
            for payload in payloads:
                frame = decode_frame(payload)
                router.handle_frame(frame)
                if committer.pending_rows > 20_000:
                    spent = time.thread_time()
                    await committer.drain()  # the journal's thread: not counted
                    started += time.thread_time() - spent
            figures.append((time.thread_time() - started) / (frames * BATCH) * 1e6)
            await committer.drain()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tune_gc()  # as `cascadegw run` does: the collector's schedule is part of the cost
    figures = trio.run(measure, args.frames, args.rounds)
    rounds = ", ".join(f"{figure:.1f}" for figure in figures)
    print(
        f"admission on the router thread, batch {BATCH}: {min(figures):.1f} µs per message "
        f"(lowest of {args.rounds} rounds of {args.frames * BATCH:,} messages: {rounds})"
    )


if __name__ == "__main__":
    main()
