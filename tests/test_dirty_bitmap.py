"""DirtyBitmap and RamLayout: translation, epochs, bad input, and the traces of docs/protocol-model.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fph.dirty_bitmap import (
    SEND_DATA,
    SEND_ZERO,
    SKIP_ZERO,
    BitmapError,
    DirtyBitmap,
    _clear_ranges,
    _clear_ranges_sweep,
    _validate_ranges,
    zero_page_flags,
)
from fph.ram_layout import GiB, LayoutError, RamLayout, RamRange
from tests.test_dirty_bitmap_stateful import LostWriteChecker, from_words, to_words

PAGE = 4096
MiB = 1 << 20


def test_pc_layout_splits_at_the_pci_hole() -> None:
    layout = RamLayout.pc(4608 * MiB)
    assert [(r.gpa, r.size, r.offset) for r in layout] == [(0, 3 * GiB, 0), (4 * GiB, 1536 * MiB, 3 * GiB)]
    assert layout.gpa_to_offset(4 * GiB + PAGE) == 3 * GiB + PAGE
    assert layout.offset_to_gpa(3 * GiB) == 4 * GiB
    assert layout.span_pages == (4 * GiB + 1536 * MiB) // PAGE
    with pytest.raises(LayoutError, match="not inside guest RAM"):
        layout.gpa_to_offset(3 * GiB)
    with pytest.raises(LayoutError, match="not inside guest RAM"):
        layout.gpa_to_offset(3 * GiB - PAGE, 2 * PAGE)  # straddles the end of low RAM
    assert [(r.gpa, r.size) for r in RamLayout.pc(1 * GiB)] == [(0, GiB)]
    assert [(r.gpa, r.size) for r in RamLayout.q35(3 * GiB)] == [(0, 2 * GiB), (4 * GiB, GiB)]


@pytest.mark.parametrize(
    "ranges",
    [
        [(0, 0, 0)],
        [(1, PAGE, 0)],
        [(0, -PAGE, 0)],
        [(0, 2 * PAGE, 0), (PAGE, PAGE, 2 * PAGE)],
        [(0, 2 * PAGE, 0), (4 * PAGE, PAGE, PAGE)],
        [(1 << 52, PAGE, 0)],
        [],
    ],
)
def test_impossible_layouts_are_refused(ranges: list[tuple[int, int, int]]) -> None:
    with pytest.raises(LayoutError):
        RamLayout(RamRange(*r) for r in ranges)


def test_overflowing_and_negative_addresses() -> None:
    layout = RamLayout.flat(GiB)
    for gpa, length in [(-PAGE, PAGE), (2**64 - PAGE, 2 * PAGE), (0, 0), (0, -1)]:
        with pytest.raises(LayoutError):
            layout.range_of(gpa, length)


@pytest.fixture
def bm() -> DirtyBitmap:
    b = DirtyBitmap(RamLayout.pc(4608 * MiB))
    b.mark_all()
    return b


@pytest.mark.parametrize(
    ("ranges", "reason"),
    [
        ([(0, 0)], "zero length"),
        ([(PAGE + 1, PAGE)], "aligned"),
        ([(0, PAGE + 7)], "aligned"),
        ([(3 * GiB, PAGE)], "not inside guest RAM"),  # the PCI hole
        ([(6 * GiB, PAGE)], "not inside guest RAM"),  # beyond RAM
        ([(2**64 - PAGE, 2 * PAGE)], "overflows"),
        ([(0, PAGE), (3 * GiB - PAGE, 2 * PAGE)], "range 1"),  # one bad range rejects the batch
        ([(-PAGE, PAGE)], "64-bit unsigned"),
        ([(0, 2**64)], "64-bit unsigned"),
        ([("0", PAGE)], "pair of ints"),
    ],
)
def test_bad_hints_change_nothing(bm: DirtyBitmap, ranges: list[tuple[int, int]], reason: str) -> None:
    bm.open_epoch(7)
    before = bm.dirty.copy()
    with pytest.raises(BitmapError, match=reason):
        bm.apply_hints(7, ranges)
    assert np.array_equal(before, bm.dirty)
    assert bm.stats.hints_rejected_invalid == len(ranges)
    assert bm.stats.hint_bits_cleared == 0


def test_bad_hint_arrays(bm: DirtyBitmap) -> None:
    bm.open_epoch(2)
    with pytest.raises(BitmapError, match="shape"):
        bm.apply_hints(2, np.zeros((3, 3), dtype=np.uint64))
    with pytest.raises(BitmapError, match="negative"):
        bm.apply_hints(2, np.array([[-4096, 4096]], dtype=np.int64))
    with pytest.raises(BitmapError, match="integers"):
        bm.apply_hints(2, np.array([[0.0, 4096.0]]))


def test_hint_clears_only_in_its_open_epoch(bm: DirtyBitmap) -> None:
    total = bm.count_dirty()
    assert bm.apply_hints(2, [(4 * MiB, 4 * MiB)]) == 0  # no epoch open
    bm.open_epoch(3)
    assert bm.apply_hints(2, [(4 * MiB, 4 * MiB)]) == 0  # another epoch
    assert bm.stats.hints_dropped_stale == 2
    assert bm.apply_hints(3, [(4 * MiB, 4 * MiB), (4 * GiB, 8 * MiB)]) == 3072
    assert bm.apply_hints(3, [(4 * MiB, 4 * MiB)]) == 0  # already clear: nothing "really cleared"
    assert bm.count_dirty() == total - 3072
    assert bm.stats.hinted_pages == 4096 and bm.stats.hint_bits_cleared == 3072
    assert not bm.is_dirty((4 * MiB) // PAGE) and bm.is_dirty((4 * MiB) // PAGE - 1)
    assert bm.is_dirty((8 * MiB) // PAGE)


def test_epoch_misuse(bm: DirtyBitmap) -> None:
    for bad in (0, 1, 2**32, "5"):
        with pytest.raises(BitmapError, match="command id"):
            bm.open_epoch(bad)  # type: ignore[arg-type]
    bm.open_epoch(2)
    with pytest.raises(BitmapError, match="still open"):
        bm.open_epoch(3)
    with pytest.raises(BitmapError, match="close hint epoch 2"):
        bm.merge_write_log(np.zeros(bm.nwords, dtype=np.uint64))
    assert bm.close_epoch() == 2
    assert bm.close_epoch() is None


def test_write_log_size_and_type(bm: DirtyBitmap) -> None:
    for log in (
        np.zeros(bm.nwords + 1, np.uint64),
        np.zeros(bm.nwords, np.int64),
        np.zeros((2, 2), np.uint64),
    ):
        with pytest.raises(BitmapError):
            bm.merge_write_log(log)  # type: ignore[arg-type]


def test_write_log_rededirties_hinted_pages_and_ignores_holes() -> None:
    bm = DirtyBitmap(RamLayout.pc(4608 * MiB))
    bm.open_epoch(2)
    bm.apply_hints(2, [(0, 8 * PAGE)])
    bm.close_epoch()
    hole_page = 3 * GiB // PAGE + 5
    assert bm.merge_write_log(to_words({1, 2, 100, hole_page}, bm.nwords)) == 3
    assert bm.stats.log_pages_marked == 3
    assert bm.stats.redirtied_after_hint == 2
    # the hinted pages nothing wrote are dirty again too: the destination never got them
    assert bm.stats.hinted_unwritten == 6
    assert from_words(bm.dirty, bm.nbits) == {*range(8), 100}
    assert bm.count_dirty() == bm.recount_dirty() == 9
    # hinted pages re-dirtied are no longer "hinted": a second write does not count twice
    bm.merge_write_log(to_words({1}, bm.nwords))
    assert bm.stats.redirtied_after_hint == 2 and bm.stats.hinted_unwritten == 6


def test_take_runs_budget_cursor_and_sent_map() -> None:
    bm = DirtyBitmap(RamLayout.flat(1024 * PAGE))
    bm.mark_all()
    bm.open_epoch(2)
    bm.apply_hints(2, [(100 * PAGE, 50 * PAGE), (600 * PAGE, 24 * PAGE)])
    bm.close_epoch()
    assert bm.take_dirty_runs(120 * PAGE).tolist() == [[0, 100], [150, 20]]
    assert bm.take_dirty_runs(10_000 * PAGE, max_runs=1).tolist() == [[170, 430]]
    assert bm.take_dirty_runs(10_000 * PAGE).tolist() == [[624, 400]]
    assert bm.take_dirty_runs(10_000 * PAGE).tolist() == []
    assert from_words(bm.sent, bm.nbits) == set(range(1024)) - set(range(100, 150)) - set(range(600, 624))
    bm.merge_write_log(to_words({5, 700}, bm.nwords))
    assert bm.take_dirty_runs(PAGE).tolist() == [[5, 1]]
    # the hinted pages, never sent, come back at the harvest (hinted_unwritten) and leave as sent
    assert bm.take_dirty_runs(10_000 * PAGE).tolist() == [[100, 50], [600, 24], [700, 1]]
    assert bm.stats.hinted_unwritten == 74
    assert from_words(bm.sent, bm.nbits) == set(range(1024))
    bm.merge_write_log(to_words(set(), bm.nwords))
    assert bm.count_dirty() == 0
    with pytest.raises(BitmapError):
        bm.take_dirty_runs(PAGE - 1)


def test_zero_page_classification_and_send_plan() -> None:
    ram = np.zeros(8 * PAGE, dtype=np.uint8)
    ram[PAGE * 1 + 4095] = 1  # last byte of page 1
    ram[PAGE * 5] = 0xFF  # first byte of page 5
    flags = zero_page_flags(ram)
    assert flags.tolist() == [1, 0, 1, 1, 1, 0, 1, 1]
    with pytest.raises(BitmapError, match="whole number of pages"):
        zero_page_flags(np.zeros(PAGE + 8, dtype=np.uint8))
    bm = DirtyBitmap(RamLayout.flat(8 * PAGE))
    assert bm.plan_send(0, flags).tolist() == [
        SKIP_ZERO,
        SEND_DATA,
        *[SKIP_ZERO] * 3,
        SEND_DATA,
        SKIP_ZERO,
        SKIP_ZERO,
    ]
    # page 1 now holds data at the destination: when it becomes zero it needs a marker
    assert bm.plan_send(1, np.array([1], np.uint8)).tolist() == [SEND_ZERO]
    assert bm.plan_send(1, np.array([1], np.uint8)).tolist() == [SKIP_ZERO]
    with pytest.raises(BitmapError, match="outside"):
        bm.plan_send(7, np.array([1, 1], np.uint8))


def test_unknown_destination_needs_zero_markers() -> None:
    bm = DirtyBitmap(RamLayout.flat(4 * PAGE), destination_zeroed=False)
    assert bm.plan_send(0, np.ones(4, np.uint8)).tolist() == [SEND_ZERO] * 4


def test_stale_hint_trace_is_dropped_and_the_checker_catches_the_unsafe_order() -> None:
    """docs/protocol-model.md's stale-hint loss: hint queued in epoch 2, page reused and written, harvested,
    then the late hint arrives. fph drops it; applying it anyway (no epoch check) loses the write."""
    layout = RamLayout.flat(64 * PAGE)
    p = 8
    for unsafe in (False, True):
        bm = DirtyBitmap(layout)
        bm.mark_all()
        truth = LostWriteChecker(list(range(64)))
        truth.last_harvest = truth.tick()
        for q in range(64):  # round 0 sends everything
            truth.last_send[q] = truth.tick()
        bm.take_dirty_runs(64 * PAGE)
        bm.open_epoch(2)
        truth.epoch_opened_at[2] = truth.last_harvest
        # the driver queues hint (p, id 2); the shrinker returns p; the guest writes p
        truth.last_write[p] = truth.tick()
        pending = {p}
        bm.close_epoch()
        bm.merge_write_log(to_words(pending, bm.nwords))
        pending.clear()
        truth.last_harvest = truth.tick()
        bm.open_epoch(3)
        truth.epoch_opened_at[3] = truth.last_harvest
        late = np.array([[p * PAGE, PAGE]], dtype=np.uint64)
        if unsafe:
            _clear_ranges(bm.dirty, bm.hinted, late)
        else:
            assert bm.apply_hints(2, late) == 0
        lost = truth.lost_pages(from_words(bm.dirty, bm.nbits), pending)
        assert lost == ([p] if unsafe else [])


def test_reuse_after_a_current_hint_is_caught_at_the_next_harvest() -> None:
    """init_on_alloc=1: the driver zeroes the block after the id, hints it, the shrinker hands it back and
    the guest writes it. The hint clears the bit; the logged writes bring the page back at the harvest."""
    bm = DirtyBitmap(RamLayout.flat(64 * PAGE))
    bm.mark_all()
    bm.open_epoch(2)
    pending = {8}  # the driver's zeroing, logged
    assert bm.apply_hints(2, [(8 * PAGE, PAGE)]) == 1
    pending.add(8)  # the reuse write
    assert not bm.is_dirty(8)
    bm.close_epoch()
    bm.merge_write_log(to_words(pending, bm.nwords))
    assert bm.is_dirty(8)
    assert bm.stats.redirtied_after_hint == 1


def test_a_hinted_block_a_device_fills_without_a_store_is_read_after_the_next_harvest() -> None:
    """init_on_alloc=0: the driver hints page 8 without writing it; DONE; the guest reuses it as a page
    cache page that virtio-blk fills (no store, no log bit). The harvest marks it dirty all the same, and
    once read it is the switchover check's. Page 9, sent before the hint, stays clean: the check has it."""
    bm = DirtyBitmap(RamLayout.flat(64 * PAGE))
    bm.mark_all()
    assert bm.take_dirty_runs(PAGE).tolist() == [[0, 1]]
    bm.skip_zero_pages(np.array([[9, 1]]))  # a hole of the source file: "sent" (the destination holds zeros)
    bm.open_epoch(2)
    assert bm.apply_hints(2, [(8 * PAGE, 2 * PAGE)]) == 1
    assert not bm.is_dirty(8)
    bm.close_epoch()
    assert bm.merge_write_log(to_words(set(), bm.nwords)) == 0  # the guest's dirty rate: nothing written
    assert bm.is_dirty(8) and not bm.is_dirty(9)
    assert bm.stats.hinted_unwritten == 1 and bm.stats.redirtied_after_hint == 0
    assert bm.count_dirty() == bm.recount_dirty() == 64 - 2 - 1 + 1


