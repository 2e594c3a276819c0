"""A bandwidth cap that holds, and the meter that proves it.

:class:`TokenBucket`: ``rate`` bytes/s with a burst of at most ``burst`` bytes. Tokens accrue only up to the
burst, so idle time (a harvest, a wait for the guest's hints) buys no credit: the bytes that pass in any
interval of length T are at most ``burst + rate * T``. The sender takes tokens before each slice it writes,
so a slice never leaves early.

:class:`WindowMeter`: bytes as they pass a socket, with their times; the highest rate over any window of
``window_s`` (sliding, not aligned) is what a cap is judged by.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: The judging window of a cap: every 100 ms window must stay within 5% of it.
WINDOW_S = 0.1
MIN_SLICE = 4096
MAX_SLICE = 256 << 10


def slice_bytes(rate: float) -> int:
    """How much the sender writes per token take at ``rate``: 1 ms of the cap (1% of a judging window),
    within 4 KiB..256 KiB, so a window's error from slicing stays far below 5%."""
    return int(max(MIN_SLICE, min(MAX_SLICE, rate / 1000)))


class TokenBucket:
    """``take(n)`` blocks until ``n`` bytes may go at ``rate`` bytes/s (burst at most ``burst``)."""

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"a bandwidth cap must be positive, got {rate} bytes/s")
        self.rate = float(rate)
        self.burst = int(burst if burst is not None else slice_bytes(rate))
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._last = clock()
        self.slept_s = 0.0

    def take(self, n: int) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            wait = -self._tokens / self.rate
            self._sleep(wait)
            self.slept_s += wait


@dataclass
class WindowMeter:
    """Cumulative bytes at each time they passed, for sliding-window rates."""

    window_s: float = WINDOW_S
    clock: Callable[[], float] = time.monotonic
    times: list[float] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)

    def add(self, n: int) -> None:
        if n <= 0:
            return
        self.times.append(self.clock())
        self.totals.append((self.totals[-1] if self.totals else 0) + n)

    @property
    def total(self) -> int:
        return self.totals[-1] if self.totals else 0

    def max_window_rate(self, since: float | None = None) -> float:
        """The highest rate (bytes/s) over any ``window_s`` window ending at a sample, counting the bytes
        that passed within it (after ``since``, if given); 0 with fewer than one window of samples."""
        times, totals, w = self.times, self.totals, self.window_s
        lo = 0 if since is None else bisect.bisect_left(times, since)
        if len(times) - lo < 2 or times[-1] - times[lo] < w:
            return 0.0
        best = 0
        j = lo
        for i in range(lo, len(times)):
            if times[i] - times[lo] < w:
                continue  # a window must lie wholly inside the samples
            while times[j] <= times[i] - w:
                j += 1
            # bytes that passed in (times[i] - w, times[i]]: everything after sample j-1
            before = totals[j - 1] if j > 0 else 0
            best = max(best, totals[i] - before)
        return best / w

    def busy_rate(self, since: float | None = None) -> float:
        """Mean rate from the first sample (after ``since``) to the last (0 without two samples)."""
        lo = 0 if since is None else bisect.bisect_left(self.times, since)
        if len(self.times) - lo < 2 or self.times[-1] <= self.times[lo]:
            return 0.0
        return (self.totals[-1] - self.totals[lo]) / (self.times[-1] - self.times[lo])
