"""Quiet hours on the recipient's wall clock, DST- and midnight-safe (core/quiet_hours.py)."""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.core.quiet_hours import QuietWindow, is_quiet, local_time, next_open, quiet_until

MOSCOW = ZoneInfo("Europe/Moscow")
NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
APIA = ZoneInfo("Pacific/Apia")
ODD_OFFSET = timezone(timedelta(hours=3, seconds=30))

FIRST_YEAR, LAST_YEAR = 1990, 2090
EARLIEST = datetime(FIRST_YEAR, 1, 1, tzinfo=UTC).timestamp()
LATEST = datetime(LAST_YEAR, 12, 31, tzinfo=UTC).timestamp()
DELIBERATE_ZONES = (  # (zone, years in which it shifts its offset)
    ("Europe/London", 1990, 2090),
    ("America/New_York", 1990, 2090),
    ("Australia/Lord_Howe", 1990, 2090),  # a 30-minute shift
    ("Europe/Moscow", 1990, 2014),
    ("America/Sao_Paulo", 1990, 2018),  # DST used to start at local midnight
    ("America/Havana", 1990, 2090),  # and here still does
    ("America/Santiago", 1990, 2090),  # transitions at 24:00
    ("Asia/Tehran", 1990, 2022),
    ("Africa/Casablanca", 2008, 2090),  # DST suspended for Ramadan: transitions weeks apart
    ("Antarctica/Troll", 2005, 2090),  # a two-hour shift
    ("Europe/Dublin", 1990, 2090),  # negative DST in tzdata
    ("Pacific/Apia", 2010, 2012),  # skipped 30 December 2011 entirely
    ("Pacific/Kiritimati", 1994, 1994),  # skipped 31 December 1994
    ("Asia/Gaza", 1990, 2090),
)
DAY_SKIPPERS = frozenset(
    {
        "Pacific/Apia",
        "Pacific/Kiritimati",
        "Pacific/Kwajalein",
        "Pacific/Enderbury",
        "Pacific/Kanton",
    }
)


def at(
    tz: tzinfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, fold: int = 0
) -> float:
    """POSIX seconds of a local wall-clock reading in ``tz``."""
    return datetime(year, month, day, hour, minute, tzinfo=tz, fold=fold).timestamp()


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def window(start: str, end: str) -> QuietWindow:
    return QuietWindow(time.fromisoformat(start), time.fromisoformat(end))


@functools.cache
def transitions(key: str, year: int) -> tuple[int, ...]:
    """Every instant of ``year`` at which zone ``key`` changes its UTC offset (whole seconds).

    Found independently of the module under test: a daily scan, then bisection. (Two changes
    within one day would cancel out; no zone in 1990-2090 has them.)
    """
    tz = ZoneInfo(key)

    def offset(instant: int) -> timedelta | None:
        return datetime.fromtimestamp(instant, tz).utcoffset()

    step = 86400
    first = int(datetime(year, 1, 1, tzinfo=UTC).timestamp())
    last = int(datetime(year + 1, 1, 1, tzinfo=UTC).timestamp())
    found: list[int] = []
    for low in range(first, last, step):
        high = low + step
        if offset(low) == offset(high):
            continue
        while high - low > 1:
            middle = (low + high) // 2
            if offset(middle) == offset(low):
                low = middle
            else:
                high = middle
        found.append(high)
    return tuple(found)


def end_readings(end: time, tz: ZoneInfo, since: float, until: float) -> list[float]:
    """Every instant in ``[since, until]`` at which the local wall clock reads ``end``."""
    first = local_time(since, tz).date() - timedelta(days=1)
    last = local_time(until, tz).date() + timedelta(days=1)
    found: list[float] = []
    day = first
    while day <= last:
        for fold in (0, 1):
            instant = datetime.combine(day, end, tzinfo=tz).replace(fold=fold).timestamp()
            shown = local_time(instant, tz)
            if shown.date() == day and shown.time() == end and since <= instant <= until:
                found.append(instant)
        day += timedelta(days=1)
    return found


