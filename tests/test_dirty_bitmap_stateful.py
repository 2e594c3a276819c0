"""The numba engine against the reference model, under random interleavings, with the no-lost-write check.

The no-lost-write property (docs/protocol-model.md): at the final sync, every page written after its last send
is dirty (in the bitmap or in the not-yet-harvested log), unless a hint from an epoch opened after that write
(opened = the harvest that preceded the id) says the page is free. A device's write (DMA through QEMU) is in
no log and no hint excuses it: right after every harvest, each page a device wrote that the destination never
got is dirty (pages it did get are the switchover check's: it re-reads every page sent).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fph.dirty_bitmap import BitmapError, DirtyBitmap
from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE, RamLayout, RamRange
from tests.bitmap_model import ModelBitmap

LAYOUTS = [
    RamLayout.flat(200 * PAGE_SIZE),
    # RAM below a hole and above it, like pc's split at the PCI hole (offsets packed in the file).
    RamLayout([RamRange(0, 70 * PAGE_SIZE, 0), RamRange(128 * PAGE_SIZE, 130 * PAGE_SIZE, 70 * PAGE_SIZE)]),
    RamLayout(
        [RamRange(3 * PAGE_SIZE, 61 * PAGE_SIZE, 0), RamRange(65 * PAGE_SIZE, 63 * PAGE_SIZE, 61 * PAGE_SIZE)]
    ),
]


def to_words(pages: set[int], nwords: int) -> np.ndarray:
    log = np.zeros(nwords, dtype=np.uint64)
    for p in pages:
        log[p >> 6] |= np.uint64(1) << np.uint64(p & 63)
    return log


def from_words(words: np.ndarray, nbits: int) -> set[int]:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:nbits]
    return set(np.flatnonzero(bits).tolist())


class LostWriteChecker:
    """Ground truth from the guest's side: when each page was last written, sent, and proven free."""

    def __init__(self, ram_pages: list[int]) -> None:
        self.clock = 0
        self.last_write = dict.fromkeys(ram_pages, 0)  # the initial content counts as a write
        self.last_send = dict.fromkeys(ram_pages, -1)
        self.free_since: dict[int, int] = {}  # page -> latest opening harvest time of an accepted hint
        self.epoch_opened_at: dict[int, int] = {}
        self.last_harvest = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def lost_pages(self, dirty: set[int], pending: set[int]) -> list[int]:
        lost = []
        for p, written in self.last_write.items():
            if written <= self.last_send[p] or p in dirty or p in pending:
                continue
            if self.free_since.get(p, -1) > written:
                continue
            lost.append(p)
        return lost


