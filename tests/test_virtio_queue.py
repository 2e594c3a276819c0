"""Guest memory bounds, descriptor chains (good and hostile), the split ring, notifications, dirty log."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest

from fph.vhost_user.errors import GuestMemoryError, VirtQueueError
from fph.virtio.chain import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, VRING_DESC
from fph.virtio.memory import GuestMemory, VhostLog, memfd_region
from fph.virtio.mock import BumpAllocator, MockSplitQueue
from fph.virtio.queue import SplitQueue

MiB = 1 << 20
GPA = 0x10_0000  # a non-zero base exercises the translation


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    fd, spec = memfd_region(8 * MiB, gpa=GPA, uva=0x7F00_0000_0000)
    g = GuestMemory.from_fds([spec], [fd])
    os.close(fd)
    yield g
    g.close()


def ring(mem: GuestMemory, size: int = 16) -> tuple[MockSplitQueue, SplitQueue, BumpAllocator]:
    alloc = BumpAllocator(GPA, GPA + 8 * MiB)
    drv = MockSplitQueue(mem, alloc, size)
    dev = SplitQueue(256)
    dev.set_size(size)
    dev.set_addresses(mem, drv.desc, drv.avail, drv.used)
    dev.restart(mem)
    return drv, dev, alloc


def test_memory_bounds_and_translation(mem: GuestMemory) -> None:
    mem.write(GPA, b"abc")
    assert mem.read(GPA, 3) == b"abc"
    assert mem.uva_to_gpa(0x7F00_0000_0010) == GPA + 0x10
    assert mem.end == GPA + 8 * MiB
    for gpa, n in [
        (0, 1),
        (GPA - 1, 2),
        (GPA + 8 * MiB - 1, 2),
        (GPA + 8 * MiB, 1),
        (GPA, -1),
        (GPA, 1 << 50),
    ]:
        assert not mem.contains(gpa, n)
        with pytest.raises(GuestMemoryError):
            mem.check(gpa, n)
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x7F00_0000_0000 + 8 * MiB)
    with pytest.raises(GuestMemoryError, match="exceeds"):
        mem.read(GPA, 2 * MiB)


def test_discard_punches_the_shared_file(mem: GuestMemory) -> None:
    mem.write(GPA + MiB, b"\x5a" * 4096)
    mem.discard(GPA + MiB, 4096)
    assert mem.read(GPA + MiB, 4096) == bytes(4096)
    with pytest.raises(GuestMemoryError, match="aligned"):
        mem.discard(GPA + 1, 4096)


def test_simple_chain_out_before_in(mem: GuestMemory) -> None:
    drv, dev, alloc = ring(mem)
    a, b = alloc.alloc(100), alloc.alloc(200)
    head = drv.add_chain(out=[(a, 100)], in_=[(b, 200)])
    chain = dev.pop(mem)
    assert chain is not None and chain.head == head
    assert chain.readable == ((a, 100),) and chain.writable == ((b, 200),)
    assert dev.pop(mem) is None
    dev.add_used(mem, head, 7)
    assert drv.reap() == [(head, 7)]


def test_indirect_chain(mem: GuestMemory) -> None:
    drv, dev, alloc = ring(mem)
    dev.indirect = True
    table = alloc.alloc(48, 16)
    a, b, c = alloc.alloc(8), alloc.alloc(8), alloc.alloc(8)
    drv.add_indirect(table, out=[(a, 8), (b, 8)], in_=[(c, 8)])
    chain = dev.pop(mem)
    assert chain is not None and chain.readable == ((a, 8), (b, 8)) and chain.writable == ((c, 8),)


def hostile(mem: GuestMemory, build: str) -> None:
    drv, dev, alloc = ring(mem, size=8)
    dev.indirect = True
    buf = alloc.alloc(64)
    if build == "loop":
        drv.write_desc(0, buf, 8, DESC_F_NEXT, 1)
        drv.write_desc(1, buf, 8, DESC_F_NEXT, 0)
    elif build == "longer_than_ring":
        for i in range(8):
            drv.write_desc(i, buf, 8, DESC_F_NEXT, (i + 1) % 8)
    elif build == "next_out_of_table":
        drv.write_desc(0, buf, 8, DESC_F_NEXT, 8)
    elif build == "outside_memory":
        drv.write_desc(0, GPA + 8 * MiB, 8, 0, 0)
    elif build == "below_memory":
        drv.write_desc(0, 0, 8, 0, 0)
    elif build == "huge_length":
        drv.write_desc(0, buf, 0xFFFF_FFFF, DESC_F_WRITE, 0)
    elif build == "read_after_write":
        drv.write_desc(0, buf, 8, DESC_F_WRITE | DESC_F_NEXT, 1)
        drv.write_desc(1, buf, 8, 0, 0)
    elif build == "nested_indirect":
        table = alloc.alloc(16, 16)
        mem.write_struct(VRING_DESC, table, table, 16, DESC_F_INDIRECT, 0)
        drv.write_desc(0, table, 16, DESC_F_INDIRECT, 0)
    elif build == "indirect_bad_len":
        drv.write_desc(0, buf, 15, DESC_F_INDIRECT, 0)
    elif build == "indirect_loop":
        table = alloc.alloc(32, 16)
        mem.write_struct(VRING_DESC, table, buf, 8, DESC_F_NEXT, 1)
        mem.write_struct(VRING_DESC, table + 16, buf, 8, DESC_F_NEXT, 0)
        drv.write_desc(0, table, 32, DESC_F_INDIRECT, 0)
    drv.mem.write_u16(drv.avail + 4, 0)
    drv.set_avail_idx(1)
    dev.pop(mem)


@pytest.mark.parametrize(
    "build",
    ["loop", "longer_than_ring", "next_out_of_table", "outside_memory", "below_memory", "huge_length",
     "read_after_write", "nested_indirect", "indirect_bad_len", "indirect_loop"],
)  # fmt: skip
def test_hostile_chains_are_refused(mem: GuestMemory, build: str) -> None:
    with pytest.raises(VirtQueueError):
        hostile(mem, build)


def test_indirect_refused_unless_negotiated(mem: GuestMemory) -> None:
    drv, dev, alloc = ring(mem)
    table, a = alloc.alloc(16, 16), alloc.alloc(8)
    drv.add_indirect(table, out=[(a, 8)])
    with pytest.raises(VirtQueueError, match="not negotiated"):
        dev.pop(mem)


def test_head_out_of_range_and_avail_jump(mem: GuestMemory) -> None:
    drv, dev, _ = ring(mem, size=8)
    drv.mem.write_u16(drv.avail + 4, 9)
    drv.set_avail_idx(1)
    with pytest.raises(VirtQueueError, match="head index"):
        dev.pop(mem)
    drv2, dev2, _ = ring(mem, size=8)
    drv2.set_avail_idx(9)
    with pytest.raises(VirtQueueError, match="ahead"):
        dev2.pop(mem)


def test_ring_addresses_checked(mem: GuestMemory) -> None:
    q = SplitQueue(256)
    with pytest.raises(VirtQueueError):
        q.set_size(3)
    q.set_size(16)
    with pytest.raises(VirtQueueError, match="misaligned"):
        q.set_addresses(mem, GPA + 8, GPA + 4096, GPA + 8192)
    with pytest.raises(VirtQueueError, match="outside"):
        q.set_addresses(mem, GPA + 8 * MiB - 16, GPA + 4096, GPA + 8192)


def test_restart_rereads_used_index(mem: GuestMemory) -> None:
    drv, dev, alloc = ring(mem)
    a = alloc.alloc(8)
    for _ in range(3):
        drv.add_chain(out=[(a, 8)])
        chain = dev.pop(mem)
        assert chain is not None
        dev.add_used(mem, chain.head, 0)
    drv.reap()
    dev.next_used = 0  # stale memory of a previous device instance
    dev.restart(mem)
    assert dev.next_used == 3


def test_notification_suppression(mem: GuestMemory) -> None:
    drv, dev, alloc = ring(mem)
    a = alloc.alloc(8)
    drv.add_chain(out=[(a, 8)])
    chain = dev.pop(mem)
    assert chain is not None
    dev.add_used(mem, chain.head, 0)
    assert dev.needs_notification(mem)
    drv.set_no_interrupt(True)
    assert not dev.needs_notification(mem)


def test_event_idx(mem: GuestMemory) -> None:
    drv, dev, alloc = ring(mem)
    dev.event_idx = True
    a = alloc.alloc(8)

    def push() -> bool:
        drv.add_chain(out=[(a, 8)])
        chain = dev.pop(mem)
        assert chain is not None
        dev.add_used(mem, chain.head, 0)
        drv.reap()
        return dev.needs_notification(mem)

    assert push()  # first signal after a (re)start always goes out
    drv.set_used_event(5)  # "interrupt me when used idx passes 5"
    assert not push()  # used idx 2
    drv.set_used_event(2)
    assert push()  # used idx 3 crossed 2
    dev.enable_notification(mem)
    assert drv.avail_event == dev.next_avail == 3


def test_vhost_log_layout_and_used_ring_logging(mem: GuestMemory) -> None:
    words = (GPA + 8 * MiB) // 4096 // 64
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(fd, words * 8)
    vlog = VhostLog(fd, words * 8, 0)
    view = mmap.mmap(fd, words * 8)
    os.close(fd)
    vlog.mark(GPA + 65 * 4096 + 10, 4096)  # straddles pages 65 and 66 past the base
    page = GPA // 4096 + 65
    word = int.from_bytes(view[(page >> 6) * 8 : (page >> 6) * 8 + 8], "little")
    assert word >> (page & 63) & 1 and word >> ((page + 1) & 63) & 1
    assert bin(word).count("1") == 2
    with pytest.raises(GuestMemoryError):
        vlog.mark(words * 64 * 4096, 1)

    view[:] = bytes(words * 8)
    drv, dev, alloc = ring(mem)
    dev.log, dev.log_used_gpa = vlog, drv.used
    a = alloc.alloc(8)
    drv.add_chain(out=[(a, 8)])
    chain = dev.pop(mem)
    assert chain is not None
    dev.add_used(mem, chain.head, 0)
    used_page = drv.used // 4096
    word = int.from_bytes(view[(used_page >> 6) * 8 : (used_page >> 6) * 8 + 8], "little")
    assert word == 1 << (used_page & 63)
    view.close()
    vlog.close()


def test_two_regions_like_a_guest_above_the_pci_hole() -> None:
    fd_lo, lo = memfd_region(2 * MiB, gpa=0, uva=0x7F00_0000_0000)
    fd_hi, hi = memfd_region(2 * MiB, gpa=1 << 32, uva=0x7F10_0000_0000)
    g = GuestMemory.from_fds([hi, lo], [fd_hi, fd_lo])
    os.close(fd_lo)
    os.close(fd_hi)
    try:
        assert [r.gpa for r in g.regions] == [0, 1 << 32] and g.end == (1 << 32) + 2 * MiB
        g.write((1 << 32) + 8, b"hi")
        assert g.read((1 << 32) + 8, 2) == b"hi" and g.read(8, 2) == b"\0\0"
        assert g.uva_to_gpa(0x7F10_0000_0010) == (1 << 32) + 0x10
        assert not g.contains(2 * MiB - 8, 16)  # runs off the low region
        assert not g.contains(3 << 30, 4096)  # the hole
        with pytest.raises(GuestMemoryError, match="overlap"):
            GuestMemory([g.regions[0], g.regions[0]])
    finally:
        g.close()


def test_atomic_or_sets_bits_without_losing_concurrent_ones() -> None:
    """The dirty log's atomic OR (machine code on x86-64): two threads OR disjoint bits into the same words
    many times; a non-atomic read-modify-write would lose some."""
    import ctypes
    import threading

    from fph.virtio.memory import atomic_or_u64, memory_fence

    words = (ctypes.c_uint64 * 64)()
    base = ctypes.addressof(words)

    def orer(bit: int) -> None:
        for i in range(20_000):
            atomic_or_u64(base + 8 * (i % 64), 1 << (bit + i % 3))

    threads = [threading.Thread(target=orer, args=(b,)) for b in (0, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    memory_fence()
    assert all(w == 0b111 | 0b111 << 8 for w in words)
    atomic_or_u64(base, 1 << 63)
    assert words[0] == 1 << 63 | 0b111 | 0b111 << 8
