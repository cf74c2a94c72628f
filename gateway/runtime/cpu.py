"""Where the router's CPU goes: ``gateway_cpu_seconds_total{part}``.

A trio instrument reads the thread's CPU clock before and after every task step and adds the
difference to the part the task belongs to, by the module of the function it runs (its trio
name). The journal's worker threads time their own calls (``SqliteJournal.thread_cpu_seconds``).
What no task step or journal call accounts for, the scheduler's own work, garbage collection,
libzmq's I/O thread, is ``other``: the process's CPU time less the parts, so the parts add up
to what the process used.

``make bench`` divides each part by the sends it measured, so a regression shows where it is
("dispatch" went from 150 to 400 µs per send), not only that the total grew.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from functools import lru_cache

import trio
from prometheus_client.core import CounterMetricFamily, Metric

from gateway.clock import process_cpu_seconds, thread_cpu_seconds


class CpuPart(enum.StrEnum):
    """What a slice of the router's CPU time did (``gateway_cpu_seconds_total{part}``)."""

    ADMISSION = "admission"
    """ZeroMQ ingest: decoding frames, the policy core's verdicts, staging rows, replies."""
    DISPATCH = "dispatch"
    """Lanes, rate limits, loading requests, building provider requests, the HTTP client."""
    WEBHOOK_SERVER = "webhook_server"
    """The public HTTP server: provider webhooks and tracking links (and in-process
    simulators, which run on the same server)."""
    RECEIPTS = "receipts"
    """Applying receipts and events from webhook processes."""
    JOURNAL = "journal"
    """The committer's task and the SQLite worker threads."""
    CASCADE = "cascade"
    """Timers: cascade steps, deferrals, retries."""
    STATUS_EVENTS = "status_events"
    """Publishing status events."""
    ADMIN = "admin"
    """The admin server: /metrics, health, the admin API."""
    OTHER = "other"
    """Everything no task step or journal call accounts for: trio's scheduler, garbage
    collection, libzmq's I/O thread, tasks of no part above."""


_PARTS_BY_MODULE: tuple[tuple[str, CpuPart], ...] = (
    ("gateway.runtime.ingest.", CpuPart.ADMISSION),
    ("gateway.app._serve_ingest", CpuPart.ADMISSION),
    ("gateway.runtime.queues.", CpuPart.DISPATCH),
    ("gateway.runtime.dispatch.", CpuPart.DISPATCH),
    ("gateway.runtime.workers.", CpuPart.DISPATCH),
    ("adapters.", CpuPart.DISPATCH),
    ("gateway.httpserver.", CpuPart.WEBHOOK_SERVER),
    ("gateway.runtime.inbox.", CpuPart.RECEIPTS),
    ("gateway.runtime.committer.", CpuPart.JOURNAL),
    ("gateway.store.", CpuPart.JOURNAL),
    ("gateway.runtime.timers.", CpuPart.CASCADE),
    ("gateway.runtime.publisher.", CpuPart.STATUS_EVENTS),
    ("hypercorn.", CpuPart.ADMIN),
    ("gateway.http.", CpuPart.ADMIN),
)


@lru_cache(maxsize=512)
def part_of(task_name: str) -> CpuPart:
    """The part a task's steps count toward, by the module of the function it runs."""
    for prefix, part in _PARTS_BY_MODULE:
        if task_name.startswith(prefix):
            return part
    return CpuPart.OTHER


class CpuAccounting(trio.abc.Instrument):
    """The instrument, and the collector of ``gateway_cpu_seconds_total``.

    ``journal_thread_seconds`` reads the CPU time the journal's worker threads spent.
    """

    def __init__(self, journal_thread_seconds: Callable[[], float]) -> None:
        self.journal_thread_seconds = journal_thread_seconds
        self.seconds: dict[CpuPart, float] = dict.fromkeys(CpuPart, 0.0)
        self._step_started = 0.0
        self._process_at_start = process_cpu_seconds()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._step_started = thread_cpu_seconds()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.seconds[part_of(task.name)] += thread_cpu_seconds() - self._step_started

    def totals(self) -> dict[CpuPart, float]:
        """Seconds per part since the instrument was made; ``other`` closes the sum to the
        process's CPU time over the same span."""
        totals = dict(self.seconds)
        totals[CpuPart.JOURNAL] += self.journal_thread_seconds()
        accounted = sum(totals.values())
        spent = process_cpu_seconds() - self._process_at_start
        totals[CpuPart.OTHER] += max(0.0, spent - accounted)
        return totals

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "gateway_cpu_seconds",
            "The router process's CPU time by what it did (task steps by their module; the "
            "journal's threads; other: the rest of the process's CPU time).",
            labels=["part"],
        )
        for part, seconds in self.totals().items():
            family.add_metric([part.value], seconds)
        yield family
