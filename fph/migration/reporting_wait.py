"""Whether to wait for a reporting guest's free memory to become holes, sans-IO (figures in, verdict out).

A guest with free page reporting reports what it freed in passes, one every 2 s, each a bounded share of
its free blocks; a guest that just freed gigabytes takes many passes. An fph migration of such a guest skips
the hint run once the guest's free memory is holes in the RAM file, and waits a little for that. Waiting
pays only while the passes seen so far could close the gap in the time left: measured on a 4 GiB guest that
had freed 3 GiB, 1.1 GiB was still unreported after the whole 3 s wait in each of 3 runs, which then hinted
anyway (``bench/results/twohost_bench-reporting-4g.txt``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class CatchUp(enum.Enum):
    CAUGHT_UP = "caught up"
    """What is still not a hole is within the lag that always stays: skip the hint run."""
    WAIT = "wait"
    GIVE_UP = "give up"
    """Reporting cannot catch up within the wait (or it ran out): hint as usual."""


@dataclass
class ReportingWait:
    behind_at_start: int
    """Bytes of the guest's free memory not yet holes when the wait began."""
    lag_bytes: int
    """What may stay unreported and still skip the hint run."""
    wait_s: float
    """The longest wait."""
    pass_s: float = 2.0
    """The guest's reporting period."""
    _passes: list[float] = field(default_factory=list)
    """When each pass seen began (the first sample that showed it)."""
    _behind: int | None = None

    def verdict(self, behind: int, elapsed_s: float) -> tuple[CatchUp, str]:
        """After ``elapsed_s`` of waiting, with ``behind`` bytes still not holes: the verdict and why. Call
        with every new sample, in time order."""
        last = self.behind_at_start if self._behind is None else self._behind
        reporting_now = behind < last
        if reporting_now and (not self._passes or elapsed_s - self._passes[-1] >= self.pass_s / 2):
            self._passes.append(elapsed_s)  # a new pass (one that spans two samples counts once)
        self._behind = behind
        if behind <= self.lag_bytes:
            return CatchUp.CAUGHT_UP, f"{behind >> 20} MiB not yet reported after {elapsed_s:.1f} s"
        if elapsed_s >= self.wait_s:
            return CatchUp.GIVE_UP, f"{behind >> 20} MiB still not reported after {elapsed_s:.1f} s"
        if not self._passes:
            if elapsed_s >= self.pass_s * 1.25:
                return CatchUp.GIVE_UP, f"no reporting pass in {elapsed_s:.1f} s ({behind >> 20} MiB to go)"
            return CatchUp.WAIT, "waiting for a reporting pass"
        if reporting_now:  # a pass under way: judge it once it is whole
            return CatchUp.WAIT, f"a reporting pass under way, {behind >> 20} MiB to go"
        per_pass = (self.behind_at_start - behind) / len(self._passes)
        passes_left = int((self.wait_s - self._passes[-1]) // self.pass_s)
        if per_pass * passes_left < behind - self.lag_bytes:
            return CatchUp.GIVE_UP, (
                f"reporting ~{per_pass / 2**20:.0f} MiB per {self.pass_s:.0f} s pass cannot report "
                f"{behind >> 20} MiB in the {passes_left} pass(es) left of the wait"
            )
        return CatchUp.WAIT, f"reporting ~{per_pass / 2**20:.0f} MiB per pass, {behind >> 20} MiB to go"