# ---------------------------------------------------------------- strategies
minute_times = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45, 59]))
second_times = st.builds(time, st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
# most zones change offset between midnight and 03:00 local: put ends in and around the gaps
night_times = st.builds(time, st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 10, 30, 59]))
any_times = minute_times | second_times | night_times | st.times()


def _distinct(pair: tuple[time, time]) -> QuietWindow:
    start, end = pair
    if start == end:  # nudge instead of filtering: every draw is a valid window
        end = (datetime.combine(date(2000, 1, 1), end, tzinfo=UTC) + timedelta(minutes=1)).time()
    return QuietWindow(start, end)


windows = st.tuples(any_times, any_times).map(_distinct)
any_zones = st.timezones()  # built once: building it scans the tz database


def _near(draw: st.DrawFn, tz: ZoneInfo, year: int) -> float:
    """An instant of ``year``, usually in the day before (or just after) an offset change."""
    near = transitions(tz.key, year)
    if near and draw(st.integers(0, 4)) > 0:  # four times in five
        base: int = draw(st.sampled_from(near))
        shift = draw(
            st.integers(-26 * 3600, 2 * 3600).map(float)
            | st.floats(min_value=-26 * 3600.0, max_value=2 * 3600.0)
            | st.sampled_from([-3600.0, -1.0, -0.5, -1e-6, 0.0, 1e-6, 0.5, 1.0])
        )
        return float(base) + shift
    first = datetime(year, 1, 1, tzinfo=UTC).timestamp()
    return draw(
        st.integers(int(first), int(first) + 365 * 86400).map(float)
        | st.floats(min_value=first, max_value=first + 365 * 86400)
    )


@st.composite
def zone_and_instant(draw: st.DrawFn) -> tuple[ZoneInfo, float]:
    """Any IANA zone at any instant of 1990-2090, or a zone known for odd shifts near one."""
    if draw(st.integers(0, 4)) < 2:
        tz = draw(any_zones)
        year = draw(st.integers(FIRST_YEAR, LAST_YEAR))
    else:
        key, first_year, last_year = draw(st.sampled_from(DELIBERATE_ZONES))
        tz = ZoneInfo(key)
        year = draw(st.integers(first_year, last_year))
    return tz, _near(draw, tz, year)


class TestQuietWindow:
    """A window is ``[start, end)`` of local time, wrapping midnight when ``start > end``."""

    @pytest.mark.parametrize(
        ("start", "end", "local", "expected"),
        [
            ("21:00", "09:00", "23:30", True),
            ("21:00", "09:00", "00:00", True),
            ("21:00", "09:00", "08:59:59.999999", True),
            ("21:00", "09:00", "09:00", False),
            ("21:00", "09:00", "20:59:59", False),
            ("21:00", "09:00", "21:00", True),
            ("13:00", "14:30", "13:00", True),
            ("13:00", "14:30", "14:29:59", True),
            ("13:00", "14:30", "14:30", False),
            ("13:00", "14:30", "12:59:59", False),
            ("00:00", "06:00", "00:00", True),
            ("22:00", "00:00", "23:59:59", True),
            ("22:00", "00:00", "00:00", False),
        ],
    )
    def test_contains(self, start: str, end: str, local: str, expected: bool) -> None:
        assert expected == window(start, end).contains(time.fromisoformat(local))

    def test_start_equal_to_end_is_refused(self) -> None:
        with pytest.raises(ValueError, match="differ"):
            window("09:00", "09:00")

    @pytest.mark.parametrize(
        ("start", "end"),
        [
            (time(21, tzinfo=UTC), time(9)),
            (time(21), time(9, tzinfo=timezone(timedelta(hours=3)))),
        ],
    )
    def test_zoned_times_are_refused(self, start: time, end: time) -> None:
        with pytest.raises(ValueError, match="wall-clock"):
            QuietWindow(start, end)


def micros(clock: time) -> int:
    return ((clock.hour * 60 + clock.minute) * 60 + clock.second) * 1_000_000 + clock.microsecond


