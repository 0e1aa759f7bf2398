"""The 5-field cron parser of spec.retrain.schedule (kubetune_operator.cron): UTC, strict."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kubetune_operator import cron
from kubetune_operator.cron import CronError, next_after, parse


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("* * * * *", "2025-01-01T00:00:00", "2025-01-01T00:01:00"),
        ("* * * * *", "2025-01-01T00:00:59.9", "2025-01-01T00:01:00"),  # strictly after
        ("0 3 * * *", "2025-01-01T03:00:00", "2025-01-02T03:00:00"),
        ("0 3 * * *", "2025-01-01T02:59:00", "2025-01-01T03:00:00"),
        ("*/15 * * * *", "2025-01-01T00:16:00", "2025-01-01T00:30:00"),
        ("5,35 */6 * * *", "2025-01-01T06:36:00", "2025-01-01T12:05:00"),
        ("0 9-17/4 * * *", "2025-01-01T13:00:00", "2025-01-01T17:00:00"),
        ("0 0 1 * *", "2025-01-15T00:00:00", "2025-02-01T00:00:00"),
        ("0 0 * * mon", "2025-01-01T00:00:00", "2025-01-06T00:00:00"),  # Wed -> Mon
        ("0 0 * * MON-FRI", "2025-01-03T12:00:00", "2025-01-06T00:00:00"),  # Fri -> Mon
        ("0 0 * * 7", "2025-01-01T00:00:00", "2025-01-05T00:00:00"),  # 7 is Sunday too
        ("0 0 * * 0", "2025-01-01T00:00:00", "2025-01-05T00:00:00"),
        ("30 12 * feb *", "2025-01-01T00:00:00", "2025-02-01T12:30:00"),
        ("0 0 1 jan,jul *", "2025-02-01T00:00:00", "2025-07-01T00:00:00"),
        ("59 23 31 12 *", "2025-01-01T00:00:00", "2025-12-31T23:59:00"),
        ("0 0 29 2 *", "2025-01-01T00:00:00", "2028-02-29T00:00:00"),  # the next leap day
        ("0 0 31 * *", "2025-04-01T00:00:00", "2025-05-31T00:00:00"),  # April has no 31st
    ],
)
def test_next_after(expr: str, after: str, expected: str) -> None:
    assert next_after(expr, at(after)) == at(expected)


def test_day_of_month_and_day_of_week_both_restricted_match_either() -> None:
    # Standard cron: "the 13th, and every Friday" (not "Friday the 13th").
    schedule = parse("0 0 13 * fri")
    assert schedule.next_after(at("2025-01-01T00:00:00")) == at("2025-01-03T00:00:00")  # a Fri
    assert schedule.next_after(at("2025-01-10T00:00:00")) == at("2025-01-13T00:00:00")  # a Mon
    # One of them '*' (even '*/2'): the other alone decides.
    assert next_after("0 0 13 * *", at("2025-01-01T00:00:00")) == at("2025-01-13T00:00:00")
    every_other = parse("0 0 */2 * fri")  # day-of-month starts with '*': AND, as cron does
    assert every_other.next_after(at("2025-01-01T00:00:00")) == at("2025-01-03T00:00:00")
    assert every_other.next_after(at("2025-01-03T00:00:00")) == at("2025-01-17T00:00:00")


def test_aware_times_in_other_zones_and_naive_times_are_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    when = datetime(2025, 1, 1, 4, 30, tzinfo=plus2)  # 02:30 UTC
    assert next_after("0 3 * * *", when) == at("2025-01-01T03:00:00")
    assert next_after("0 3 * * *", datetime(2025, 1, 1, 2, 30)) == at("2025-01-01T03:00:00")
    assert next_after("0 3 * * *", when).tzinfo == timezone.utc


def test_names_and_whitespace() -> None:
    assert parse("  0\t0  *  Jan-MAR  sun ").months == frozenset({1, 2, 3})
    assert parse("0 0 * * sat-sat").weekdays == frozenset({6})


@pytest.mark.parametrize(
    ("expr", "field", "words"),
    [
        ("0 3 * *", "schedule", "expected 5 fields"),
        ("0 0 3 * * *", "schedule", "got 6"),
        ("@daily", "schedule", "'0 0 * * *'"),
        ("60 * * * *", "minute", "60 is out of range 0-59"),
        ("0 24 * * *", "hour", "out of range 0-23"),
        ("0 0 0 * *", "day-of-month", "out of range 1-31"),
        ("0 0 1 13 *", "month", "out of range 1-12"),
        ("0 0 * * 8", "day-of-week", "out of range 0-7"),
        ("0 0 * foo *", "month", "'foo' is not a number (1-12 or jan-dec)"),
        ("0 0 * * monday", "day-of-week", "not a number"),
        ("*/0 * * * *", "minute", "at least 1"),
        ("*/x * * * *", "minute", "step 'x'"),
        ("5/10 * * * *", "minute", "a step needs '*' or a range"),
        ("0 17-9 * * *", "hour", "goes backwards"),
        ("0 1,,2 * * *", "hour", "empty list element"),
        ("0 -3 * * *", "hour", "both sides"),
        ("? * * * *", "minute", "not a number"),
        ("0 0 L * *", "day-of-month", "not a number"),
        ("0 0 30 2 *", "day-of-month", "never fires"),
        ("0 0 31 4,6,9,11 *", "day-of-month", "never fires"),
        ("1.5 * * * *", "minute", "not a number"),
        ("\u00b2 * * * *", "minute", "not a number"),  # a unicode digit int() would refuse
    ],
)
def test_errors_name_the_field(expr: str, field: str, words: str) -> None:
    with pytest.raises(CronError) as info:
        parse(expr)
    assert info.value.field == field
    assert words in str(info.value)
    if field in cron.FIELD_NAMES:
        assert str(info.value).startswith(f"{field} field ")


def test_feb_30_with_a_weekday_is_fine_because_either_matches() -> None:
    # "0 0 30 2 mon": every Monday in February (and never the 30th); it fires.
    assert next_after("0 0 30 2 mon", at("2025-01-01T00:00:00")) == at("2025-02-03T00:00:00")
