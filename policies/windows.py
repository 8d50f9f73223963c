"""Time windows for policy rules: days of the week and a time of day, in a named time zone.

Cron-like, as an operator writes a maintenance or office-hours window:

    window: {days: mon-fri, hours: "09:00-17:00", timezone: Europe/Berlin}

`days` is a comma-separated list of days and ranges (`mon-fri`, `sat,sun`,
`*`); `hours` is `HH:MM-HH:MM`, start inclusive and end exclusive, and may
cross midnight (`22:00-06:00`: the days named are those on which the
window *starts*). `24:00` ends a window at midnight. The time zone is an
IANA name; daylight saving is the zone's business, so 09:00 stays 09:00.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_days(text: str) -> frozenset[int]:
    """Weekday numbers (Monday 0) named by `text`; ValueError naming the bad part."""
    text = text.strip().lower()
    if text in ("*", ""):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ValueError(f"{part!r} is not a day or a range of days such as mon-fri (days are {', '.join(DAYS)})")
        start, end = DAYS.index(first), DAYS.index(last) if dash else DAYS.index(first)
        span = (end - start) % 7
        days.update((start + i) % 7 for i in range(span + 1))
    return frozenset(days)


def _minutes(text: str) -> int:
    hours, colon, minutes = text.strip().partition(":")
    if not colon or not hours.isdigit() or not minutes.isdigit() or len(minutes) != 2:
        raise ValueError(f"{text!r} is not a time of day such as 09:00")
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > 24 * 60:
        raise ValueError(f"{text!r} is not a time of day between 00:00 and 24:00")
    return value


def parse_hours(text: str) -> tuple[int, int]:
    """(start, end) in minutes after midnight; ValueError when `text` is not HH:MM-HH:MM."""
    start, dash, end = text.partition("-")
    if not dash:
        raise ValueError(f"{text!r} is not a range of times such as 09:00-17:00")
    first, last = _minutes(start), _minutes(end)
    if first == last:
        raise ValueError(f"{text!r} is an empty window: its start and end are the same time")
    return first, last


class Window(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    days: str = Field(default="*", description="Days the window starts on: mon-fri, sat,sun, * (every day).")
    hours: str = Field(default="00:00-24:00", description="Time of day, HH:MM-HH:MM; may cross midnight.")
    timezone: str = Field(default="UTC", description="IANA time zone name, such as Europe/Berlin.")

    @field_validator("days")
    @classmethod
    def _days(cls, value: str) -> str:
        parse_days(value)
        return value

    @field_validator("hours")
    @classmethod
    def _hours(cls, value: str) -> str:
        parse_hours(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a known time zone (an IANA name such as Europe/Berlin)") from None
        return value

    def contains(self, when: datetime) -> bool:
        """Whether the aware datetime `when` falls inside the window."""
        local = when.astimezone(ZoneInfo(self.timezone))
        start, end = parse_hours(self.hours)
        days = parse_days(self.days)
        minute = local.hour * 60 + local.minute
        if start < end:
            return local.weekday() in days and start <= minute < end
        # Crosses midnight: the evening part belongs to today, the morning part to the day before.
        if minute >= start:
            return local.weekday() in days
        return minute < end and (local - timedelta(days=1)).weekday() in days

    def __str__(self) -> str:
        return f"{self.days} {self.hours} {self.timezone}"
