"""Queries: what a message's state is, and whether a repeated send is the same request.

Reads combine three places, newest first: live records in memory, writes staged but not yet
durable (read-your-writes: a status asked right after a receipt shows it), and the journal.
``status`` requests and sends whose id is taken come out of admission as queries, because
their answers need the journal; ``answer`` resolves a frame's queries off the ingest path.
"""

from __future__ import annotations

from typing import Final

import msgspec
import structlog

from gateway.core.cascade import Status
from gateway.core.consent import ConsentRecord
from gateway.core.model import RecipientKey, RejectReason, split_key
from gateway.protocol import (
    MessageState,
    Result,
    ResultStatus,
    SendRequest,
    StatusEvent,
    epoch,
    rejected,
    utc,
)
from gateway.runtime.committer import Committer
from gateway.runtime.labels import Op
from gateway.runtime.metrics import Metrics
from gateway.store.base import Journal, JournalCorrupt, MessageRecord
from gateway.store.state import State

log = structlog.get_logger("gateway.queries")

_request_decoder: Final = msgspec.msgpack.Decoder(SendRequest)
_STATE_NAMES: Final = {
    Status.DEFERRED: "deferred",
    Status.SENDING: "sending",
    Status.AWAITING: "awaiting",
    Status.FINISHED: "finished",
}


class StatusQuery:
    """A ``status`` request: its answer reads the journal (the timeline)."""

    __slots__ = ("key", "message_id")

    def __init__(self, key: str, message_id: str) -> None:
        self.key = key
        self.message_id = message_id


class DuplicateQuery:
    """A ``send`` whose id is taken: ``duplicate`` if it is the same request, ``conflict`` if
    not (Stripe's idempotency keys); telling them apart reads the original from the journal."""

    __slots__ = ("key", "request")

    def __init__(self, key: str, request: SendRequest) -> None:
        self.key = key
        self.request = request


JournalQuery = StatusQuery | DuplicateQuery


