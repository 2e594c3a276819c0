"""The rate at the wire: a veth end's tx byte counter sampled every 100 ms inside its namespace.

A bandwidth figure counts only when it was measured where the bytes left the host: the socket a sender
writes to can buffer, QEMU's own counters are its view. The sampler is a small Python process started in
the side's namespace (``TwoHostLink.popen``, so the link's ``close`` ends it too) that prints
``<CLOCK_MONOTONIC seconds> <tx_bytes>`` lines; the clock is the machine's, so its times line up with the
bench's ``time.monotonic()``.

    sampler = WireSampler(link, "src").start()
    ...  # the migration
    series = sampler.stop()
    series.max_window_rate_bps()   # the highest 100 ms window
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from fph.waiting import poll_until
from fph_lab.errors import LabError
from fph_lab.netlab import Side, TwoHostLink

DEFAULT_INTERVAL_S = 0.1

_SAMPLER = r"""
import sys, time
dev, interval = sys.argv[1] + ":", float(sys.argv[2])
with open("/proc/net/dev", "rb", buffering=0) as f:  # the reading process's namespace's devices
    due = time.monotonic()
    while True:
        f.seek(0)
        line = next(ln for ln in f.read().decode().splitlines() if ln.strip().startswith(dev))
        sys.stdout.write(f"{time.monotonic():.6f} {int(line.split(':', 1)[1].split()[8])}\n")
        sys.stdout.flush()
        due += interval
        time.sleep(max(0.0, due - time.monotonic()))
"""
"""Prints (time, tx bytes of the device) per interval. ``/proc/net/dev`` (not sysfs): a process in the
namespace sees the host's ``/sys`` (fph_lab.netlab.netns_argv), its own network in ``/proc/net``."""


@dataclass(frozen=True)
class WireSeries:
    """Counter samples: ``times`` (CLOCK_MONOTONIC seconds) and ``tx_bytes`` (cumulative), same length."""

    times: tuple[float, ...]
    tx_bytes: tuple[int, ...]

    def window_rates(self) -> list[tuple[float, float]]:
        """(end of window, bytes/s) for each pair of consecutive samples (one window each, ~100 ms)."""
        out = []
        for i in range(1, len(self.times)):
            dt = self.times[i] - self.times[i - 1]
            if dt > 0:
                out.append((self.times[i], (self.tx_bytes[i] - self.tx_bytes[i - 1]) / dt))
        return out

    def max_window_rate_bps(self) -> float | None:
        rates = [r for _, r in self.window_rates()]
        return max(rates) if rates else None

    def windows_over(self, cap_bps: float, tolerance: float = 0.05) -> int:
        """How many windows ran above ``cap_bps * (1 + tolerance)``."""
        return sum(1 for _, r in self.window_rates() if r > cap_bps * (1 + tolerance))

    def relative(self, t0: float) -> list[list[float]]:
        """``[[seconds since t0, bytes since the first sample], ...]``: the form a JSON result keeps."""
        if not self.times:
            return []
        b0 = self.tx_bytes[0]
        return [[round(t - t0, 4), b - b0] for t, b in zip(self.times, self.tx_bytes, strict=True)]


class WireSampler:
    """Samples ``side``'s veth tx counter from inside its namespace until :meth:`stop`."""

    def __init__(self, link: TwoHostLink, side: Side, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self._link, self._side, self._interval = link, side, interval_s
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._times: list[float] = []
        self._bytes: list[int] = []
        self._bad: list[str] = []
        self._series: WireSeries | None = None

    def start(self) -> WireSampler:
        if self._proc is not None:
            raise LabError("wire sampler already started")
        self._proc = self._link.popen(
            self._link.ns(self._side),
            [sys.executable, "-c", _SAMPLER, self._link.device(self._side), str(self._interval)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True)
        self._reader.start()
        return self

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                t, b = line.split()
                self._times.append(float(t))
                self._bytes.append(int(b))
            except ValueError:
                self._bad.append(line.strip())

    def stop(self) -> WireSeries:
        """Wait for a sample taken after this call (the counter includes everything sent before it), end the
        sampler (its PID only) and return what it read; a sampler that died early is an error."""
        proc = self._proc
        if proc is None:
            raise LabError("wire sampler was never started")
        if self._series is not None:
            return self._series
        asked = time.monotonic()
        poll_until(lambda: proc.poll() is not None or bool(self._times and self._times[-1] >= asked),
                   2 * self._interval + 2.0, self._interval / 10)  # fmt: skip
        died = proc.poll()
        if died is None:
            proc.terminate()
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3.0)
        if self._reader is not None:
            self._reader.join(3.0)
        err = ""
        if proc.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                err = proc.stderr.read().strip()
        if died is not None or self._bad:
            raise LabError(f"wire sampler failed (exit {died}): {err or self._bad[:3]}")
        n = min(len(self._times), len(self._bytes))
        self._series = WireSeries(tuple(self._times[:n]), tuple(self._bytes[:n]))
        return self._series

    def close(self) -> None:
        """End the sampler on an error path: no final sample, nothing raised."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(3.0)

    def __enter__(self) -> WireSampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
