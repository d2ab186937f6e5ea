"""The one clock of the store: naive UTC datetimes at millisecond precision.

MongoDB keeps milliseconds and returns naive UTC datetimes (``tz_aware=False``), so every
time written to the store is taken here: a value read back compares equal to the one written.
"""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """Now, as the store writes it: naive UTC, milliseconds."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000, tzinfo=None)


def from_unix(seconds: float) -> dt.datetime:
    """A Unix time, as the store writes times (naive UTC, milliseconds)."""
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000, tzinfo=None)


def iso(moment: dt.datetime) -> str:
    """The iExec market's timestamp format (``2024-05-01T12:00:00.000Z``); sorts as it reads."""
    return moment.isoformat(timespec="milliseconds") + "Z"