class TestIsQuiet:
    """Quietness depends on the local wall clock only."""

    @settings(max_examples=500)
    @given(quiet=windows, local=any_times)
    def test_contains_is_start_to_end_around_the_clock(
        self, quiet: QuietWindow, local: time
    ) -> None:
        """``[start, end)`` on a 24-hour circle: how far past start, versus the window's length."""
        day = 86_400_000_000
        since_start = (micros(local) - micros(quiet.start)) % day
        length = (micros(quiet.end) - micros(quiet.start)) % day
        assert (since_start < length) == quiet.contains(local)

    @pytest.mark.parametrize(
        ("tz", "now", "expected"),
        [
            (MOSCOW, at(MOSCOW, 2024, 3, 14, 23, 30), True),
            (MOSCOW, at(MOSCOW, 2024, 3, 15, 9, 0), False),
            # 23:30 in Moscow is 20:30 UTC: not quiet on a UTC wall clock
            (UTC, at(MOSCOW, 2024, 3, 14, 23, 30), False),
            # both readings of 01:30 during New York's fall-back are quiet
            (NEW_YORK, at(NEW_YORK, 2024, 11, 3, 1, 30, fold=0), True),
            (NEW_YORK, at(NEW_YORK, 2024, 11, 3, 1, 30, fold=1), True),
        ],
    )
    def test_examples(self, tz: tzinfo, now: float, expected: bool) -> None:
        quiet = window("21:00", "09:00") if tz is not NEW_YORK else window("01:00", "02:00")
        assert expected == is_quiet(quiet, now, tz)

    def test_local_time_is_aware(self) -> None:
        local = local_time(utc(2024, 3, 14, 20, 30), MOSCOW)
        assert datetime(2024, 3, 14, 23, 30, tzinfo=MOSCOW) == local
        assert timedelta(hours=3) == local.utcoffset()


class TestNextOpenExamples:
    """``next_open`` finds the window's opening on the recipient's wall clock."""

    @pytest.mark.parametrize(
        ("quiet", "tz", "now", "expected"),
        [
            pytest.param(
                window("21:00", "09:00"),
                MOSCOW,
                at(MOSCOW, 2024, 3, 14, 23, 30),
                at(MOSCOW, 2024, 3, 15, 9, 0),
                id="23:30 Moscow promo waits for 09:00 next morning",
            ),
            pytest.param(
                window("21:00", "09:00"),
                MOSCOW,
                at(MOSCOW, 2024, 3, 15, 3, 0),
                at(MOSCOW, 2024, 3, 15, 9, 0),
                id="after midnight the same morning",
            ),
            pytest.param(
                window("21:00", "09:00"),
                MOSCOW,
                at(MOSCOW, 2024, 12, 31, 22, 0),
                at(MOSCOW, 2025, 1, 1, 9, 0),
                id="across new year",
            ),
            pytest.param(
                window("13:00", "14:30:15"),
                UTC,
                utc(2024, 2, 29, 13, 0),
                utc(2024, 2, 29, 14, 30, 15),
                id="a window that does not wrap, second precision",
            ),
            pytest.param(
                window("22:00", "02:30"),
                NEW_YORK,
                at(NEW_YORK, 2024, 3, 10, 1, 0),
                utc(2024, 3, 10, 7, 0),  # 03:00 EDT: the clock jumped from 02:00 past 02:30
                id="end inside the spring-forward gap opens at the transition",
            ),
            pytest.param(
                window("22:00", "02:15"),
                LORD_HOWE,
                at(LORD_HOWE, 2024, 10, 6, 1, 0),
                utc(2024, 10, 5, 15, 30),  # 02:00 +10:30 becomes 02:30 +11:00
                id="Lord Howe's 30-minute gap",
            ),
            pytest.param(
                window("01:00", "02:00"),
                NEW_YORK,
                utc(2024, 11, 3, 5, 0),  # 01:00 EDT
                utc(2024, 11, 3, 7, 0),  # 02:00 EST: 01:00-02:00 happened twice
                id="a repeated hour is quiet both times",
            ),
            pytest.param(
                window("00:00", "01:30"),
                NEW_YORK,
                utc(2024, 11, 3, 4, 30),  # 00:30 EDT
                utc(2024, 11, 3, 5, 30),  # the first 01:30 (EDT)
                id="fold: first reading of the end",
            ),
            pytest.param(
                window("00:00", "01:30"),
                NEW_YORK,
                utc(2024, 11, 3, 6, 10),  # 01:10 EST, quiet again after the fall-back
                utc(2024, 11, 3, 6, 30),  # the second 01:30 (EST)
                id="fold: second reading of the end",
            ),
            pytest.param(
                window("01:30", "05:00"),
                NEW_YORK,
                utc(2024, 11, 3, 5, 45),  # 01:45 EDT
                utc(2024, 11, 3, 6, 0),  # 02:00 EDT becomes 01:00 EST: before the window starts
                id="fall-back carries the clock back out of the window",
            ),
            pytest.param(
                window("01:45", "06:00"),
                LORD_HOWE,
                at(LORD_HOWE, 2024, 4, 7, 1, 50),  # +11:00
                utc(2024, 4, 6, 15, 0),  # 02:00 +11:00 becomes 01:30 +10:30
                id="Lord Howe's 30-minute fall-back out of the window",
            ),
            pytest.param(
                window("01:10", "01:40"),
                LONDON,
                utc(2024, 10, 27, 0, 20),  # 01:20 BST
                utc(2024, 10, 27, 0, 40),  # 01:40 BST
                id="fold in London",
            ),
            pytest.param(
                window("22:00", "06:00"),
                APIA,
                at(APIA, 2011, 12, 29, 23, 0),
                at(APIA, 2011, 12, 31, 6, 0),  # 30 December never happened in Samoa
                id="a skipped day",
            ),
        ],
    )
    def test_opening(self, quiet: QuietWindow, tz: tzinfo, now: float, expected: float) -> None:
        assert is_quiet(quiet, now, tz)
        assert expected == next_open(quiet, now, tz)

    @pytest.mark.parametrize(
        ("quiet", "tz", "now"),
        [
            (window("21:00", "09:00"), MOSCOW, at(MOSCOW, 2024, 3, 14, 12, 0) + 0.25),
            (window("21:00", "09:00"), MOSCOW, at(MOSCOW, 2024, 3, 15, 9, 0)),
            (window("01:00", "01:30"), NEW_YORK, utc(2024, 11, 3, 5, 45)),  # 01:45 EDT
            (window("02:10", "02:20"), NEW_YORK, utc(2024, 3, 10, 7, 0)),  # never 02:10 that day
        ],
    )
    def test_not_quiet_returns_now(self, quiet: QuietWindow, tz: tzinfo, now: float) -> None:
        assert now == next_open(quiet, now, tz)