def test_a_page_sent_before_its_hint_in_the_same_epoch_is_waste_and_a_later_write_still_counts() -> None:
    """Round 0 overlapping the hint run: page 8 is sent, then hinted in the open epoch (waste: the bit is
    already clear), then the guest writes it; page 9 is hinted before it is sent (saved), then written.
    Both writes come back at the harvest; the hint touched neither log bit."""
    bm = DirtyBitmap(RamLayout.flat(64 * PAGE))
    bm.mark_all()
    bm.open_epoch(2)
    assert bm.take_dirty_runs(PAGE).tolist() == [[0, 1]]  # the sender's cursor: page 0 ...
    for _ in range(8):
        bm.take_dirty_runs(PAGE)  # ... to page 8, one page at a time
    sent = np.zeros(64, dtype=np.bool_)
    sent[:9] = True
    assert bm.apply_hints(2, [(8 * PAGE, 2 * PAGE)]) == 1  # only page 9 was still dirty
    assert bm.count_hinted(sent) == 1  # page 8: sent, then hinted
    pending = {8, 9}
    bm.close_epoch()
    bm.merge_write_log(to_words(pending, bm.nwords))
    assert bm.is_dirty(8) and bm.is_dirty(9)
    with pytest.raises(BitmapError, match="one flag per page"):
        bm.count_hinted(sent[:10])