class BitmapMachine(RuleBasedStateMachine):
    @initialize(layout=st.sampled_from(LAYOUTS), hole_every=st.integers(2, 5))
    def setup(self, layout: RamLayout, hole_every: int) -> None:
        self.bm = DirtyBitmap(layout)
        self.model = ModelBitmap(layout)
        self.ram_pages = [p for r in layout for p in range(r.gpa >> PAGE_SHIFT, r.end >> PAGE_SHIFT)]
        self.truth = LostWriteChecker(self.ram_pages)
        self.holes = {p for p in self.ram_pages if p % hole_every == 0}  # never written: zero, unallocated
        self.pending: set[int] = set()
        self.device_written: dict[int, int] = {}
        self.next_id = 2
        self.issued: list[int] = []
        assert self.bm.mark_all() == self.model.mark_all()
        self.truth.last_harvest = self.truth.tick()  # round 0: the initial content is all "harvested"

    # ---------------------------------------------------------------------------------- the guest
    def _written(self, data: st.DataObject, n: int) -> list[int]:
        """Up to ``n`` RAM pages from a drawn one on: no longer holes (a write allocates a page)."""
        start = data.draw(st.sampled_from(self.ram_pages))
        pages = [p for p in range(start, start + n) if p in self.truth.last_write]
        self.holes.difference_update(pages)
        return pages

    @rule(data=st.data(), n=st.integers(1, 12))
    def guest_writes(self, data: st.DataObject, n: int) -> None:
        for p in self._written(data, n):
            self.pending.add(p)
            self.truth.last_write[p] = self.truth.tick()

    @rule(data=st.data(), n=st.integers(1, 12))
    def device_writes(self, data: st.DataObject, n: int) -> None:
        """QEMU fills pages the guest posted (a reused hinted block, say): no store, so no log bit."""
        for p in self._written(data, n):
            self.device_written[p] = self.truth.tick()

    @rule(data=st.data(), stale=st.booleans(), npages=st.integers(1, 20), nranges=st.integers(1, 4))
    def hint(self, data: st.DataObject, stale: bool, npages: int, nranges: int) -> None:
        if stale and self.issued:
            epoch = data.draw(st.sampled_from(self.issued))
        elif self.model.epoch is not None:
            epoch = self.model.epoch
        else:
            epoch = data.draw(st.integers(2, 50))
        ranges = []
        for _ in range(nranges):
            start = data.draw(st.sampled_from(self.ram_pages))
            ranges.append((start * PAGE_SIZE, npages * PAGE_SIZE))
        valid = self.model.valid(ranges)
        if not valid:
            with pytest.raises(BitmapError):
                self.bm.apply_hints(epoch, ranges)
            with pytest.raises(ValueError):
                self.model.apply_hints(epoch, ranges)
            return
        accepted = epoch == self.model.epoch
        assert self.bm.apply_hints(epoch, ranges) == self.model.apply_hints(epoch, ranges)
        self.truth.tick()
        if accepted:
            opened = self.truth.epoch_opened_at[epoch]
            for gpa, length in ranges:
                for p in range(gpa >> PAGE_SHIFT, (gpa + length) >> PAGE_SHIFT):
                    self.truth.free_since[p] = max(self.truth.free_since.get(p, -1), opened)

    @rule(data=st.data())
    def bad_hint(self, data: st.DataObject) -> None:
        gpa = data.draw(st.sampled_from([1, 4095, self.bm.nbits * PAGE_SIZE, (1 << 64) - PAGE_SIZE, 2**70]))
        length = data.draw(st.sampled_from([0, PAGE_SIZE, 3, 2**64]))
        before = self.bm.dirty.copy()
        with pytest.raises(BitmapError):
            self.bm.apply_hints(self.model.epoch or 2, [(gpa, length)])
        self.model.stats.hints_rejected_invalid += 1
        assert np.array_equal(before, self.bm.dirty)

    # ----------------------------------------------------------------------------------- the host
    @rule()
    def close_epoch(self) -> None:
        assert self.bm.close_epoch() == self.model.close_epoch()

    @rule()
    def harvest(self) -> None:
        log = to_words(self.pending, self.bm.nwords)
        if self.model.epoch is not None:
            with pytest.raises(BitmapError):
                self.bm.merge_write_log(log)
            return
        assert self.bm.merge_write_log(log) == self.model.merge_write_log(self.pending)
        self.pending.clear()
        self.truth.last_harvest = self.truth.tick()
        dirty = from_words(self.bm.dirty, self.bm.nbits)
        sent = from_words(self.bm.sent, self.bm.nbits)
        missed = [p for p in self.device_written if p not in sent and p not in dirty]
        assert missed == [], f"device writes the destination never gets: {missed}"

    @rule()
    def open_epoch(self) -> None:
        if self.model.epoch is not None:
            with pytest.raises(BitmapError):
                self.bm.open_epoch(self.next_id)
            return
        cmd_id = self.next_id
        self.next_id += 1
        self.bm.open_epoch(cmd_id)
        self.model.open_epoch(cmd_id)
        self.issued.append(cmd_id)
        self.truth.epoch_opened_at[cmd_id] = self.truth.last_harvest

    @rule(budget=st.integers(1, 80), max_runs=st.integers(1, 6))
    def send(self, budget: int, max_runs: int) -> None:
        runs = self.bm.take_dirty_runs(budget * PAGE_SIZE, max_runs)
        expected = self.model.take_dirty_runs(budget, max_runs)
        assert [tuple(r) for r in runs.tolist()] == expected
        now = self.truth.tick()
        for start, n in expected:
            for p in range(start, start + n):
                self.truth.last_send[p] = now

    @rule(data=st.data())
    def skip_holes(self, data: st.DataObject) -> None:
        """The sender looks at the source file: pages still in holes leave unread where allowed."""
        start = data.draw(st.sampled_from(self.ram_pages))
        window = [p for p in range(start, start + data.draw(st.integers(1, 40))) if p in self.holes]
        runs: list[tuple[int, int]] = []
        for p in window:
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        skipped = {p for p in window if self.model.dirty[p] and self.model.known_zero[p]}
        arr = np.array(runs, dtype=np.int64).reshape(-1, 2)
        assert self.bm.skip_zero_pages(arr) == self.model.skip_zero_pages(runs) == len(skipped)
        now = self.truth.tick()
        for p in skipped & self.holes:  # the destination holds the page's content (zeros): a send
            self.truth.last_send[p] = now

    @precondition(lambda self: self.truth.clock % 7 == 0)
    @rule()
    def mark_all(self) -> None:
        assert self.bm.mark_all() == self.model.mark_all()

    @rule(data=st.data())
    def plan(self, data: st.DataObject) -> None:
        start = data.draw(st.sampled_from(self.ram_pages))
        n = data.draw(st.integers(1, 8))
        n = min(n, self.bm.nbits - start)
        flags = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        got = self.bm.plan_send(start, np.array(flags, dtype=np.uint8)).tolist()
        assert got == self.model.plan_send(start, flags)

    # ------------------------------------------------------------------------------------ checks
    @invariant()
    def agrees_with_model(self) -> None:
        if not hasattr(self, "bm"):
            return
        assert from_words(self.bm.dirty, self.bm.nbits) == set(self.model.dirty.search(1))
        assert from_words(self.bm.sent, self.bm.nbits) == set(self.model.sent.search(1))
        assert from_words(self.bm.known_zero_at_destination, self.bm.nbits) == set(
            self.model.known_zero.search(1)
        )
        assert self.bm.count_dirty() == self.bm.recount_dirty() == self.model.count_dirty()
        assert self.bm.stats == self.model.stats
        assert self.bm.epoch == self.model.epoch

    @invariant()
    def no_write_lost(self) -> None:
        if not hasattr(self, "bm"):
            return
        dirty = from_words(self.bm.dirty, self.bm.nbits)
        assert self.truth.lost_pages(dirty, self.pending) == []


BitmapMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBitmapAgainstModel = BitmapMachine.TestCase
