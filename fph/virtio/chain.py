"""Descriptor chains of a split virtqueue, walked with bounds (the device never trusts the driver).

A walk follows NEXT links in the descriptor table or, for an INDIRECT descriptor, in a table in guest memory.
It stops with ``VirtQueueError`` on: an index outside the table, more hops than the table has entries (a
loop, or a chain longer than the ring), a nested or malformed indirect table, a readable buffer after a
writable one, a buffer outside guest memory, or a chain whose total length overflows 32 bits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fph.virtio.errors import GuestMemoryError, VirtQueueError
from fph.virtio.memory import GuestMemory

VRING_DESC = struct.Struct("<QIHH")
DESC_SIZE = VRING_DESC.size
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
#: Linux never builds an indirect table larger than the ring; QEMU caps at 1024 (VIRTQUEUE_MAX_SIZE).
MAX_INDIRECT = 1024

Buffer = tuple[int, int]  # (gpa, length)


@dataclass(frozen=True)
class DescriptorChain:
    head: int
    readable: tuple[Buffer, ...]
    writable: tuple[Buffer, ...]

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def read_out(self, mem: GuestMemory, limit: int) -> bytes:
        """Concatenate the readable buffers, refusing more than ``limit`` bytes."""
        if self.readable_len > limit:
            raise VirtQueueError(
                f"chain {self.head}: {self.readable_len} readable bytes, expected <= {limit}"
            )
        return b"".join(mem.read(a, n) for a, n in self.readable)


def walk_chain(
    mem: GuestMemory, desc_table: int, queue_size: int, head: int, *, indirect_ok: bool = True
) -> DescriptorChain:
    if head >= queue_size:
        raise VirtQueueError(f"head index {head} >= queue size {queue_size}")
    readable: list[Buffer] = []
    writable: list[Buffer] = []
    total = 0
    table, table_len, index = desc_table, queue_size, head
    in_indirect = False
    hops = 0
    while True:
        hops += 1
        if hops > table_len:
            raise VirtQueueError(f"chain {head}: more than {table_len} descriptors (loop or overlong chain)")
        try:
            addr, length, flags, nxt = mem.read_struct(VRING_DESC, table + index * DESC_SIZE)
        except GuestMemoryError as exc:
            raise VirtQueueError(f"chain {head}: descriptor {index} unreadable: {exc}") from exc
        if flags & DESC_F_INDIRECT:
            if in_indirect:
                raise VirtQueueError(f"chain {head}: nested indirect descriptor")
            if not indirect_ok:
                raise VirtQueueError(f"chain {head}: INDIRECT descriptor but INDIRECT_DESC not negotiated")
            if flags & DESC_F_NEXT:
                raise VirtQueueError(f"chain {head}: INDIRECT descriptor with NEXT")
            if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                raise VirtQueueError(f"chain {head}: indirect table length {length} invalid")
            if not mem.contains(addr, length):
                raise VirtQueueError(
                    f"chain {head}: indirect table {addr:#x}+{length:#x} outside guest memory"
                )
            if readable or writable:
                raise VirtQueueError(f"chain {head}: INDIRECT descriptor after direct buffers")
            table, table_len, index, in_indirect, hops = addr, length // DESC_SIZE, 0, True, 0
            continue
        if length:
            if not mem.contains(addr, length):
                raise VirtQueueError(f"chain {head}: buffer {addr:#x}+{length:#x} outside guest memory")
            total += length
            if total > 0xFFFF_FFFF:
                raise VirtQueueError(f"chain {head}: total length overflows 32 bits")
            if flags & DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise VirtQueueError(f"chain {head}: readable buffer after a writable one")
            else:
                readable.append((addr, length))
        if not flags & DESC_F_NEXT:
            return DescriptorChain(head, tuple(readable), tuple(writable))
        if nxt >= table_len:
            raise VirtQueueError(f"chain {head}: next index {nxt} >= table size {table_len}")
        index = nxt
