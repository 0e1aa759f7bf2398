"""A small, strict 5-field cron parser for ``spec.retrain.schedule`` (UTC).

    schedule = parse("0 3 * * mon-fri")          # CronError names the field that is wrong
    schedule.next_after(datetime(2025, 1, 1, tzinfo=timezone.utc))   # 2025-01-01 03:00 UTC
    next_after("*/15 * * * *", when)              # the same in one call

Fields, in order: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or
``jan``-``dec``), day of week (0-7, 0 and 7 are Sunday, or ``sun``-``sat``). Each field is
``*`` or a comma-separated list of numbers, ranges ``a-b`` and steps ``*/n`` or ``a-b/n``.
As in standard cron, when both day of month and day of week are restricted (neither starts
with ``*``), a day matches if *either* matches (``0 0 1 * mon``: the 1st and every Monday).
No ``@daily`` macros, no ``?``, ``L``, ``W`` or ``#``, no seconds field: anything else is a
:class:`CronError` whose message names the field and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_MONTHS = {
    name: i + 1
    for i, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_DAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_NAMES: tuple[dict[str, int], ...] = ({}, {}, {}, _MONTHS, _DAYS)
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MAX_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the most each month can have
# Feb 29 of a leap year is at most 8 years away (2096 -> 2104); no schedule that fires at all
# needs more days than this to find its next time.
_SEARCH_DAYS = 366 * 9


class CronError(ValueError):
    """A schedule that does not parse; ``field`` is the field's name (or ``"schedule"``)."""

    def __init__(self, field: str, text: str, problem: str) -> None:
        self.field = field
        self.text = text
        self.problem = problem
        where = f"{field} field {text!r}" if field in FIELD_NAMES else f"schedule {text!r}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Schedule:
    """A parsed cron schedule: the allowed values of each field."""

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday ... 6 = Saturday
    day_restricted: bool  # day-of-month does not start with "*"
    weekday_restricted: bool  # day-of-week does not start with "*"

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return dom or dow
        return dom and dow

    def next_after(self, when: datetime) -> datetime:
        """The first time strictly after ``when`` (a naive datetime is taken as UTC)."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        start = when.astimezone(timezone.utc).replace(second=0, microsecond=0)
        start += timedelta(minutes=1)
        hours = sorted(self.hours)
        minutes = sorted(self.minutes)
        day = start.date()
        for offset in range(_SEARCH_DAYS):
            if self.matches_day(day):
                for hour in hours:
                    for minute in minutes:
                        if offset == 0 and (hour, minute) < (start.hour, start.minute):
                            continue
                        return datetime(
                            day.year, day.month, day.day, hour, minute, tzinfo=timezone.utc
                        )
            day += timedelta(days=1)
        raise CronError("schedule", self.expr, "it never fires")  # parse() rules this out


def parse(expr: str) -> Schedule:
    """The :class:`Schedule` of a 5-field cron expression; :class:`CronError` if it is not one."""
    text = expr.strip()
    if text.startswith("@"):
        hint = _MACROS.get(text.lower())
        suffix = f"; write the 5 fields, e.g. {hint!r}" if hint else ""
        raise CronError("schedule", expr, f"macros such as {text} are not supported{suffix}")
    fields = text.split()
    if len(fields) != 5:
        raise CronError(
            "schedule",
            expr,
            f"expected 5 fields (minute hour day-of-month month day-of-week, UTC), "
            f"got {len(fields)}",
        )
    values = [_field(i, f) for i, f in enumerate(fields)]
    weekdays = frozenset(0 if d == 7 else d for d in values[4])
    schedule = Schedule(
        expr=text,
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        day_restricted=not fields[2].startswith("*"),
        weekday_restricted=not fields[4].startswith("*"),
    )
    only_days = schedule.day_restricted and not schedule.weekday_restricted
    if only_days and not any(d <= _MAX_DAYS[m - 1] for m in schedule.months for d in schedule.days):
        raise CronError(
            "day-of-month",
            fields[2],
            f"no month of {fields[3]!r} has such a day, so the schedule never fires",
        )
    return schedule


def next_after(expr: str | Schedule, when: datetime) -> datetime:
    """The first time of ``expr`` strictly after ``when`` (UTC); :class:`CronError` if invalid."""
    schedule = expr if isinstance(expr, Schedule) else parse(expr)
    return schedule.next_after(when)


def _field(index: int, text: str) -> frozenset[int]:
    name = FIELD_NAMES[index]
    low, high = _BOUNDS[index]
    out: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(name, text, "empty list element (two commas, or a trailing comma)")
        body, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()):
                raise CronError(name, text, f"step {step_text!r} in {item!r} is not a number")
            step = int(step_text)
            if step < 1:
                raise CronError(name, text, f"step in {item!r} must be at least 1")
        if body == "*":
            first, last = low, high
        elif "-" in body:
            a, _, b = body.partition("-")
            first, last = _value(index, text, a), _value(index, text, b)
            if first > last:
                raise CronError(
                    name, text, f"range {body!r} goes backwards (write {last}-{first}, or a list)"
                )
        elif slash:
            raise CronError(
                name,
                text,
                f"a step needs '*' or a range before it ({item!r}: write '*/{step}' "
                f"or '{body}-{high}/{step}')",
            )
        else:
            first = last = _value(index, text, body)
        out.update(range(first, last + 1, step))
    return frozenset(out)


def _value(index: int, text: str, token: str) -> int:
    name = FIELD_NAMES[index]
    low, high = _BOUNDS[index]
    names = _NAMES[index]
    if not token:
        raise CronError(name, text, "a range needs a value on both sides of '-'")
    if token.lower() in names:
        return names[token.lower()]
    if not (token.isascii() and token.isdigit()):
        allowed = f"{low}-{high}"
        if names:
            first_name, last_name = next(iter(names)), list(names)[-1]
            allowed += f" or {first_name}-{last_name}"
        raise CronError(name, text, f"{token!r} is not a number ({allowed})")
    value = int(token)
    if not low <= value <= high:
        raise CronError(name, text, f"{value} is out of range {low}-{high}")
    return value