def test_unread_zero_pages_leave_only_where_the_destination_holds_zeros() -> None:
    bm = DirtyBitmap(RamLayout.flat(256 * PAGE))
    bm.mark_all()
    bm.plan_send(10, np.zeros(2, np.uint8))  # pages 10-11 now hold data at the destination
    runs = np.array([[0, 4], [8, 8], [255, 1]], dtype=np.int64)
    assert bm.skip_zero_pages(runs) == 4 + 6 + 1  # 10 and 11 must still be sent (as zero markers)
    assert bm.count_dirty() == bm.recount_dirty() == 256 - 11
    assert from_words(bm.sent, bm.nbits) == {0, 1, 2, 3, 8, 9, 12, 13, 14, 15, 255}
    assert bm.is_dirty(10) and bm.is_dirty(11) and not bm.is_dirty(8)
    assert bm.skip_zero_pages(runs) == 0  # no longer dirty
    assert bm.stats.zero_pages_unread == 11
    before = (bm.dirty.copy(), bm.sent.copy())
    for bad in ([[250, 7]], [[-1, 2]], [[3, 0]], [[1, 2, 3]], [[0.5, 1.0]]):
        with pytest.raises(BitmapError):
            bm.skip_zero_pages(np.array(bad))
    assert np.array_equal(before[0], bm.dirty) and np.array_equal(before[1], bm.sent)


