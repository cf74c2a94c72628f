"""Recovery: rebuild the live state from the journal at start.

Waiting cascades come back with their timers, finished keys with their outcomes (so a repeated
send is still a duplicate), consents, recent sends (caps) and the address index (opt-outs that
name only an address). A step that was queued or in flight when the process stopped is sent
again: at-least-once, the only way a message can reach a person twice.
"""

from __future__ import annotations

from typing import Final

import structlog

from gateway.core.cascade import Status
from gateway.core.model import TimerKind
from gateway.runtime.engine import Engine
from gateway.store.base import Journal, MessageRecord, active_pages
from gateway.store.state import State

log = structlog.get_logger("gateway.recovery")

_PAGE: Final = 10_000


async def recover(
    journal: Journal, state: State, engine: Engine, *, now: float, retention_seconds: float
) -> int:
    """Load everything the journal holds; returns how many steps are sent again.

    Active messages come page by page, so each page's copies are freed before the next is
    decoded.
    """
    recovered = await journal.recover(
        now=now, retention_seconds=retention_seconds, horizon_seconds=state.horizon_seconds
    )
    state.finished.update(recovered.finished)
    for key in recovered.finished:
        # finish times are not journalled: each key is kept a full retention from now,
        # longer than needed, never shorter (without this they were never forgotten)
        state.remember_finished(key, now)
    for rkey, consent in recovered.consents:
        state.apply_consent(rkey, consent)
    for rkey, entry in recovered.sends:
        state.record_send(rkey, entry)
    state.address_key = recovered.address_key
    for address, recipient in recovered.addresses:
        state.remember_address(address, recipient)
    active = resent = 0
    async for records in active_pages(journal, limit=_PAGE):
        active += len(records)
        resent += len(restore(records, state, engine, now=now))
    if active or recovered.finished:
        log.info(
            "journal_recovered", active=active, finished=len(recovered.finished), resent=resent
        )
    return resent


def restore(
    records: list[MessageRecord], state: State, engine: Engine, *, now: float
) -> list[MessageRecord]:
    """Rebuild timers and indexes from recovered records; returns those caught mid-send."""
    resend: list[MessageRecord] = []
    for record in records:
        state.restore(record)
        if record.step_due is not None:
            state.schedule(record.key, TimerKind.STEP, record.step_due)
        if record.expiry_due is not None:
            state.schedule(record.key, TimerKind.EXPIRY, record.expiry_due)
        if record.cascade.status is Status.SENDING:
            resend.append(record)
    for record in resend:
        engine.enqueue(record, record.cascade.channel, record.cascade.step, now, None)
    return resend
