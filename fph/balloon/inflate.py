"""Inflate and deflate (the classic balloon): the guest gives pages to the host towards a target, and takes
them back. Inflated pages are discarded from the shared RAM file, so the host gets the memory back."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from fph.balloon.counters import BalloonCounters
from fph.balloon.spec import BALLOON_PFN_SHIFT
from fph.vhost_user.vring import Vring
from fph.virtio.errors import VirtQueueError
from fph.virtio.memory import PAGE_SIZE, GuestMemory

log = logging.getLogger("fph.hint_receiver")


def process_balloon(
    vring: Vring, mem: GuestMemory, *, inflate: bool, counters: BalloonCounters, name: str
) -> None:
    """Every chain on an inflate (``inflate=True``) or deflate queue: PFNs outside guest memory are counted
    and ignored; inflated runs are discarded before the buffer goes back."""
    while (chain := vring.queue.pop(mem)) is not None:
        data = chain.read_out(mem, 4 * 256 * 64)
        if len(data) % 4:
            raise VirtQueueError(f"balloon pfn buffer of {len(data)} bytes is not a whole number of pfns")
        pfns = struct.unpack(f"<{len(data) // 4}I", data)
        valid = [p for p in pfns if mem.contains(p << BALLOON_PFN_SHIFT, PAGE_SIZE)]
        if len(valid) != len(pfns):
            counters.invalid_pfns += len(pfns) - len(valid)
            log.error("%s: %d balloon pfns outside guest memory ignored", name, len(pfns) - len(valid))
        if inflate:
            for gpa, length in pfn_runs(sorted(valid)):
                mem.discard(gpa, length)
                counters.discarded_bytes += length
            counters.inflated_pages += len(valid)
        else:
            counters.deflated_pages += len(valid)
        vring.queue.add_used(mem, chain.head, 0)


def pfn_runs(pfns: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted PFNs -> (gpa, length) runs of adjacent pages."""
    runs: list[tuple[int, int]] = []
    for pfn in pfns:
        gpa = pfn << BALLOON_PFN_SHIFT
        if runs and runs[-1][0] + runs[-1][1] == gpa:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
        elif not runs or runs[-1][0] + runs[-1][1] < gpa:
            runs.append((gpa, PAGE_SIZE))
    return runs
