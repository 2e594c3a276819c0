"""Guest workloads shared by the CLI, the demo, tests and benchmarks (1 GiB guests).

``memhog-exit``: the guest writes ~700 MiB and frees it: free memory that still holds data, the case free
page hinting is for. ``idle``: a fresh boot. ``dirty``: a 64 MiB region rewritten at 4000 pages/s during the
migration. Every workload keeps a 32 MiB checksummed region with a heartbeat (the destination check).
"""

from __future__ import annotations

import re
import time

from fph_lab.guest import Guest, Heartbeat

WORKLOADS = ("memhog-exit", "idle", "dirty")
MEMHOG_MIB = 700
HOLD_MIB = 32
DIRTY_MIB = 64
DIRTY_RATE = 4000
SETTLE_S = 2.0
CHURN_MIB = 600
CHURN_CMD = f"while true; do memhog {CHURN_MIB}; sleep 0.3; done &"
"""Bursts of allocation and freeing through a migration (run in the background, started just before it)."""
OOM_LINE = re.compile(r"Out of memory|oom-kill|Killed process")


def oom_kills(text: str) -> tuple[int, list[str]]:
    """OOM kill events on a serial log: one kill prints several matching lines, so count the most
    frequent pattern (``Killed process`` / ``oom-kill`` / ``Out of memory``); return the lines too."""
    lines = [ln for ln in text.splitlines() if OOM_LINE.search(ln)]
    per = [sum(1 for ln in lines if p in ln) for p in ("Killed process", "oom-kill", "Out of memory")]
    return max(per), lines


def wait_allocation_settles(guest: Guest, tolerance_bytes: int = 4 << 20, limit_s: float = 30.0) -> int:
    """Until two readings 1 s apart agree within ``tolerance_bytes`` (an exiting memhog frees its memory
    slowly under TCG, slower still with the write-log plugin): the lower bound must not catch it mid-way.
    Returns the last allocated-bytes reading."""
    deadline = time.monotonic() + limit_s
    last = guest.meminfo().allocated_bytes
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = guest.meminfo().allocated_bytes
        if abs(now - last) <= tolerance_bytes:
            return now
        last = now
    return last


def run_workload(guest: Guest, name: str, settle_s: float = SETTLE_S) -> Heartbeat:
    """Start ``name`` in the guest; returns the hold region's first heartbeat."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}: one of {', '.join(WORKLOADS)}")
    hb = guest.start_hold(HOLD_MIB, 1)
    if name == "memhog-exit":
        guest.memhog(MEMHOG_MIB, 0)
    elif name == "dirty":
        guest.start_dirty(DIRTY_MIB, DIRTY_RATE)
    time.sleep(settle_s)
    if name != "dirty":
        wait_allocation_settles(guest)
    return hb