class TestNextOpenProperties:
    """For any zone, instant and window, ``next_open`` is the first instant that is not quiet."""

    @settings(max_examples=600, deadline=None)
    @given(quiet=windows, zone_instant=zone_and_instant())
    def test_next_open_is_the_first_opening(
        self, quiet: QuietWindow, zone_instant: tuple[ZoneInfo, float]
    ) -> None:
        tz, now = zone_instant
        opening = next_open(quiet, now, tz)
        assert opening >= now
        assert not is_quiet(quiet, opening, tz)
        if not is_quiet(quiet, now, tz):
            assert now == opening
            event("not quiet: now")
            return
        event("quiet: waits")
        samples = [now + (opening - now) * i / 60 for i in range(60)]
        samples += [opening - 1.0, opening - 2e-6]
        # the offset transitions in between are where an opening could hide
        years = range(local_time(now, UTC).year, local_time(opening, UTC).year + 1)
        jumps = {float(t) for year in years for t in transitions(tz.key, year)}
        between = sorted(t for t in jumps if now <= t < opening)
        samples += between + [t - 1.0 for t in between] + [t + 1.0 for t in between]
        # and so are the readings of `end` on the wall clock (none may lie before the opening)
        samples += end_readings(quiet.end, tz, now, opening)
        # clocks resolve microseconds: an instant that rounds to the opening is the opening
        resolved = local_time(opening, UTC)
        for sample in samples:
            if now <= sample and local_time(sample, UTC) < resolved:
                assert is_quiet(quiet, sample, tz), (sample, local_time(sample, tz))
        if between:
            event("an offset transition lies between now and the opening")
        if opening in jumps:
            event("opens at an offset transition")
        if local_time(opening, tz).time() != quiet.end:
            event("opens at a wall-clock time other than the end")

    @settings(max_examples=200, deadline=None)
    @given(quiet=windows, zone_instant=zone_and_instant())
    def test_wait_is_bounded(
        self, quiet: QuietWindow, zone_instant: tuple[ZoneInfo, float]
    ) -> None:
        """The opening comes within two days (a gap can swallow one day's open stretch).

        A zone that skipped a calendar day may add one more.
        """
        tz, now = zone_instant
        opening = next_open(quiet, now, tz)
        longest = 2 * 86400.0 + 3 * 3600.0
        if tz.key in DAY_SKIPPERS:
            longest += 86400.0
        assert opening - now < longest
        if opening - now > 86400.0:
            event("waits more than a day")

    @settings(max_examples=200, deadline=None)
    @given(quiet=windows, zone_instant=zone_and_instant())
    def test_opening_is_a_fixed_point(
        self, quiet: QuietWindow, zone_instant: tuple[ZoneInfo, float]
    ) -> None:
        """Asking again at the opening returns the opening: a deferral's re-check passes."""
        tz, now = zone_instant
        opening = next_open(quiet, now, tz)
        assert opening == next_open(quiet, opening, tz)