def test_kernels_compile_to_the_intended_types() -> None:
    """numba unifies uint64 with int64 to float64 silently (numba #4631): pin the signatures."""
    from fph import dirty_bitmap as d

    d.warm_up()
    kernels = (d._clear_ranges, d._merge_log, d._count, d._take_runs, d._zero_page_flags, d._skip_zero_runs)
    for kernel in kernels:
        assert kernel.nopython_signatures, kernel
        for sig in kernel.nopython_signatures:
            assert "float" not in str(sig.return_type), (kernel, sig)


def test_new_kernels_compile_to_the_intended_types() -> None:
    from fph import dirty_bitmap as d

    d.warm_up()
    for kernel in (d._clear_ranges_sweep, d._validate_ranges):
        assert kernel.nopython_signatures, kernel
        for sig in kernel.nopython_signatures:
            assert "float" not in str(sig.return_type), (kernel, sig)


@settings(max_examples=400, deadline=None)
@given(
    nwords=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    shape=st.lists(
        st.tuples(st.floats(0, 1), st.sampled_from([1, 2, 63, 64, 65, 700, 4096, 5000, 10**6])), max_size=40
    ),
)
def test_sweep_clears_exactly_like_range_by_range(
    nwords: int, seed: int, shape: list[tuple[float, int]]
) -> None:
    """The two ways apply_hints clears a batch: same bits, same hinted map, same count, scratch left zero."""
    nbits = nwords * 64
    rng = np.random.default_rng(seed)
    ranges = []
    for where, most in shape:
        start = min(int(where * nbits), nbits - 1)
        n = int(rng.integers(1, min(most, nbits - start) + 1))
        ranges.append((start * PAGE, n * PAGE))
    arr = np.array(ranges, dtype=np.uint64).reshape(-1, 2)
    words = rng.integers(0, 2**64, nwords, dtype=np.uint64, endpoint=False)
    hinted = rng.integers(0, 2**64, nwords, dtype=np.uint64, endpoint=False)
    bad, pages, wlo, whi = _validate_ranges(
        arr, np.array([0], np.uint64), np.array([nbits * PAGE], np.uint64)
    )
    assert bad == -1 and pages == sum(n for _, n in ranges) // PAGE
    w1, h1 = words.copy(), hinted.copy()
    w2, h2 = words.copy(), hinted.copy()
    edges = np.zeros(nwords, np.uint64)
    cover = np.zeros(nwords // 64 + 2, np.uint64)
    assert _clear_ranges(w1, h1, arr) == _clear_ranges_sweep(w2, h2, arr, edges, cover, wlo, whi)
    assert np.array_equal(w1, w2) and np.array_equal(h1, h2)
    assert not edges.any() and not cover.any()


def test_sample_dirty_draws_only_dirty_pages_and_leaves_the_bitmap_alone() -> None:
    layout = RamLayout.flat(64 * 1024 * PAGE)
    bm = DirtyBitmap(layout)
    assert bm.sample_dirty(16).size == 0
    bm.mark_all()
    bm.take_dirty_runs(40_000 * PAGE)  # what is left: pages 40,000 ..
    before, count = bm.dirty.copy(), bm.count_dirty()
    few = bm.sample_dirty(1024, seed=3)
    assert few.size == 1024 and (few >= 40_000).all() and np.all(np.diff(few) > 0)
    assert all(bm.is_dirty(int(p)) for p in few[:50])
    assert np.array_equal(bm.dirty, before) and bm.count_dirty() == count
    assert bm.sample_dirty(10**6).size == count  # fewer than asked: all of them
