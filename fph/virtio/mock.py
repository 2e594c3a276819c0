"""Driver-side mock of a split virtqueue, for tests (rust-vmm virtio-queue's ``mock.rs``).

It lays out the descriptor table, avail and used rings in a :class:`GuestMemory`, builds chains the way a
driver does (free list of descriptors, NEXT/WRITE flags, optional indirect tables), publishes heads, reaps
used entries, and can write any raw descriptor so tests can craft loops and out-of-range buffers.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from fph.virtio.chain import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, VRING_DESC
from fph.virtio.memory import GuestMemory

_USED_ELEM = struct.Struct("<II")


class BumpAllocator:
    """Hands out aligned GPA ranges from [start, end) of a mock guest."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self.next + align - 1) & ~(align - 1)
        if gpa + size > self.end:
            raise MemoryError(f"mock guest out of memory ({size} bytes)")
        self.next = gpa + size
        return gpa


class MockSplitQueue:
    def __init__(self, mem: GuestMemory, alloc: BumpAllocator, size: int) -> None:
        self.mem = mem
        self.size = size
        self.desc = alloc.alloc(16 * size, 4096)
        self.avail = alloc.alloc(6 + 2 * size, 2)
        self.used = alloc.alloc(6 + 8 * size, 4096)
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}
        self.avail_idx = 0
        self.last_used = 0
        mem.write(self.desc, bytes(16 * size))
        mem.write(self.avail, bytes(6 + 2 * size))
        mem.write(self.used, bytes(6 + 8 * size))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        self.mem.write_struct(VRING_DESC, self.desc + 16 * index, addr, length, flags, next_)

    def add_chain(
        self,
        out: Sequence[tuple[int, int]] = (),
        in_: Sequence[tuple[int, int]] = (),
        *,
        publish: bool = True,
    ) -> int:
        """Readable buffers ``out`` then writable ``in_``; returns the head index."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, DESC_F_WRITE) for a, n in in_]
        if not bufs or len(bufs) > len(self._free):
            raise ValueError(f"cannot place {len(bufs)} descriptors ({len(self._free)} free)")
        ids = [self._free.pop(0) for _ in bufs]
        for i, (addr, length, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            self.write_desc(
                ids[i], addr, length, flags | (0 if last else DESC_F_NEXT), 0 if last else ids[i + 1]
            )
        self._chains[ids[0]] = ids
        if publish:
            self.publish(ids[0])
        return ids[0]

    def add_indirect(
        self, table_gpa: int, out: Sequence[tuple[int, int]] = (), in_: Sequence[tuple[int, int]] = ()
    ) -> int:
        """One ring descriptor pointing at an indirect table written at ``table_gpa``."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, DESC_F_WRITE) for a, n in in_]
        for i, (addr, length, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            self.mem.write_struct(
                VRING_DESC,
                table_gpa + 16 * i,
                addr,
                length,
                flags | (0 if last else DESC_F_NEXT),
                0 if last else i + 1,
            )
        head = self._free.pop(0)
        self.write_desc(head, table_gpa, 16 * len(bufs), DESC_F_INDIRECT)
        self._chains[head] = [head]
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write a raw avail index (tests of a driver that lies)."""
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write_u16(self.avail, 1 if on else 0)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def reap(self) -> list[tuple[int, int]]:
        """Used entries (head, written) since the last call; their descriptors become free again."""
        out = []
        while self.last_used != self.used_idx:
            head, written = self.mem.read_struct(_USED_ELEM, self.used + 4 + 8 * (self.last_used % self.size))
            out.append((head, written))
            self._free.extend(self._chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out
