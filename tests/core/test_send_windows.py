"""Send windows on the recipient's wall clock, DST- and midnight-safe (core/send_windows.py)."""

from __future__ import annotations

from datetime import UTC, datetime, time, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.core.quiet_hours import QuietWindow
from gateway.core.send_windows import SendWindows, next_start, send_windows

MOSCOW = ZoneInfo("Europe/Moscow")
NEW_YORK = ZoneInfo("America/New_York")
ARTICLES = send_windows([(time(9), time(11)), (time(15), time(17)), (time(20), time(22))])
"""The hours the articles name: mornings and mid-afternoon for email, evenings for shopping."""


def local(tz: tzinfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


def inside(windows: SendWindows, now: float, tz: tzinfo) -> bool:
    wall = datetime.fromtimestamp(now, tz).time()
    return any(span.contains(wall) for span in windows.spans)


class TestBuilding:
    """Windows are merged where they touch; the gaps between them are what is left of a day."""

    def test_the_articles_hours(self) -> None:
        assert (
            QuietWindow(time(11), time(15)),
            QuietWindow(time(17), time(20)),
            QuietWindow(time(22), time(9)),
        ) == ARTICLES.gaps

    def test_touching_and_overlapping_windows_merge(self) -> None:
        merged = send_windows([(time(10), time(12)), (time(9), time(10)), (time(11), time(13))])
        assert (QuietWindow(time(9), time(13)),) == merged.spans
        assert (QuietWindow(time(13), time(9)),) == merged.gaps

    def test_a_window_across_midnight(self) -> None:
        late = send_windows([(time(22), time(2)), (time(8), time(9))])
        assert (QuietWindow(time(22), time(2)), QuietWindow(time(8), time(9))) == late.spans
        assert (QuietWindow(time(2), time(8)), QuietWindow(time(9), time(22))) == late.gaps

    def test_windows_meeting_at_midnight_are_one(self) -> None:
        joined = send_windows([(time(0), time(6)), (time(20), time(0))])
        assert (QuietWindow(time(20), time(6)),) == joined.spans
        assert (QuietWindow(time(6), time(20)),) == joined.gaps

    def test_a_window_from_midnight(self) -> None:
        morning = send_windows([(time(0), time(6, 30, 15, 7))])
        assert (QuietWindow(time(6, 30, 15, 7), time(0)),) == morning.gaps

    def test_the_whole_day_has_no_gap(self) -> None:
        always = send_windows([(time(0), time(12)), (time(12), time(0))])
        assert () == always.gaps
        assert None is next_start(always, local(MOSCOW, 2024, 3, 14, 3), MOSCOW)

    @pytest.mark.parametrize(
        ("spans", "message"),
        [
            ([], "needs at least one window"),
            ([(time(9), time(9))], "start and end must differ"),
            ([(time(9, tzinfo=UTC), time(10))], "without a zone"),
        ],
    )
    def test_refused(self, spans: list[tuple[time, time]], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            send_windows(spans)


class TestNextStart:
    """Inside a window: None. Outside: the next window start, in the recipient's zone."""

    @pytest.mark.parametrize(
        ("now", "expected"),
        [
            (local(MOSCOW, 2024, 3, 14, 10), None),
            (local(MOSCOW, 2024, 3, 14, 9), None),
            (local(MOSCOW, 2024, 3, 14, 11), local(MOSCOW, 2024, 3, 14, 15)),
            (local(MOSCOW, 2024, 3, 14, 17, 30), local(MOSCOW, 2024, 3, 14, 20)),
            (local(MOSCOW, 2024, 3, 14, 23), local(MOSCOW, 2024, 3, 15, 9)),
            (local(MOSCOW, 2024, 3, 14, 3), local(MOSCOW, 2024, 3, 14, 9)),
        ],
    )
    def test_moscow(self, now: float, expected: float | None) -> None:
        assert expected == next_start(ARTICLES, now, MOSCOW)

    def test_a_window_start_in_a_dst_gap_opens_when_the_clock_jumps(self) -> None:
        # New York, 10 March 2024: 02:00 never happens, the clock goes 01:59:59 -> 03:00
        early = send_windows([(time(2, 30), time(4))])
        now = local(NEW_YORK, 2024, 3, 10, 1)
        jump = datetime(2024, 3, 10, 7, tzinfo=UTC).timestamp()  # 03:00 EDT
        assert jump == next_start(early, now, NEW_YORK)

    def test_a_window_inside_a_dst_gap_is_skipped_that_day(self) -> None:
        # 02:10-02:40 never happens on 10 March 2024 in New York: the next one is on the 11th
        lost = send_windows([(time(2, 10), time(2, 40))])
        now = local(NEW_YORK, 2024, 3, 10, 1)
        assert local(NEW_YORK, 2024, 3, 11, 2, 10) == next_start(lost, now, NEW_YORK)

    @settings(max_examples=300, deadline=None)
    @given(
        spans=st.lists(
            st.tuples(
                st.times().map(lambda t: t.replace(microsecond=0, second=0)),
                st.times().map(lambda t: t.replace(microsecond=0, second=0)),
            ).filter(lambda pair: pair[0] != pair[1]),
            min_size=1,
            max_size=4,
        ),
        tz=st.timezones(),
        now=st.datetimes(
            min_value=datetime(1995, 1, 1),  # noqa: DTZ001 - hypothesis bounds are naive
            max_value=datetime(2080, 1, 1),  # noqa: DTZ001
            timezones=st.just(UTC),
        ).map(lambda d: d.timestamp()),
    )
    def test_the_next_start_is_the_first_instant_inside(
        self, spans: list[tuple[time, time]], tz: tzinfo, now: float
    ) -> None:
        windows = send_windows(spans)
        opening = next_start(windows, now, tz)
        if opening is None:
            assert inside(windows, now, tz)
            event("inside")
            return
        assert not inside(windows, now, tz)
        assert opening > now
        assert inside(windows, opening, tz)
        # no earlier instant is inside (sampled; whole-minute windows and offsets)
        for i in range(1, 24):
            sample = now + (opening - now) * i / 24
            assert not inside(windows, sample, tz), (sample, opening)
        event("deferred")
