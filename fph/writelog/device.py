"""Writes fph itself makes to guest memory (device writes), as a write log.

Why: the TCG plugin sees only vCPU stores, and soft-dirty only stores through QEMU's page tables; when
fph writes guest RAM through its own mapping (used rings and buffers of its vhost-user balloon, or any
future device it serves) the destination must still get those pages. Each such component calls
:meth:`DeviceWriteLog.mark` after its write; the harvest is an atomic fetch-and-clear under a lock (a mark
made during a harvest is in this harvest or the next, never lost).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE, RamLayout
from fph.writelog.base import Words, WriteLog
from fph.writelog.errors import WriteLogStateError


class DeviceWriteLog(WriteLog):
    """An in-process bitmap of guest pages fph wrote. ``mark(gpa, length)`` after each write.

    Marks are accepted before ``start()`` too (and then dropped by it, like any write log's arming).
    """

    kind = "device"
    atomic = True

    def __init__(self, layout: RamLayout) -> None:
        super().__init__(layout)
        self._words: Words = np.zeros(self.nwords, dtype=np.uint64)
        self._lock = threading.Lock()
        self.marks = 0

    def mark(self, gpa: int, length: int) -> None:
        """Record a write of ``length`` bytes at guest-physical ``gpa`` (any alignment)."""
        if length <= 0:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        if gpa < 0 or last >= self.nbits:
            raise WriteLogStateError(
                f"device write [{gpa:#x}, +{length:#x}) is outside the guest's GPA span "
                f"({self.nbits * PAGE_SIZE:#x} bytes)"
            )
        with self._lock:
            self.marks += 1
            if first == last:
                self._words[first >> 6] |= np.uint64(1 << (first & 63))
                return
            pages = np.arange(first, last + 1, dtype=np.uint64)
            np.bitwise_or.at(
                self._words, pages >> np.uint64(6), np.left_shift(np.uint64(1), pages & np.uint64(63))
            )

    def mark_pages(self, pages: npt.ArrayLike) -> None:
        """Record writes to whole pages (page numbers = gpa >> 12)."""
        arr = np.asarray(pages, dtype=np.uint64).ravel()
        if arr.size == 0:
            return
        if int(arr.max()) >= self.nbits:
            raise WriteLogStateError(f"page {int(arr.max())} is outside the guest's {self.nbits} pages")
        with self._lock:
            self.marks += int(arr.size)
            np.bitwise_or.at(
                self._words, arr >> np.uint64(6), np.left_shift(np.uint64(1), arr & np.uint64(63))
            )

    def _take(self) -> Words:
        with self._lock:
            out = self._words.copy()
            self._words[:] = 0
        return out

    def _start(self) -> None:
        self._take()

    def _harvest(self, vcpus_stopped: bool) -> tuple[Words, float]:
        return self._take(), 0.0

    def _details(self) -> dict[str, Any]:
        return {"marks": self.marks}