class TestQuietUntil:
    """The policy's question, memoised per (window, zone, UTC minute), answers exactly as
    ``is_quiet`` and ``next_open`` do for the instant itself."""

    @settings(max_examples=400, deadline=None)
    @given(
        quiet=windows,
        zone_instant=zone_and_instant(),
        others=st.lists(st.floats(min_value=0.0, max_value=59.999999), max_size=3),
    )
    def test_same_answer_as_the_exact_functions(
        self, quiet: QuietWindow, zone_instant: tuple[ZoneInfo, float], others: list[float]
    ) -> None:
        tz, now = zone_instant
        minute = now // 60 * 60
        # the instant and others of its minute, in any order: a memoised neighbour must not
        # answer for an instant it does not speak for
        for instant in [now, *(minute + offset for offset in others), now]:
            expected = next_open(quiet, instant, tz) if is_quiet(quiet, instant, tz) else None
            assert expected == quiet_until(quiet, instant, tz), instant

    @pytest.mark.parametrize(
        ("quiet", "tz", "now", "expected"),
        [
            # 22:59:30 local in Moscow (UTC+3): quiet until 09:00 local
            (window("21:00", "09:00"), MOSCOW, utc(2026, 3, 2, 19, 59, 30), utc(2026, 3, 3, 6)),
            # 20:59:59 local: the same minute holds no window bound, and it is open
            (window("21:00", "09:00"), MOSCOW, utc(2026, 3, 2, 17, 59, 59), None),
            # a bound inside a minute (21:00:30): the minute's instants differ
            (window("21:00:30", "09:00"), MOSCOW, utc(2026, 3, 2, 18, 0, 10), None),
            (
                window("21:00:30", "09:00"),
                MOSCOW,
                utc(2026, 3, 2, 18, 0, 40),
                utc(2026, 3, 3, 6),
            ),
            # an offset with seconds (UTC+03:00:30): one UTC minute, two answers
            (window("21:00", "09:00"), ODD_OFFSET, utc(2026, 3, 2, 17, 59, 20), None),
            (
                window("21:00", "09:00"),
                ODD_OFFSET,
                utc(2026, 3, 2, 17, 59, 45),
                utc(2026, 3, 3, 5, 59, 30),
            ),
            # New York's spring-forward minute (02:00 local does not happen): exact answers
            (window("01:30", "02:30"), NEW_YORK, utc(2026, 3, 8, 6, 59, 30), utc(2026, 3, 8, 7)),
            # 0.2 µs before 01:00: the wall clock (whole microseconds) already reads 01:00,
            # quiet, though the instant's UTC minute is 00:59 (a memo of 00:59 said "open")
            (window("01:00", "00:15"), UTC, utc(2025, 1, 1, 1) - 2e-7, utc(2025, 1, 2, 0, 15)),
        ],
    )
    def test_examples(
        self, quiet: QuietWindow, tz: tzinfo, now: float, expected: float | None
    ) -> None:
        assert expected == quiet_until(quiet, now, tz)
