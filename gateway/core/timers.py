"""Deadlines: a keyed timer heap, expired by a ``now`` passed in (trio's ``Deadlines.expire``).

Rule 1: no clock and no sleeping; ``pop_due(now)`` hands back whatever is due.
Rule 2: one deadline per key. Scheduling a key again replaces its deadline, cancelling removes
it; both are O(log n) amortised through lazy deletion (stale heap entries are skipped when
they surface), so a million pending timers cost one heap entry and one dict entry each.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, int] = {}  # key -> sequence number of its live heap entry
        self._seq = 0

    def schedule(self, key: K, deadline: float) -> None:
        self._seq += 1
        self._live[key] = self._seq
        heapq.heappush(self._heap, (deadline, self._seq, key))
        if len(self._heap) > 2 * len(self._live) + 1024:
            self._compact()

    def cancel(self, key: K) -> bool:
        """Forget ``key``; returns whether it was scheduled."""
        return self._live.pop(key, None) is not None

    def __contains__(self, key: K) -> bool:
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)

    def next_deadline(self) -> float | None:
        self._drop_stale_head()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int | None = None) -> list[tuple[K, float]]:
        """Remove and return ``(key, deadline)`` for every deadline ``<= now``, earliest first."""
        due: list[tuple[K, float]] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(due) < limit):
            deadline, seq, key = heapq.heappop(heap)
            if self._live.get(key) == seq:
                del self._live[key]
                due.append((key, deadline))
        return due

    def _drop_stale_head(self) -> None:
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if self._live.get(entry[2]) == entry[1]]
        heapq.heapify(self._heap)
