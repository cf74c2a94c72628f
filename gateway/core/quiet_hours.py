"""Quiet hours: wall-clock windows in the recipient's time zone when a channel stays silent.

Rule 1: quietness is a property of the recipient's *wall clock*: an instant is quiet iff its
local time of day lies in ``[start, end)`` (wrapping midnight when ``start > end``). Nothing
else: no dates, no offsets. That definition is what "nobody is woken at 3 a.m." means, and it
stays well defined through DST gaps (a local time that never happens is never quiet) and folds
(a local time that happens twice is quiet both times).
Rule 2: this module reads no clock and no tz database; the caller passes a ``tzinfo``.

``next_open`` returns the earliest instant at or after ``now`` that is not quiet. The wall
clock only leaves the window in two ways: it reaches ``end``, or a UTC-offset transition jumps
it out. Both kinds of instant are collected for the days around ``now`` and the earliest one
that is not quiet wins, so the answer is exact, not a scan.

``quiet_until`` is what the policy asks on every message: both answers at once, memoised per
(window, zone, UTC minute). A minute's verdict is the same for every instant in it when the
zone's offset is a whole number of minutes that does not change inside that minute (so it is
one local minute) and no window bound falls inside that local minute after its first instant;
any other minute is computed exactly, every time.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, time, timedelta, tzinfo

import msgspec


class QuietWindow(msgspec.Struct, frozen=True):
    """Local times ``[start, end)``; wraps midnight when ``start > end``; ``start != end``."""

    start: time
    end: time

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ValueError("quiet window start and end must differ")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("quiet window times are local wall-clock times, without a zone")

    def contains(self, local: time) -> bool:
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


def quiet_until(window: QuietWindow, now: float, tz: tzinfo) -> float | None:
    """None when ``now`` is not quiet, else ``next_open(window, now, tz)``."""
    minute = int(now // 60)
    # the wall clock has microseconds and rounds to the nearest: an instant within half a
    # microsecond of the next minute reads as that minute, so it is asked exactly
    if now - minute * 60 < _LAST_WHOLE_MICROSECOND:
        uniform, opening = _minute_verdict(window, tz, minute)
        if uniform:
            return opening
    if not is_quiet(window, now, tz):
        return None
    return next_open(window, now, tz)


_LAST_WHOLE_MICROSECOND = 59.999999


@functools.lru_cache(maxsize=8192)
def _minute_verdict(window: QuietWindow, tz: tzinfo, minute: int) -> tuple[bool, float | None]:
    """``(True, verdict)`` when every instant of the UTC minute shares one verdict (None: not
    quiet; else the opening); ``(False, None)`` when the instants must be asked one by one."""
    first = float(minute * 60)
    local = local_time(first, tz)
    offset = local.utcoffset()
    # transitions fall on whole seconds, so the minute's last whole second shows any change
    if offset is None or offset != _offset(first + 59, tz) or offset % timedelta(minutes=1):
        return False, None
    # the UTC minute is one local minute; a window bound inside it (not at its start) splits it
    local_minute = (local.hour, local.minute)
    for bound in (window.start, window.end):
        if (bound.hour, bound.minute) == local_minute and (bound.second or bound.microsecond):
            return False, None
    if not is_quiet(window, first, tz):
        return True, None
    # quiet from the minute's first instant to its last: the opening lies beyond it, and is
    # the same whichever instant of the minute asks
    return True, next_open(window, first, tz)


def local_time(now: float, tz: tzinfo) -> datetime:
    return datetime.fromtimestamp(now, tz)


def is_quiet(window: QuietWindow, now: float, tz: tzinfo) -> bool:
    return window.contains(local_time(now, tz).time())


def next_open(window: QuietWindow, now: float, tz: tzinfo) -> float:
    """The earliest instant ``>= now`` (POSIX seconds) whose local time is outside the window."""
    local = local_time(now, tz)
    wall = local.time()
    if not window.contains(wall):
        return now
    # Fast path: the opening is the next time the wall clock shows `end` (today, or tomorrow
    # when we are in the evening part of a window that wraps midnight), provided the zone's
    # offset is the same then as now. Zones change offset at most once a day, so equal offsets
    # less than a day apart mean the wall clock runs straight there, through quiet time only.
    day = local.date() + timedelta(days=1) if wall >= window.end else local.date()
    candidate = datetime.combine(day, window.end, tzinfo=tz).timestamp()
    if candidate > now:
        arrived = datetime.fromtimestamp(candidate, tz)
        if (
            arrived.utcoffset() == local.utcoffset()
            and arrived.time() == window.end
            and arrived.date() == day
        ):
            return candidate
    return _next_open_exact(window, now, tz, local.date())


def _next_open_exact(window: QuietWindow, now: float, tz: tzinfo, today: date) -> float:
    """The DST-aware search: every instant where quietness can change, earliest first."""
    candidates: list[float] = []
    # A window is shorter than a day, so the opening lies within two local days of `now`;
    # a day either side more covers the zone's offset and any fold around midnight.
    for offset_days in range(-1, 3):
        day = today + timedelta(days=offset_days)
        candidates.extend(_wall_clock_instants(day, window.end, tz))
        transition = _offset_transition(day, tz)
        if transition is not None:
            candidates.append(transition)
    # `now` is quiet, so the clock leaves the window later, by reaching `end` or by an offset
    # jump, within the days searched: both kinds of instant are candidates, and one opens.
    opening = next((c for c in sorted(candidates) if c > now and not is_quiet(window, c, tz)), None)
    assert opening is not None, f"no opening found for {window!r} after {now!r} in {tz!r}"
    return opening


def _wall_clock_instants(day: date, at: time, tz: tzinfo) -> list[float]:
    """Instants when the local wall clock shows ``at`` on ``day``, or, if a DST gap skips it,
    the first instant after the gap (when the clock has just passed it)."""
    instants: list[float] = []
    for fold in (0, 1):
        local = datetime.combine(day, at, tzinfo=tz).replace(fold=fold)
        instant = local.timestamp()
        back = datetime.fromtimestamp(instant, tz)
        if back.replace(tzinfo=None, fold=0) == local.replace(tzinfo=None, fold=0):
            instants.append(instant)
    if not instants:
        # `at` falls in a gap: the wall clock jumps over it at the transition
        transition = _offset_transition(day, tz)
        if transition is not None:
            instants.append(transition)
    return instants


def _offset_transition(day: date, tz: tzinfo) -> float | None:
    """The instant the zone's UTC offset changes during ``day`` (local), if it does.

    Zones change offset at most once a day; bisection over whole seconds finds the instant.
    """
    start = datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)
    end = start + timedelta(days=1, hours=2)
    low, high = int(start.timestamp()), int(end.timestamp())
    low_offset = _offset(low, tz)
    if _offset(high, tz) == low_offset:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if _offset(middle, tz) == low_offset:
            low = middle
        else:
            high = middle
    return float(high)


def _offset(instant: float, tz: tzinfo) -> timedelta | None:
    return datetime.fromtimestamp(instant, tz).utcoffset()
