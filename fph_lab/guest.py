"""The lab guest's programs, driven over the serial console, and their output parsed.

Programs (sources in fph_lab/guest/, built static at provision time): ``fill N`` (N MiB of non-zero data,
then exit), ``memhog N S`` (hold N MiB for S s), ``hold N S`` (checksummed region + heartbeat every S s),
``dirty N R [D]`` (R distinct pages/s), ``meminfo`` (buddyinfo free pages, present pages, MemFree).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fph_lab.errors import GuestConsoleError
from fph_lab.serial import KERNEL_ERROR, SerialConsole

PAGE_SIZE = 4096
_HB = re.compile(r"FPH-HB seq=(\d+) csum=([0-9a-f]+) uptime=([\d.]+) ok=(\d)")
_MEM = re.compile(r"FPH-MEM (.*)")


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat of ``hold``: same ``csum`` and a later ``uptime`` on the destination = same guest."""

    seq: int
    csum: str
    uptime: float
    ok: bool


@dataclass(frozen=True)
class MemInfo:
    """Guest memory as the buddy allocator sees it. ``allocated_bytes`` is the lower bound on what a
    migration must send (pages not free at that moment; free pages on per-CPU lists count as allocated)."""

    buddy_free_pages: int
    present_pages: int
    managed_pages: int
    memfree_kb: int
    memtotal_kb: int
    uptime: float

    @property
    def allocated_pages(self) -> int:
        return max(0, self.present_pages - self.buddy_free_pages)

    @property
    def allocated_bytes(self) -> int:
        return self.allocated_pages * PAGE_SIZE


def parse_heartbeats(text: str) -> list[Heartbeat]:
    return [
        Heartbeat(int(m.group(1)), m.group(2), float(m.group(3)), m.group(4) == "1")
        for m in _HB.finditer(text)
    ]


def parse_meminfo(text: str) -> MemInfo:
    m = _MEM.search(text)
    if not m:
        raise GuestConsoleError(f"no FPH-MEM line in: {text.strip()!r}")
    kv = dict(item.split("=", 1) for item in m.group(1).split())
    return MemInfo(
        buddy_free_pages=int(kv["buddy_free_pages"]),
        present_pages=int(kv["present_pages"]),
        managed_pages=int(kv["managed_pages"]),
        memfree_kb=int(kv["memfree_kb"]),
        memtotal_kb=int(kv["memtotal_kb"]),
        uptime=float(kv["uptime"]),
    )


def kernel_errors(text: str) -> list[str]:
    """Lines of a serial log that show a kernel Oops, BUG, panic or a heartbeat checksum mismatch."""
    return [line for line in text.splitlines() if KERNEL_ERROR.search(line)]


class Guest:
    """Workloads of a lab guest, over its serial console."""

    def __init__(self, console: SerialConsole) -> None:
        self.console = console

    def fill(self, mib: int, timeout: float = 120.0) -> None:
        """Write ``mib`` MiB of non-zero data and free it (the program exits)."""
        out = self.console.run(f"fill {int(mib)}", timeout=timeout)
        if "FPH-FILL mib=" not in out:
            raise GuestConsoleError(f"fill {mib} did not report: {out.strip()!r}")

    def memhog(self, mib: int, hold_s: int = 0, timeout: float = 120.0) -> None:
        """Allocate and write ``mib`` MiB, keep it ``hold_s`` seconds, exit (foreground)."""
        self.console.run(f"memhog {int(mib)} {int(hold_s)}", timeout=timeout)

    def start_hold(self, mib: int = 32, period_s: int = 1, timeout: float = 60.0) -> Heartbeat:
        """Start the checksummed region in the background; return its first heartbeat."""
        since = self.console.offset()
        self.console.run(f"hold {int(mib)} {int(period_s)} &")
        m = self.console.wait_for(_HB, timeout, since)
        return Heartbeat(int(m.group(1)), m.group(2), float(m.group(3)), m.group(4) == "1")

    def start_dirty(self, mib: int, pages_per_s: int, duration_s: int = 0) -> None:
        """Rewrite ``pages_per_s`` distinct pages per second in a ``mib`` MiB region, in the background."""
        since = self.console.offset()
        self.console.run(f"dirty {int(mib)} {int(pages_per_s)} {int(duration_s)} &")
        self.console.wait_for("FPH-DIRTY start", 60.0, since)

    def meminfo(self, timeout: float = 30.0) -> MemInfo:
        return parse_meminfo(self.console.run("meminfo", timeout=timeout))

    def heartbeats(self, since: int = 0) -> list[Heartbeat]:
        return parse_heartbeats(self.console.text(since))

    def last_heartbeat(self, since: int = 0) -> Heartbeat | None:
        hbs = self.heartbeats(since)
        return hbs[-1] if hbs else None
