"""A plain-Python reference model of ``DirtyBitmap`` (bitarray, one bit per page), slow and obvious."""

from __future__ import annotations

from bitarray import bitarray

from fph.dirty_bitmap import EPOCH_MAX, EPOCH_MIN, SEND_DATA, SEND_ZERO, SKIP_ZERO, BitmapStats
from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE, RamLayout


def _bits(n: int) -> bitarray:
    b = bitarray(n, endian="little")
    b.setall(0)
    return b


class ModelBitmap:
    def __init__(self, layout: RamLayout, destination_zeroed: bool = True) -> None:
        self.layout = layout
        self.nbits = layout.span_pages
        self.ram = _bits(self.nbits)
        for r in layout:
            self.ram[r.gpa >> PAGE_SHIFT : r.end >> PAGE_SHIFT] = 1
        self.dirty = _bits(self.nbits)
        self.sent = _bits(self.nbits)
        self.hinted = _bits(self.nbits)
        self.known_zero = self.ram.copy() if destination_zeroed else _bits(self.nbits)
        self.stats = BitmapStats()
        self.epoch: int | None = None
        self.cursor = 0

    def open_epoch(self, cmd_id: int) -> None:
        assert EPOCH_MIN <= cmd_id <= EPOCH_MAX and self.epoch is None
        self.epoch = cmd_id

    def close_epoch(self) -> int | None:
        closed, self.epoch = self.epoch, None
        return closed

    def valid(self, ranges: list[tuple[int, int]]) -> bool:
        for gpa, length in ranges:
            if length <= 0 or gpa % PAGE_SIZE or length % PAGE_SIZE or gpa + length >= 1 << 64:
                return False
            if not any(r.gpa <= gpa and gpa + length <= r.end for r in self.layout):
                return False
        return True

    def apply_hints(self, epoch: int, ranges: list[tuple[int, int]]) -> int:
        if not self.valid(ranges):
            self.stats.hints_rejected_invalid += len(ranges)
            raise ValueError("invalid")
        if epoch != self.epoch:
            self.stats.hints_dropped_stale += len(ranges)
            return 0
        cleared = 0
        for gpa, length in ranges:
            for p in range(gpa >> PAGE_SHIFT, (gpa + length) >> PAGE_SHIFT):
                cleared += self.dirty[p]
                self.dirty[p] = 0
                self.hinted[p] = 1
            self.stats.hinted_pages += length >> PAGE_SHIFT
        self.stats.hint_bits_cleared += cleared
        return cleared

    def merge_write_log(self, pages: set[int]) -> int:
        assert self.epoch is None
        newly = 0
        for p in sorted(pages):
            if not self.ram[p]:
                continue
            self.stats.log_pages_marked += 1
            if not self.dirty[p]:
                newly += 1
                self.stats.redirtied_after_hint += self.hinted[p]
            self.dirty[p] = 1
        for p in self.hinted.search(1):  # hinted, never sent, still clean: dirty all the same
            if not self.sent[p] and not self.dirty[p]:
                self.dirty[p] = 1
                self.stats.hinted_unwritten += 1
        return newly

    def mark_all(self) -> int:
        newly = (self.ram & ~self.dirty).count()
        self.dirty |= self.ram
        return newly

    def count_dirty(self) -> int:
        return self.dirty.count()

    def take_dirty_runs(self, budget_pages: int, max_runs: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        taken = 0
        order = list(range(self.cursor, self.nbits)) + list(range(self.cursor))
        boundary = self.nbits - self.cursor  # index in ``order`` where the scan wraps to page 0
        i = 0
        while i < len(order):
            p = order[i]
            if not self.dirty[p]:
                i += 1
                continue
            if len(runs) == max_runs or taken == budget_pages:
                self.cursor = p
                return runs
            j = i
            while (
                j < len(order)
                and self.dirty[order[j]]
                and (j == i or j != boundary)
                and taken + (j - i) < budget_pages
            ):
                j += 1
            length = j - i
            for k in range(i, j):
                self.dirty[order[k]] = 0
                self.sent[order[k]] = 1
                self.hinted[order[k]] = 0
            runs.append((p, length))
            taken += length
            i = j
            if j < len(order) and self.dirty[order[j]] and j != boundary:
                self.cursor = order[j]
                return runs
        self.cursor = 0
        return runs

    def skip_zero_pages(self, runs: list[tuple[int, int]]) -> int:
        skipped = 0
        for first, n in runs:
            for p in range(first, first + n):
                if self.dirty[p] and self.known_zero[p]:
                    self.dirty[p] = 0
                    self.hinted[p] = 0
                    self.sent[p] = 1
                    skipped += 1
        self.stats.zero_pages_unread += skipped
        return skipped

    def plan_send(self, first_page: int, zero_flags: list[int]) -> list[int]:
        out = []
        for i, z in enumerate(zero_flags):
            p = first_page + i
            if z and self.known_zero[p]:
                out.append(SKIP_ZERO)
            elif z:
                out.append(SEND_ZERO)
                self.known_zero[p] = 1
            else:
                out.append(SEND_DATA)
                self.known_zero[p] = 0
        return out
