"""Send windows: the local hours a message prefers to go out in (e.g. 09-11, 15-17, 20-22).

Rule 1: a set of windows is the complement of a set of quiet windows. Outside every window the
wall clock is inside one of the *gaps* between them, and the next window start is the instant
that gap opens: ``quiet_hours.next_open`` answers it, so midnight wraps, DST gaps and folds are
handled exactly as quiet hours handle them (a window starting at a local time a DST gap skips
opens when the clock jumps past it).
Rule 2: this module reads no clock and no tz database, and knows nothing of categories, caps or
experiments; the policy decides which windows apply to a message (``gateway.core.policy``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import time, timedelta, tzinfo

import msgspec

from gateway.core import quiet_hours
from gateway.core.quiet_hours import QuietWindow

_DAY = timedelta(days=1)


class SendWindows(msgspec.Struct, frozen=True):
    """Windows ``[start, end)`` of local time (built by ``send_windows``), and the gaps between.

    ``spans`` are the windows as configured, merged where they touch or overlap; ``gaps`` the
    local times outside all of them (empty when the windows cover the whole day).
    """

    spans: tuple[QuietWindow, ...]
    gaps: tuple[QuietWindow, ...]


def send_windows(spans: Iterable[tuple[time, time]]) -> SendWindows:
    """Merge windows given as ``(start, end)`` local times; a window wraps midnight when
    ``start > end``.

    Raises:
        ValueError: no window, a window with ``start == end``, or a time with a zone.
    """
    pieces: list[tuple[timedelta, timedelta]] = []
    for start, end in spans:
        if start == end:
            raise ValueError(f"a window from {start} to {end} is empty: start and end must differ")
        if start.tzinfo is not None or end.tzinfo is not None:
            raise ValueError("send window times are local wall-clock times, without a zone")
        begin, finish = _offset(start), _offset(end)
        if begin < finish:
            pieces.append((begin, finish))
        else:  # wraps midnight
            pieces.append((begin, _DAY))
            if finish:
                pieces.append((timedelta(0), finish))
    if not pieces:
        raise ValueError("a send window set needs at least one window")
    merged: list[tuple[timedelta, timedelta]] = []
    for begin, finish in sorted(pieces):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], finish))
        else:
            merged.append((begin, finish))
    if merged[0] == (timedelta(0), _DAY):
        return SendWindows((QuietWindow(time(0), time(12)), QuietWindow(time(12), time(0))), ())
    if len(merged) > 1 and merged[0][0] == timedelta(0) and merged[-1][1] == _DAY:
        # the last window runs on into the first across midnight: one window
        merged = [(merged[-1][0], merged[0][1] + _DAY), *merged[1:-1]]
    windows = tuple(QuietWindow(_time(begin), _time(finish)) for begin, finish in merged)
    gaps = tuple(
        QuietWindow(_time(finish), _time(merged[(index + 1) % len(merged)][0]))
        for index, (_, finish) in enumerate(merged)
    )
    return SendWindows(windows, gaps)


def next_start(windows: SendWindows, now: float, tz: tzinfo) -> float | None:
    """None when ``now`` is inside a window, else the next instant a window opens.

    A gap's opening is where the next window starts. After a DST jump the clock may land in
    another gap (the window between was skipped that day): follow on from there. Every later
    answer is strictly later and a window opens every day, so the walk ends.
    """
    at = now
    while True:
        for gap in windows.gaps:
            opening = quiet_hours.quiet_until(gap, at, tz)
            if opening is not None:
                at = opening
                break
        else:
            return None if at == now else at


def _offset(moment: time) -> timedelta:
    return timedelta(
        hours=moment.hour,
        minutes=moment.minute,
        seconds=moment.second,
        microseconds=moment.microsecond,
    )


def _time(offset: timedelta) -> time:
    offset %= _DAY
    seconds, micro = divmod(offset // timedelta(microseconds=1), 1_000_000)
    hours, rest = divmod(seconds, 3600)
    return time(hours, rest // 60, rest % 60, micro)
