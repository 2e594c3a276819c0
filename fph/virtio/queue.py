"""Split virtqueue, device side: avail iteration, used ring, notification suppression (EVENT_IDX optional).

Addresses are GPAs (the handler converts the front-end's ring addresses once). ``next_used`` is re-read from
the used ring each time the ring starts (``restart``): after a re-plug on the same connection the previous
device instance's count is stale. Used-ring writes are logged to the vhost dirty log when the front-end asked
for it (VHOST_VRING_F_LOG), so the ring survives a migration the front-end runs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fph.virtio.chain import DescriptorChain, walk_chain
from fph.virtio.errors import GuestMemoryError, VirtQueueError
from fph.virtio.memory import GuestMemory, VhostLog

#: The largest split ring virtio 1.x allows (2.7.1: Queue Size is a power of 2, at most 32768).
MAX_QUEUE_SIZE = 32768
AVAIL_F_NO_INTERRUPT = 1
_USED_ELEM = struct.Struct("<II")


@dataclass(frozen=True)
class QueueState:
    """A queue's indices and addresses, for a successor that goes on from them (a worker upgrade)."""

    size: int
    desc_table: int
    avail_ring: int
    used_ring: int
    next_avail: int
    next_used: int
    event_idx: bool
    indirect: bool
    ready: bool
    signalled_used: int | None
    log_used_gpa: int | None


class SplitQueue:
    def __init__(self, max_size: int = 1024) -> None:
        if not _is_queue_size(max_size):
            raise ValueError(f"max queue size {max_size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.size = 0
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0
        self.event_idx = False
        self.indirect = False
        self.ready = False
        self.log: VhostLog | None = None
        self.log_used_gpa: int | None = None
        self._signalled_used: int | None = None

    def export_state(self) -> QueueState:
        """What a successor needs to go on from the same indices (a worker upgrade)."""
        return QueueState(
            self.size, self.desc_table, self.avail_ring, self.used_ring, self.next_avail, self.next_used,
            self.event_idx, self.indirect, self.ready, self._signalled_used, self.log_used_gpa,
        )  # fmt: skip

    def import_state(self, state: QueueState, mem: GuestMemory | None) -> None:
        """Take over a predecessor's queue; its addresses are checked against ``mem`` as SET_VRING_ADDR's
        are."""
        if state.size:
            self.set_size(state.size)
        if state.desc_table:
            if mem is None:
                raise VirtQueueError("ring addresses without a memory table")
            self.set_addresses(mem, state.desc_table, state.avail_ring, state.used_ring)
        self.next_avail, self.next_used = state.next_avail & 0xFFFF, state.next_used & 0xFFFF
        self.event_idx, self.indirect = state.event_idx, state.indirect
        self.ready = state.ready and bool(self.desc_table)
        self._signalled_used, self.log_used_gpa = state.signalled_used, state.log_used_gpa

    def set_size(self, size: int) -> None:
        if not _is_queue_size(size) or size > self.max_size:
            raise VirtQueueError(f"queue size {size} is not a power of two in 1..{self.max_size}")
        self.size = size

    def set_addresses(self, mem: GuestMemory, desc: int, avail: int, used: int) -> None:
        if not self.size:
            raise VirtQueueError("ring addresses set before the ring size")
        if desc % 16 or avail % 2 or used % 4:
            raise VirtQueueError(f"misaligned ring desc={desc:#x} avail={avail:#x} used={used:#x}")
        n = self.size
        for name, gpa, length in (
            ("descriptor table", desc, 16 * n),
            ("avail ring", avail, 6 + 2 * n),
            ("used ring", used, 6 + 8 * n),
        ):
            if not mem.contains(gpa, length):
                raise VirtQueueError(f"{name} {gpa:#x}+{length:#x} outside guest memory")
        self.desc_table, self.avail_ring, self.used_ring = desc, avail, used

    def restart(self, mem: GuestMemory) -> None:
        """(Re)start processing: take the used index from the ring, not from memory of an old instance."""
        if not (self.size and self.desc_table):
            raise VirtQueueError("ring started before its size and addresses were set")
        self.next_used = mem.read_u16(self.used_ring + 2)
        self._signalled_used = None
        self.ready = True

    def avail_idx(self, mem: GuestMemory) -> int:
        return mem.read_u16(self.avail_ring + 2)

    def pending(self, mem: GuestMemory) -> int:
        n = (self.avail_idx(mem) - self.next_avail) & 0xFFFF
        if n > self.size:
            raise VirtQueueError(f"avail index moved {n} entries ahead on a ring of {self.size}")
        return n

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """Next available chain, validated, or None when the ring is empty."""
        if not self.ready:
            return None
        try:
            if self.pending(mem) == 0:
                return None
            head = mem.read_u16(self.avail_ring + 4 + 2 * (self.next_avail % self.size))
        except GuestMemoryError as exc:
            raise VirtQueueError(f"avail ring unreadable: {exc}") from exc
        chain = walk_chain(mem, self.desc_table, self.size, head, indirect_ok=self.indirect)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def add_used(self, mem: GuestMemory, head: int, written: int) -> None:
        slot = self.next_used % self.size
        elem_gpa = self.used_ring + 4 + 8 * slot
        mem.write_struct(_USED_ELEM, elem_gpa, head, written)
        self.next_used = (self.next_used + 1) & 0xFFFF
        # x86-64 keeps store order, so the element is visible before the index.
        mem.write_u16(self.used_ring + 2, self.next_used)
        self._log_used(4 + 8 * slot, 8)
        self._log_used(2, 2)

    def _log_used(self, offset: int, length: int) -> None:
        if self.log is not None and self.log_used_gpa is not None:
            self.log.mark(self.log_used_gpa + offset, length)

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last signal."""
        new = self.next_used
        old = self._signalled_used
        self._signalled_used = new
        if not self.event_idx:
            return not mem.read_u16(self.avail_ring) & AVAIL_F_NO_INTERRUPT
        if old is None:
            return True
        used_event = mem.read_u16(self.avail_ring + 4 + 2 * self.size)
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def enable_notification(self, mem: GuestMemory) -> None:
        """Ask for a kick on the next avail entry (EVENT_IDX: write avail_event)."""
        if self.event_idx:
            offset = 4 + 8 * self.size
            mem.write_u16(self.used_ring + offset, self.next_avail)
            self._log_used(offset, 2)


def _is_queue_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and not size & (size - 1)
