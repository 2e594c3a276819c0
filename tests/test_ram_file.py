"""RamFile: file holes as never-written guest pages, and populating a mapping without filling holes."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fph.ram_layout import PAGE_SIZE, RamLayout, RamRange
from fph.transfer.ram_file import RamFile

MiB = 1 << 20
# Two ranges as on a pc machine: GPA 0 at file offset 0, GPA 64 MiB at file offset 8 MiB.
LAYOUT = RamLayout([RamRange(0, 8 * MiB, 0), RamRange(64 * MiB, 4 * MiB, 8 * MiB)])


@pytest.fixture
def sparse(tmp_path: Path) -> Iterator[Path]:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    path = base / f"fph-test-holes-{os.getpid()}.ram"
    with open(path, "wb") as f:
        f.truncate(LAYOUT.ram_bytes)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def allocated_pages(path: Path) -> int:
    return os.stat(path).st_blocks * 512 // PAGE_SIZE


def supports_holes(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) == 0
    except OSError:
        return False
    finally:
        os.close(fd)


def test_holes_are_the_never_written_pages_in_guest_page_numbers(sparse: Path) -> None:
    if not supports_holes(sparse):
        pytest.skip("file system without SEEK_HOLE")
    with RamFile(sparse, LAYOUT, writable=True) as ram:
        written_offsets = [0, 5 * PAGE_SIZE, 8 * MiB - PAGE_SIZE, 8 * MiB, 12 * MiB - PAGE_SIZE]
        for off in written_offsets:
            ram.buf[off + 100] = 1
        holes = {(int(a), int(n)) for a, n in ram.hole_runs()}
    page = PAGE_SIZE
    # file offset 8 MiB is GPA 64 MiB: the runs are split at the range edge and named by GPA page
    assert holes == {
        (1, 4),
        (6, (8 * MiB // page) - 7),
        ((64 * MiB // page) + 1, (4 * MiB // page) - 2),
    }


def test_a_fresh_file_is_one_hole_per_range_and_a_full_one_has_none(sparse: Path) -> None:
    if not supports_holes(sparse):
        pytest.skip("file system without SEEK_HOLE")
    with RamFile(sparse, LAYOUT, writable=True) as ram:
        assert [tuple(r) for r in ram.hole_runs().tolist()] == [
            (0, 8 * MiB // PAGE_SIZE),
            (64 * MiB // PAGE_SIZE, 4 * MiB // PAGE_SIZE),
        ]
        ram.buf[:] = 7
        assert ram.hole_runs().shape == (0, 2)
        assert ram.data_extents() == [(0, LAYOUT.ram_bytes)]


def test_populating_the_data_leaves_the_holes_unallocated(sparse: Path) -> None:
    """A source maps only what holds data, also where a hole was punched after its extents were taken (a
    reporting guest frees memory while round 0 runs); a destination (writable) maps, and allocates, all."""
    if not supports_holes(sparse):
        pytest.skip("file system without SEEK_HOLE")
    with RamFile(sparse, LAYOUT, writable=True) as w:
        w.buf[: 3 * MiB] = 3
    with RamFile(sparse, LAYOUT, writable=False) as ram:
        extents = ram.data_extents()
        assert extents == [(0, 3 * MiB)]
        with RamFile(sparse, LAYOUT, writable=True) as w:  # the guest's worker punches 1 MiB
            w._mm.madvise(mmap.MADV_REMOVE, 1 * MiB, 1 * MiB)
        before = allocated_pages(sparse)
        ram.populate_in_background(extents)
        assert ram.wait_populated() >= 0.0
        assert allocated_pages(sparse) == before  # reading a hole would allocate it (tmpfs)
        assert ram.is_hole(1 * MiB // PAGE_SIZE, 256) and not ram.is_hole(0, 256)
        assert int(ram.buf[: 1 * MiB].sum()) + int(ram.buf[2 * MiB : 3 * MiB].sum()) == 3 * 2 * MiB
        ram.populate()  # no extents given: still only the data
        assert allocated_pages(sparse) == before
    with RamFile(sparse, LAYOUT, writable=True) as ram:
        ram.populate()  # a destination's file: every page
        grown = allocated_pages(sparse)
    if Path("/dev/shm") in sparse.parents:
        assert grown == LAYOUT.ram_bytes // PAGE_SIZE


def test_close_stops_and_joins_a_running_populate(sparse: Path) -> None:
    """The mapping must outlive every madvise on it: close() stops the populate thread and joins it."""
    with RamFile(sparse, LAYOUT, writable=True) as w:
        w.buf[:] = 1
    ram = RamFile(sparse, LAYOUT, writable=False)
    ram.populate_in_background()
    thread = ram._populating
    ram.close()
    assert thread is not None and not thread.is_alive()


def test_preparing_a_destination_keeps_pages_that_landed_first_and_while_it_runs(sparse: Path) -> None:
    """The receiver prepares the file while pages arrive: allocation and populating must not zero any."""
    with RamFile(sparse, LAYOUT, writable=True) as ram:
        early = [0, 6 * PAGE_SIZE, 8 * MiB + 2 * PAGE_SIZE]  # even pages; the writer takes the odd
        for off in early:
            ram.buf[off : off + PAGE_SIZE] = 0xA5
        stop = threading.Event()
        during: list[int] = []

        def land() -> None:  # pages written while prepare_destination runs, every page of the file once
            for off in range(PAGE_SIZE, LAYOUT.ram_bytes, 2 * PAGE_SIZE):
                if stop.is_set():
                    break
                ram.buf[off] = 0x5A
                during.append(off)

        writer = threading.Thread(target=land)
        writer.start()
        ram.prepare_destination()
        writer.join()
        stop.set()
        assert during
        for off in early:
            assert (ram.buf[off : off + PAGE_SIZE] == 0xA5).all(), off
        assert all(ram.buf[off] == 0x5A for off in during)
        assert allocated_pages(sparse) * PAGE_SIZE >= LAYOUT.ram_bytes - PAGE_SIZE  # allocated, all of it