class Queries:
    def __init__(
        self, *, state: State, committer: Committer, journal: Journal, metrics: Metrics
    ) -> None:
        self.state = state
        self.committer = committer
        self.journal = journal
        self.metrics = metrics

    async def answer(self, queries: list[JournalQuery]) -> list[Result]:
        """Resolve the queries of a frame, one journal read per kind."""
        statuses = [q for q in queries if isinstance(q, StatusQuery)]
        duplicates = [q for q in queries if isinstance(q, DuplicateQuery)]
        try:
            states = await self.message_states([q.key for q in statuses]) if statuses else {}
            originals = await self._originals([q.key for q in duplicates]) if duplicates else {}
        except JournalCorrupt as exc:
            # one unreadable row must not take the ingest loop (and the gateway) down
            log.error("query_unreadable", error=str(exc))
            return [
                rejected(RejectReason.NOT_FOUND, f"unreadable: {exc}", split_key(q.key)[1])
                for q in queries
            ]
        answers: list[Result] = []
        for query in queries:
            message_id = split_key(query.key)[1]
            if isinstance(query, StatusQuery):
                answers.append(
                    Result(ResultStatus.OK, id=message_id, message=states.get(query.key))
                )
                continue
            original = originals.get(query.key)
            if original is not None and canonical(original) != canonical(query.request):
                self.metrics.refused(RejectReason.CONFLICT)
                answer = rejected(
                    RejectReason.CONFLICT,
                    "this id was used for a different request; a retry must repeat it exactly",
                    message_id,
                )
            else:
                self.metrics.duplicate()
                answer = Result(
                    ResultStatus.DUPLICATE, id=message_id, message=self.brief(query.key)
                )
            self.metrics.request(Op.SEND, answer.status)
            answers.append(answer)
        return answers

    async def _originals(self, keys: list[str]) -> dict[str, SendRequest]:
        """The requests first sent under these keys: staged ones, else the journal's."""
        raws = {key: raw for key in keys if (raw := self.committer.staged_request(key))}
        missing = [key for key in keys if key not in raws]
        if missing:
            raws.update(await self.journal.requests(missing))
        return {key: _request_decoder.decode(raw) for key, raw in raws.items()}

    async def message_state(self, key: str) -> MessageState | None:
        """The message's state and whole timeline (reads the journal)."""
        return (await self.message_states([key])).get(key)

    async def message_states(self, keys: list[str]) -> dict[str, MessageState]:
        """States and timelines of several messages: one read for the timelines, one for
        finished messages' records.

        The reads await a thread, and a commit may land meanwhile: staged events are taken
        before and after the reads (and de-duplicated against the journal), and a record that
        finished and became durable during the reads is fetched in a second read.
        """
        records = self.state.records
        wanted = set(keys)
        staged = self._staged_events(wanted)
        committer = self.committer
        # a record staged now may commit while the reads run, and the read may have taken its
        # snapshot before: such a row is read again below (read-your-writes for a status asked
        # right after a receipt finished the message)
        staged_before = {key for key in keys if committer.staged_record(key) is not None}
        archived = [key for key in keys if key not in records]
        stored = await self.journal.messages(archived) if archived else {}
        timelines = await self.journal.timelines(keys)
        for key, events in self._staged_events(wanted).items():
            staged.setdefault(key, []).extend(events)
        for key, events in staged.items():
            timeline = timelines.setdefault(key, [])
            seen = set(timeline)
            for event in events:
                if event not in seen:
                    seen.add(event)
                    timeline.append(event)
        late = [
            k
            for k in keys
            if k not in records
            and committer.staged_record(k) is None
            and (k not in stored or k in staged_before)
        ]
        if late:
            stored.update(await self.journal.messages(late))
        states: dict[str, MessageState] = {}
        for key in keys:
            # newest first: live, then staged (finished but not yet durable), then journalled
            record = records.get(key) or committer.staged_record(key)
            if record is None:
                found = stored.get(key)
                if found is None:
                    continue
                record = found.record
            states[key] = msgspec.structs.replace(describe(record), timeline=timelines.get(key, []))
        return states

    def _staged_events(self, wanted: set[str]) -> dict[str, list[StatusEvent]]:
        found: dict[str, list[StatusEvent]] = {}
        for event in self.committer.staged_events():  # written but not yet durable
            key = f"{event.tenant}:{event.id}"
            if key in wanted:
                found.setdefault(key, []).append(event)
        return found

    def brief(self, key: str) -> MessageState | None:
        """The state without the timeline, from memory only (what a reply carries)."""
        record = self.state.records.get(key)
        if record is not None:
            return describe(record)
        outcome = self.state.finished.get(key)
        if outcome is not None:
            return MessageState(state="finished", outcome=outcome)
        return None

    async def consents(
        self, recipient: RecipientKey
    ) -> tuple[list[ConsentRecord], list[ConsentRecord]]:
        """The recipient's effective consent records, and the whole history."""
        current = self.state.consents_of(recipient)
        history = await self.journal.consent_history(recipient)
        return (list(current.records) if current else []), history


def describe(record: MessageRecord) -> MessageState:
    cascade = record.cascade
    return MessageState(
        state=_STATE_NAMES[cascade.status],
        channel=None if cascade.finished else cascade.channel,
        outcome=cascade.outcome,
        channels=[c for c in cascade.plan if cascade.allowed & c.bit],
        deferred_until=(
            utc(record.step_due)
            if cascade.status is Status.DEFERRED and record.step_due is not None
            else None
        ),
    )


def canonical(request: SendRequest) -> SendRequest:
    """The request with its times as instants: the same moment written with another offset
    is the same request (a retry may be re-serialised by another library)."""

    def instant(moment: str | None) -> str | None:
        seconds = epoch(moment)
        return None if seconds is None else repr(seconds)

    return msgspec.structs.replace(
        request, send_at=instant(request.send_at), expires_at=instant(request.expires_at)
    )
