"""Off-peak windows: the parts of the week when capacity is cheap (`scheduling.off_peak`).

Each window names the days it starts on, a local start and end time and a time zone; one that ends at
or before its start runs past midnight (mon-fri 19:00-07:00 covers Friday night into Saturday morning).
Times are local wall-clock times, so a window keeps its hours across daylight-saving changes. With no
window configured, every hour is off-peak.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from portcullis.config import OffPeakWindow, clock_minutes, day_set

_DAY = 86400.0


class OffPeak:
    def __init__(self, windows: list[OffPeakWindow]) -> None:
        self.always = not windows
        self._windows = [
            (day_set(w.days), clock_minutes(w.start), clock_minutes(w.end), ZoneInfo(w.tz)) for w in windows
        ]

    def intervals(self, start: float, end: float) -> list[tuple[float, float]]:
        """The off-peak time between two POSIX times, as merged (from, to) intervals."""
        if self.always:
            return [(start, end)] if end > start else []
        found: list[tuple[float, float]] = []
        for days, begin, finish, zone in self._windows:
            first = datetime.fromtimestamp(start, zone).date() - timedelta(days=1)
            last = datetime.fromtimestamp(end, zone).date()
            day = first
            while day <= last:
                if day.weekday() in days:
                    a = _at(day, begin, zone)
                    b = _at(day, finish, zone) if finish > begin else _at(day + timedelta(days=1), finish, zone)
                    lo, hi = max(a, start), min(b, end)
                    if hi > lo:
                        found.append((lo, hi))
                day += timedelta(days=1)
        found.sort()
        merged: list[tuple[float, float]] = []
        for lo, hi in found:
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    def active(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.always or bool(self.intervals(now, now + 1e-3))

    def seconds_until_start(self, now: float | None = None) -> float | None:
        """0 while off-peak; else how long until the next window opens (None: none within 8 days)."""
        now = time.time() if now is None else now
        found = self.intervals(now, now + 8 * _DAY)
        if not found:
            return None
        return max(0.0, found[0][0] - now)

    def seconds_between(self, start: float, end: float) -> float:
        """How much off-peak time lies between two POSIX times."""
        return sum(hi - lo for lo, hi in self.intervals(start, end))


def _at(day: date, minutes: int, zone: ZoneInfo) -> float:
    """A local wall-clock time on a day as a POSIX time (24:00 is the next midnight)."""
    extra, minutes = divmod(minutes, 24 * 60)
    local = datetime(day.year, day.month, day.day, minutes // 60, minutes % 60, tzinfo=zone)
    if extra:
        local = datetime.combine(day + timedelta(days=extra), local.time(), tzinfo=zone)
    return local.astimezone(UTC).timestamp()
