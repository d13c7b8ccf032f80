"""Calendar arithmetic the API and the scorer share."""

from __future__ import annotations

from datetime import datetime


def months_before(moment: datetime, months: int) -> datetime:
    """``moment`` minus whole months, clamped to the month's last day, as Postgres does
    (2024-02-29 minus 12 months is 2023-02-28)."""
    index = moment.year * 12 + moment.month - 1 - months
    year, month = divmod(index, 12)
    day = moment.day
    while True:
        try:
            return moment.replace(year=year, month=month + 1, day=day)
        except ValueError:
            day -= 1
