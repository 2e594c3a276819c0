"""Free page reporting (``VIRTIO_BALLOON_F_REPORTING``): the guest reports free ranges on its own, the
device discards them from the shared RAM file, then returns the buffer (the guest waits for it before it
reuses the pages). Never discarded when the guest poisons free pages with a non-zero value: a discarded
page would read back as zeros, not as the poison (QEMU does the same)."""

from __future__ import annotations

import logging

from fph.balloon.counters import BalloonCounters
from fph.vhost_user.vring import Vring
from fph.virtio.memory import PAGE_SIZE, GuestMemory

log = logging.getLogger("fph.hint_receiver")


def process_reporting(
    vring: Vring, mem: GuestMemory, *, poisoned: bool, counters: BalloonCounters, name: str
) -> None:
    while (chain := vring.queue.pop(mem)) is not None:
        for gpa, length in chain.writable:
            if poisoned:
                counters.reports_not_discarded += 1
            elif gpa % PAGE_SIZE or length % PAGE_SIZE:
                counters.reports_not_discarded += 1
                log.error("%s: reported range gpa=%#x len=%#x not page aligned; kept", name, gpa, length)
            else:
                mem.discard(gpa, length)
                counters.discarded_bytes += length
                counters.reported_bytes += length
        vring.queue.add_used(mem, chain.head, 0)  # only after the discard: the guest waits for this
