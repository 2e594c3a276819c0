"""A guest RAM file (or memfd) mapped shared and addressed by guest-physical page number."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE, LayoutError, RamLayout

MADV_POPULATE_READ = 22  # Linux 5.14; not in Python's mmap module yet
MADV_POPULATE_WRITE = 23
_POPULATE_STEP = 64 << 20

# mmap.madvise holds the GIL for the whole call (0.2-0.6 s for 1 GiB): a ctypes call releases it, so the
# device loop and QMP keep running while a mapping is populated.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


class RamFileError(RuntimeError):
    """The RAM file cannot be used for this guest (missing, wrong size, not mappable)."""


class RamFile:
    """Both QEMU and fph map the same file ``MAP_SHARED``: a write here is a write into guest RAM."""

    def __init__(self, path: str | os.PathLike[str], layout: RamLayout, *, writable: bool) -> None:
        self.path = Path(path)
        self.layout = layout
        self.writable = writable
        try:
            fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise RamFileError(f"cannot open guest RAM file {self.path}: {exc.strerror}") from None
        self._seek_fd = fd
        """Kept open for :meth:`is_hole` (one ``SEEK_DATA`` per chunk a round sends)."""
        try:
            size = os.fstat(fd).st_size
            if size < layout.ram_bytes:
                raise RamFileError(
                    f"guest RAM file {self.path} holds {size} bytes, "
                    f"the layout needs {layout.ram_bytes} ({layout!r})"
                )
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mm = mmap.mmap(fd, layout.ram_bytes, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(fd)
            raise
        self.buf: npt.NDArray[np.uint8] = np.frombuffer(self._mm, dtype=np.uint8)
        if not writable:
            self.buf.flags.writeable = False
        self.view = memoryview(self._mm)
        self._closing = threading.Event()
        self._populating: threading.Thread | None = None
        self.populate_s = 0.0

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of the parts of the file that hold data, from SEEK_DATA/SEEK_HOLE; the whole
        file where the file system cannot tell (then nothing counts as a hole)."""
        return list(self._data_spans(0, self.layout.ram_bytes))

    def _data_spans(self, off: int, n: int) -> Iterator[tuple[int, int]]:
        """The parts of [off, off + n) that hold data now; the rest of it where the file system cannot
        tell."""
        end = off + n
        pos = off
        while pos < end:
            try:
                start = os.lseek(self._seek_fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: only holes from pos to the end of the file
                    yield pos, end - pos
                return
            if start >= end:
                return
            stop = min(os.lseek(self._seek_fd, start, os.SEEK_HOLE), end)
            yield start, stop - start
            pos = stop

    def is_hole(self, first_page: int, npages: int) -> bool:
        """True if pages [first_page, +npages) (inside one RAM range) lie in one hole of the file: zero, and
        written by nobody since the hole was made (a write, CPU or device, allocates the page). False where
        the file system cannot tell."""
        off = self.offset(first_page, npages)
        try:
            data = os.lseek(self._seek_fd, off, os.SEEK_DATA)
        except OSError as exc:
            return exc.errno == errno.ENXIO  # no data from off to the end of the file
        return data >= off + (npages << PAGE_SHIFT)

    def hole_runs(self, extents: list[tuple[int, int]] | None = None) -> npt.NDArray[np.int64]:
        """(first page, count) runs of guest pages inside file holes: never written, so zero.

        Page-aligned inward (a hole smaller than a page is no hole here), split at RAM-range edges.
        """
        if extents is None:
            extents = self.data_extents()
        runs: list[tuple[int, int]] = []
        for r in self.layout:
            lo, hi = r.offset, r.offset + r.size
            cursor = lo
            for off, length in [*extents, (hi, 0)]:
                end = off + length
                if end <= cursor:
                    continue
                hole_lo = -(-cursor // PAGE_SIZE) * PAGE_SIZE
                hole_hi = min(off, hi) // PAGE_SIZE * PAGE_SIZE
                if hole_hi > hole_lo:
                    first = (hole_lo - r.offset + r.gpa) >> PAGE_SHIFT
                    runs.append((first, (hole_hi - hole_lo) >> PAGE_SHIFT))
                cursor = max(cursor, end)
                if cursor >= hi:
                    break
        return np.array(runs, dtype=np.int64).reshape(-1, 2)

    def populate(self, extents: list[tuple[int, int]] | None = None) -> float:
        """Map every page into this process now, in 64 MiB steps with the GIL released; returns seconds.

        Round 0 reads every page once: with one page fault each (262,144 for 1 GiB) its copy loop took
        473 ms of CPU on the development host, 265 ms on a populated mapping (populating: about 200 ms).
        Kernels before 5.14 lack the advice; the pages then fault in as they are read (slower, not wrong).
        """
        t0 = time.monotonic()
        advice = MADV_POPULATE_WRITE if self.writable else MADV_POPULATE_READ
        base = self.buf.ctypes.data
        spans = extents if extents is not None else [(0, self.layout.ram_bytes)]
        steps = (
            (off, min(_POPULATE_STEP, start + length - off))
            for start, length in spans
            for off in range(start, start + length, _POPULATE_STEP)
        )
        for step_off, step_n in steps:
            if self._closing.is_set():
                break
            # a source maps what holds data now: a hole punched since the extents were taken (a reporting
            # guest frees memory while round 0 runs) would be allocated again by a read
            parts = [(step_off, step_n)] if self.writable else self._data_spans(step_off, step_n)
            for off, n in parts:
                if _libc.madvise(base + off, n, advice) != 0:
                    err = ctypes.get_errno()
                    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        self.populate_s = time.monotonic() - t0
                        return self.populate_s  # no populate advice here (old kernel, hugetlbfs quirks)
                    raise RamFileError(f"populating {self.path} at offset {off:#x}: {os.strerror(err)}")
        self.populate_s = time.monotonic() - t0
        return self.populate_s

    def populate_in_background(self, extents: list[tuple[int, int]] | None = None) -> None:
        """Start :meth:`populate` in a thread; :meth:`wait_populated` (or :meth:`close`) joins it."""
        if self._populating is None:
            self._populating = threading.Thread(
                target=self._populate_quietly,
                args=(extents,),
                name=f"fph-populate-{self.path.name}",
                daemon=True,
            )
            self._populating.start()

    def _populate_quietly(self, extents: list[tuple[int, int]] | None) -> None:
        with contextlib.suppress(RamFileError):  # only speed is at stake: pages still fault in on read
            self.populate(extents)

    def wait_populated(self) -> float:
        if self._populating is not None:
            self._populating.join()
        return self.populate_s

    def prepare_destination(self, populate: bool = True) -> float:
        """Allocate and map every page of a destination file before the migration starts.

        A fresh RAM file costs a page fault and an allocation per page on first write; doing it up
        front (fallocate, then MADV_POPULATE_WRITE) keeps it off the migration's clock: loopback
        throughput for a 1 GiB guest went from 0.3 to 1.5 GB/s on the development host. Returns seconds.
        Both keep what the file holds, so pages may land while this runs (the receiver prepares while
        the source sends). ``populate=False``: allocate only (see ``fph.transfer.receiver.FilePrep``).
        The fallocate system call, not ``posix_fallocate``: where the file system lacks
        it, glibc's emulation writes a zero byte into blocks it read as zero, racing with a page landing.
        """
        t0 = time.monotonic()
        fd = os.open(self.path, os.O_RDWR)
        try:
            _libc.fallocate(fd, 0, 0, self.layout.ram_bytes)  # failure: the populate below still prefaults
        finally:
            os.close(fd)
        if populate:
            with contextlib.suppress(RamFileError):  # the first write to each page faults it in instead
                self.populate()
        return time.monotonic() - t0

    def offset(self, first_page: int, npages: int) -> int:
        try:
            return self.layout.gpa_to_offset(first_page << PAGE_SHIFT, npages << PAGE_SHIFT)
        except LayoutError as exc:
            raise RamFileError(str(exc)) from None

    def pages(self, first_page: int, npages: int) -> npt.NDArray[np.uint8]:
        """The bytes of pages [first_page, +npages), which must lie inside one RAM range."""
        off = self.offset(first_page, npages)
        return self.buf[off : off + npages * PAGE_SIZE]

    def close(self) -> None:
        self._closing.set()
        if self._populating is not None:
            self._populating.join()  # at most one 64 MiB step: the mapping must outlive the madvise
        self.view.release()
        del self.buf
        with contextlib.suppress(BufferError):  # a caller still holds a view: the mapping goes with it
            self._mm.close()
        if self._seek_fd >= 0:
            os.close(self._seek_fd)
            self._seek_fd = -1

    def __enter__(self) -> RamFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
