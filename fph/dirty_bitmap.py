"""Pages still to send to the migration destination, per guest.

One bit per 4 KiB guest-physical page, stored as ``uint64`` words with page ``p`` at bit ``p & 63`` of word
``p >> 6``: the layout of the vhost-user dirty log and of fph's write logs, so a log merges with one OR.

Why hints carry an epoch
------------------------
A free page hint says "page P was free at some moment after command id E was issued". Each precopy round
is one epoch: ``close_epoch()`` (the device sends STOP), the write log is harvested into the bitmap with
``merge_write_log()``, then ``open_epoch(E)`` issues a new id. A hint of epoch E may clear bits only
while E is open. A stale hint would be wrong: the guest hints P (epoch E), its shrinker hands P back
early, the guest writes P, the harvest that closed E records that write as a dirty bit, and then the late
hint of E arrives and clears it -- P never reaches the destination. Because the harvest always comes
before the id is issued, every write made after the id is in the log and re-marks its page at the next
harvest; a hint clears the bitmap only, never the log. ``merge_write_log()`` therefore refuses to run
while an epoch is open. (docs/protocol-model.md: this order is checked exhaustively.)

Why a hint lasts only until the next harvest
--------------------------------------------
The write log sees the guest's CPU stores, not what devices write into guest RAM through QEMU. A guest that
does not zero the pages it allocates (``init_on_alloc=0``) can take a hinted block back and have virtio-blk
fill it with disk blocks without one store to it; had the hint kept that page out of the migration, the
destination would hold zeros there (measured: 29,859-32,423 of 33,024 page cache pages of a 128 MiB disk
read after DONE, ``tests/test_dma_guest.py``). So every harvest marks dirty again each page hinted free that
the destination never got and no logged write made dirty (``stats.hinted_unwritten``): a hint only defers a
page, and the page is read once, after which the switchover check covers it like every page read.

The class is safe to call from several threads (one lock); the kernels release the GIL.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

from fph.bitops import ctz64, popcount64, prefetch_write
from fph.kernels import zero_page_flags as _zero_page_flags
from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE, LayoutError, RamLayout

Words = npt.NDArray[np.uint64]

EPOCH_MIN = 2
"""The smallest hint epoch the bitmap accepts. An epoch is the free page hint command id of its round, and
ids 0 (STOP) and 1 (DONE) are reserved by the virtio spec; which ids fph issues is
``fph.balloon.spec.CMD_ID_MIN``..``CMD_ID_MAX``, a sub-range of this one."""
EPOCH_MAX = 0xFFFF_FFFF
"""The largest hint epoch the bitmap accepts (command ids are 32-bit)."""

SWEEP_RATIO = 16
"""``apply_hints`` clears a batch in one sweep over the words it spans, instead of range by range, when it
has at least one range per ``SWEEP_RATIO`` words of that span (1 per 1,024 pages). Range by range costs a
branch miss at each range's end and scattered word accesses; the sweep costs ~6 ns a range plus ~0.5 ns
a word of the span. Break-even on the Zen 4 host, 64 GiB bitmap: 1 range per ~14 words with the bitmap in
cache, 1 per ~20-26 with the caches cold."""

SEND_DATA = 0
"""``plan_send`` verdict: the page holds data and must be sent."""
SEND_ZERO = 1
"""The page is zero but the destination may hold something else: send a zero marker."""
SKIP_ZERO = 2
"""The page is zero and the destination is known to hold zeros: send nothing."""

_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_ZERO = np.uint64(0)
_ONE = np.uint64(1)
_U64_6 = np.uint64(6)
_U64_63 = np.uint64(63)
_U64_64 = np.uint64(64)

_AHEAD = 16
"""Range kernels prefetch the words of the range this many ranges ahead (random ranges miss the caches)."""

_BAD_EMPTY, _BAD_ALIGN, _BAD_OVERFLOW, _BAD_OUTSIDE = 1, 2, 3, 4
_BAD_REASONS = {
    _BAD_EMPTY: "has zero length",
    _BAD_ALIGN: f"is not {PAGE_SIZE}-byte aligned",
    _BAD_OVERFLOW: "overflows the 64-bit address space",
    _BAD_OUTSIDE: "is not inside guest RAM",
}


class BitmapError(ValueError):
    """Bad input to the bitmap (a range outside RAM, a log of the wrong size, an epoch misuse).

    Raised before anything changes: the bitmap is exactly as it was.
    """


@dataclass(slots=True)
class BitmapStats:
    """Counters for the migration report; the names are the report's."""

    hinted_pages: int = 0
    hint_bits_cleared: int = 0
    hints_dropped_stale: int = 0
    hints_rejected_invalid: int = 0
    redirtied_after_hint: int = 0
    hinted_unwritten: int = 0
    """Pages hinted free, never sent, and not written by the next harvest: dirty again all the same (a
    device's DMA into a reused block is in no write log; only a CPU store is)."""
    log_pages_marked: int = 0
    zero_pages_unread: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- kernels


@njit(cache=True, nogil=True, inline="always")
def _mask(lo: Any, hi: Any) -> Any:
    """Bits [lo, hi) of a word, 0 <= lo < hi <= 64."""
    return (_ALL >> np.uint64(64 - (hi - lo))) << np.uint64(lo)


@njit(cache=True, nogil=True)
def _validate_ranges(ranges: Any, ram_lo: Any, ram_hi: Any) -> Any:
    """Check (gpa, length) byte ranges: returns (bad, pages, first word, end word).

    ``bad`` is index * 8 + reason of the first range that is not whole RAM pages, or -1 if all are;
    then ``pages`` is the sum of their lengths in pages and [first word, end word) the bitmap words
    they touch. A branch-free pass (vectorised) decides the common case, a batch of aligned ranges
    that all lie in one RAM range; any other batch is checked range by range after it.
    """
    shift = np.uint64(PAGE_SHIFT)
    n = ranges.shape[0]
    if n == 0:
        return -1, 0, 0, 0
    pages = _ZERO
    odd = _ZERO
    lo = _ALL
    hi = _ZERO
    flat = np.ascontiguousarray(ranges).reshape(-1)  # 1-d: the loop vectorises (2-d indexing does not)
    for i in range(n):
        gpa = flat[2 * i]
        length = flat[2 * i + 1]
        end = gpa + length
        odd |= ((gpa | length) & np.uint64(PAGE_SIZE - 1)) | np.uint64(length == 0) | np.uint64(end < gpa)
        pages += length >> shift
        lo = min(lo, gpa)
        hi = max(hi, end)
    wlo = np.int64(lo >> shift >> _U64_6)
    whi = np.int64(((hi >> shift) - _ONE) >> _U64_6) + 1
    if odd == _ZERO:
        for r in range(ram_lo.shape[0]):
            if ram_lo[r] <= lo and hi <= ram_hi[r]:
                return -1, np.int64(pages), wlo, whi
    for i in range(n):
        gpa = ranges[i, 0]
        length = ranges[i, 1]
        if length == 0:
            return i * 8 + _BAD_EMPTY, 0, 0, 0
        if (gpa | length) & np.uint64(PAGE_SIZE - 1):
            return i * 8 + _BAD_ALIGN, 0, 0, 0
        end = gpa + length
        if end < gpa:
            return i * 8 + _BAD_OVERFLOW, 0, 0, 0
        inside = False
        for r in range(ram_lo.shape[0]):
            if ram_lo[r] <= gpa and end <= ram_hi[r]:
                inside = True
                break
        if not inside:
            return i * 8 + _BAD_OUTSIDE, 0, 0, 0
    return -1, np.int64(pages), wlo, whi


@njit(cache=True, nogil=True)
def _clear_ranges(words: Any, hinted: Any, ranges: Any) -> Any:
    """Clear the pages of validated (gpa, length) byte ranges; mark them hinted; return bits cleared.

    Branch-free per word, so the out-of-order core overlaps the cache misses of random ranges; the first
    words of the range ``_AHEAD`` on are prefetched.
    """
    cleared = np.uint64(0)
    shift = np.uint64(PAGE_SHIFT)
    nranges = ranges.shape[0]
    for i in range(nranges):
        ahead = np.int64(ranges[min(i + _AHEAD, nranges - 1), 0] >> shift >> _U64_6)
        prefetch_write(words, ahead)
        prefetch_write(hinted, ahead)
        start = ranges[i, 0] >> shift
        last = start + (ranges[i, 1] >> shift) - np.uint64(1)
        w0 = np.int64(start >> _U64_6)
        w1 = np.int64(last >> _U64_6)
        mlo = _ALL << (start & _U64_63)
        mhi = _ALL >> (_U64_63 - (last & _U64_63))
        if w0 == w1:
            m = mlo & mhi
            old = words[w0]
            cleared += popcount64(old & m)
            words[w0] = old & ~m
            hinted[w0] |= m
            continue
        old = words[w0]
        cleared += popcount64(old & mlo)
        words[w0] = old & ~mlo
        hinted[w0] |= mlo
        for w in range(w0 + 1, w1):
            cleared += popcount64(words[w])
            words[w] = _ZERO
            hinted[w] = _ALL
        old = words[w1]
        cleared += popcount64(old & mhi)
        words[w1] = old & ~mhi
        hinted[w1] |= mhi
    return cleared


@njit(cache=True, nogil=True, inline="always")
def _below(e: Any) -> Any:
    """Bits [0, e) of a word, 0 <= e <= 64 (no branch, no shift by 64)."""
    return ((_ONE << np.uint64(e & 63)) - _ONE) | (_ZERO - np.uint64(e >> 6))


@njit(cache=True, nogil=True)
def _clear_ranges_sweep(
    words: Any, hinted: Any, ranges: Any, edges: Any, cover: Any, wlo: Any, whi: Any
) -> Any:
    """``_clear_ranges`` for big batches: the same result, in two passes instead of range by range.

    Pass 1 notes each validated range: its partial first and last words as bit masks in ``edges`` (one
    word per bitmap word), its whole words as bits of ``cover`` (one bit per bitmap word, 32 KiB for
    64 GiB: it stays in L1), branch-free for ranges up to 64 whole words. Pass 2 walks the words
    [wlo, whi) once, 64 at a time, vectorised: mask = edges | cover bit; count, clear, mark hinted. It
    leaves ``edges`` and ``cover`` zero again. Pass 1 prefetches the edge words ``_AHEAD`` ranges on: 100k
    random ranges with the caches cold, 1.26 ms without, 0.86-0.97 ms with (warm, 0.63 ms either way).
    """
    shift = np.uint64(PAGE_SHIFT)
    nranges = ranges.shape[0]
    for i in range(nranges):
        j = min(i + _AHEAD, nranges - 1)
        ahead = ranges[j, 0] >> shift
        prefetch_write(edges, np.int64(ahead >> _U64_6))
        prefetch_write(edges, np.int64((ahead + (ranges[j, 1] >> shift) - _ONE) >> _U64_6))
        start = ranges[i, 0] >> shift
        last = start + (ranges[i, 1] >> shift) - _ONE
        w0 = np.int64(start >> _U64_6)
        w1 = np.int64(last >> _U64_6)
        mlo = _ALL << (start & _U64_63)
        mhi = _ALL >> (_U64_63 - (last & _U64_63))
        if w0 == w1:
            mlo &= mhi
            mhi = _ZERO
        edges[w0] |= mlo
        edges[w1] |= mhi
        a: Any = w0 + 1  # whole words [a, w1)
        n = max(w1 - a, 0)
        c0 = a >> 6
        s = a & 63
        if n <= 64:
            e = s + n
            cover[c0] |= (_ALL << np.uint64(s)) & _below(min(e, 64))
            cover[c0 + 1] |= _below(max(e - 64, 0))
        else:
            c1 = (w1 - 1) >> 6
            cover[c0] |= _ALL << np.uint64(s)
            for c in range(c0 + 1, c1):
                cover[c] = _ALL
            cover[c1] |= _below(w1 - c1 * 64)
    cleared = np.uint64(0)
    for c in range(wlo >> 6, (whi + 63) >> 6):
        bits = cover[c]
        cover[c] = _ZERO
        ww = words[c * 64 : c * 64 + 64]  # slices: numba vectorises a loop from 0, not from an offset
        hh = hinted[c * 64 : c * 64 + 64]
        ee = edges[c * 64 : c * 64 + 64]
        for j in range(ww.shape[0]):
            m = ee[j] | (_ZERO - ((bits >> np.uint64(j)) & _ONE))
            ee[j] = _ZERO
            old = ww[j]
            cleared += popcount64(old & m)
            ww[j] = old & ~m
            hh[j] |= m
    return cleared


@njit(cache=True, nogil=True)
def _merge_log(words: Any, hinted: Any, sent: Any, fix_words: Any, fix_masks: Any, log: Any) -> Any:
    """OR a write log into the bitmap, then mark dirty every page hinted free that the destination never got
    and that is still clean; return (pages marked, newly dirty by the log, re-dirtied after a hint,
    hinted pages not written).

    The main loop takes every word unmasked (one stream less from memory); the few words that are not
    all RAM (``fix_words``, RAM-mask ``fix_masks``) are fixed up after: their non-RAM bits, never dirty
    before, are cleared again and taken out of the counts. ``hinted`` holds RAM pages only.
    """
    marked = np.uint64(0)
    newly = np.uint64(0)
    redirtied = np.uint64(0)
    unwritten = np.uint64(0)
    for w in range(words.shape[0]):
        lw = log[w]
        old = words[w]
        h = hinted[w]
        fresh = lw & ~old
        marked += popcount64(lw)
        newly += popcount64(fresh)
        redirtied += popcount64(fresh & h)
        now = old | lw
        stale = h & ~sent[w] & ~now
        unwritten += popcount64(stale)
        words[w] = now | stale
    for i in range(fix_words.shape[0]):
        w = fix_words[i]
        m = fix_masks[i]
        outside = popcount64(log[w] & ~m)
        marked -= outside
        newly -= outside
        words[w] &= m
    return marked, newly, redirtied, unwritten


@njit(cache=True, nogil=True)
def _mark_all(words: Any, ram_mask: Any) -> Any:
    newly = 0
    for w in range(words.shape[0]):
        old = words[w]
        new = old | ram_mask[w]
        newly += popcount64(new & ~old)
        words[w] = new
    return newly


@njit(cache=True, nogil=True)
def _count(words: Any) -> Any:
    n = np.uint64(0)
    for w in range(words.shape[0]):
        n += popcount64(words[w])
    return n


@njit(cache=True, nogil=True, inline="always")
def _next_bit(words: Any, pos: Any, limit: Any, flip: Any) -> Any:
    """First bit at or after ``pos`` and before ``limit`` (``limit`` if none) that is set, with ``flip``
    ``_ZERO``, or clear, with ``flip`` ``_ALL``."""
    if pos >= limit:
        return limit
    w = pos >> 6
    cur = (words[w] ^ flip) & (_ALL << np.uint64(pos & 63))
    last = (limit - 1) >> 6
    while cur == _ZERO:
        w += 1
        if w > last:
            return limit
        cur = words[w] ^ flip
    found = w * 64 + np.int64(ctz64(cur))
    return min(found, limit)


@njit(cache=True, nogil=True, inline="always")
def _take_bits(words: Any, sent: Any, hinted: Any, start: Any, end: Any) -> None:
    """Pages [start, end) leave the dirty set: clear dirty and hinted, set sent, in one pass."""
    w0 = start >> 6
    w1 = (end - 1) >> 6
    if w0 == w1:
        m = _mask(start - w0 * 64, end - w0 * 64)
        words[w0] &= ~m
        hinted[w0] &= ~m
        sent[w0] |= m
        return
    m = _mask(start - w0 * 64, 64)
    words[w0] &= ~m
    hinted[w0] &= ~m
    sent[w0] |= m
    words[w0 + 1 : w1] = _ZERO  # slices: vectorised stores (a loop from w0 + 1 is not); runs 0.30 -> 0.24 ms
    hinted[w0 + 1 : w1] = _ZERO
    sent[w0 + 1 : w1] = _ALL
    m = _mask(0, end - w1 * 64)
    words[w1] &= ~m
    hinted[w1] &= ~m
    sent[w1] |= m


@njit(cache=True, nogil=True)
def _take_runs(words: Any, sent: Any, hinted: Any, nbits: Any, cursor: Any, budget: Any, out: Any) -> Any:
    """Take dirty runs from ``cursor`` on (wrapping once), at most ``budget`` pages and ``len(out)`` runs.

    Taken pages are cleared, marked sent and no longer count as hinted. Returns (runs, taken, new cursor).
    """
    n = 0
    taken = 0
    max_runs = out.shape[0]
    for rnd in range(2):
        lo = cursor if rnd == 0 else 0
        hi = nbits if rnd == 0 else cursor
        p = _next_bit(words, lo, hi, _ZERO)
        while p < hi:
            if n == max_runs or taken == budget:
                return n, taken, p
            e = _next_bit(words, p, hi, _ALL)
            length = min(e - p, budget - taken)
            _take_bits(words, sent, hinted, p, p + length)
            out[n, 0] = p
            out[n, 1] = length
            n += 1
            taken += length
            cursor_after = p + length
            if cursor_after < e:
                return n, taken, cursor_after
            p = _next_bit(words, cursor_after, hi, _ZERO)
    return n, taken, 0


@njit(cache=True, nogil=True)
def _skip_zero_runs(words: Any, sent: Any, hinted: Any, known_zero: Any, runs: Any) -> Any:
    """Dirty pages of (first, count) runs that the destination holds as zeros leave the dirty set as if
    sent; returns how many did. Page by page: runs are few (file holes), and clarity wins here."""
    skipped = 0
    for i in range(runs.shape[0]):
        for p in range(runs[i, 0], runs[i, 0] + runs[i, 1]):
            w = p >> 6
            bit = np.uint64(1) << np.uint64(p & 63)
            if words[w] & known_zero[w] & bit:
                words[w] &= ~bit
                hinted[w] &= ~bit
                sent[w] |= bit
                skipped += 1
    return skipped


@njit(cache=True, nogil=True)
def _plan_send(known_zero: Any, start: Any, zero_flags: Any, out: Any) -> Any:
    """Decide per page SEND_DATA / SEND_ZERO / SKIP_ZERO and record what the destination will hold.
    ``zero_flags[i] == 1`` is a zero page; any other value (0 data, 2 a fill page) will hold data."""
    skipped = 0
    for i in range(zero_flags.shape[0]):
        p = start + i
        w = p >> 6
        bit = np.uint64(1) << np.uint64(p & 63)
        if zero_flags[i] == 1:
            if known_zero[w] & bit:
                out[i] = SKIP_ZERO
                skipped += 1
            else:
                out[i] = SEND_ZERO
                known_zero[w] |= bit
        else:
            out[i] = SEND_DATA
            known_zero[w] &= ~bit
    return skipped


# ------------------------------------------------------------------------------------------ public API


def pack_pages(flags: npt.NDArray[np.bool_], nwords: int) -> Words:
    """One flag per page (at most ``nwords * 64``) as words of this layout: a write log's shape."""
    pages = np.zeros(nwords * 64, dtype=bool)
    pages[: flags.shape[0]] = flags
    return np.packbits(pages, bitorder="little").view(np.uint64)


def _ram_mask(layout: RamLayout, nwords: int) -> Words:
    """One bit per RAM page (holes and the tail of the last word clear), built once per bitmap."""
    pages = np.zeros(nwords * 64, dtype=bool)
    for r in layout:
        pages[r.gpa >> PAGE_SHIFT : r.end >> PAGE_SHIFT] = True
    return pack_pages(pages, nwords)


def _partial_words(ram_mask: Words) -> tuple[npt.NDArray[np.int64], Words]:
    """Indexes and RAM masks of the words that are not all RAM (holes and range edges)."""
    idx = np.flatnonzero(ram_mask != _ALL).astype(np.int64)
    return idx, ram_mask[idx].copy()


def zero_page_flags(ram: npt.NDArray[Any], out: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.uint8]:
    """Classify whole 4 KiB pages of a mapped RAM buffer as zero (1) or not (0), at memory speed."""
    buf = np.asarray(ram)
    if buf.nbytes % PAGE_SIZE:
        raise BitmapError(f"RAM buffer of {buf.nbytes} bytes is not a whole number of pages")
    if buf.dtype != np.uint64:
        buf = buf.reshape(-1).view(np.uint64)
    npages = buf.nbytes // PAGE_SIZE
    if out is None:
        out = np.empty(npages, dtype=np.uint8)
    elif out.shape != (npages,) or out.dtype != np.uint8:
        raise BitmapError(f"zero-flag output must be uint8[{npages}], got {out.dtype}{list(out.shape)}")
    _zero_page_flags(buf, out)
    return out


class DirtyBitmap:
    """The set of guest pages that still have to be sent, with hint epochs and accounting."""

    def __init__(self, layout: RamLayout, *, destination_zeroed: bool = True) -> None:
        self.layout = layout
        self.nbits = layout.span_pages
        nwords = (self.nbits + 63) // 64
        self.dirty: Words = np.zeros(nwords, dtype=np.uint64)
        self.sent: Words = np.zeros(nwords, dtype=np.uint64)
        """Pages sent at least once in this migration."""
        self.hinted: Words = np.zeros(nwords, dtype=np.uint64)
        """Pages hinted free and not sent since: a write log bit that makes one dirty again counts in
        ``redirtied_after_hint`` (once, until the page is sent); one the destination never got and no log
        bit made dirty is marked dirty at the harvest all the same (``hinted_unwritten``)."""
        self.ram_mask: Words = _ram_mask(layout, nwords)
        self.known_zero_at_destination: Words = (
            self.ram_mask.copy() if destination_zeroed else np.zeros(nwords, dtype=np.uint64)
        )
        self._fix_words, self._fix_masks = _partial_words(self.ram_mask)
        self._sweep_edges: Words = np.zeros(nwords, dtype=np.uint64)
        """Scratch of ``_clear_ranges_sweep``, zero between calls (untouched, so unmapped, until a sweep)."""
        self._sweep_cover: Words = np.zeros(nwords // 64 + 2, dtype=np.uint64)
        self._ram_lo = np.array([r.gpa for r in layout], dtype=np.uint64)
        self._ram_hi = np.array([r.end for r in layout], dtype=np.uint64)
        self.stats = BitmapStats()
        self.epoch: int | None = None
        self._cursor = 0
        self._dirty_count = 0
        self._lock = threading.Lock()

    @property
    def nwords(self) -> int:
        return int(self.dirty.shape[0])

    # ---------------------------------------------------------------------------------------- epochs

    def open_epoch(self, cmd_id: int) -> None:
        """Start accepting hints of epoch ``cmd_id`` (the round's command id); call only after the write
        log was harvested."""
        if not isinstance(cmd_id, int) or not EPOCH_MIN <= cmd_id <= EPOCH_MAX:
            raise BitmapError(
                f"hint epoch (a command id) must be an int in [{EPOCH_MIN}, {EPOCH_MAX:#x}], got {cmd_id!r}"
            )
        with self._lock:
            if self.epoch is not None:
                raise BitmapError(f"hint epoch {self.epoch} is still open; close it before opening {cmd_id}")
            self.epoch = cmd_id

    def close_epoch(self) -> int | None:
        """Stop accepting hints (before every harvest). Returns the epoch closed, if any."""
        with self._lock:
            closed, self.epoch = self.epoch, None
            return closed

    # ----------------------------------------------------------------------------------------- hints

    def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]] | npt.NDArray[Any]) -> int:
        """Clear the pages of (GPA, length-in-bytes) ranges hinted free in ``epoch``.

        Returns the number of dirty bits really cleared. Hints of an epoch that is not open are
        dropped and counted; a batch with any range that is not whole RAM pages raises BitmapError
        and changes nothing.
        """
        try:
            arr = self._as_ranges(ranges)
        except BitmapError:
            with self._lock:
                self.stats.hints_rejected_invalid += len(ranges)
            raise
        with self._lock:
            bad, pages, wlo, whi = _validate_ranges(arr, self._ram_lo, self._ram_hi)
            if bad >= 0:
                self.stats.hints_rejected_invalid += arr.shape[0]
                i, reason = divmod(bad, 8)
                gpa, length = int(arr[i, 0]), int(arr[i, 1])
                raise BitmapError(
                    f"hint range {i} [{gpa:#x}, +{length:#x}) {_BAD_REASONS[reason]}; batch of "
                    f"{arr.shape[0]} rejected"
                )
            if self.epoch is None or epoch != self.epoch:
                self.stats.hints_dropped_stale += arr.shape[0]
                return 0
            if arr.shape[0] * SWEEP_RATIO >= whi - wlo:
                cleared = int(
                    _clear_ranges_sweep(
                        self.dirty, self.hinted, arr, self._sweep_edges, self._sweep_cover, wlo, whi
                    )
                )
            else:
                cleared = int(_clear_ranges(self.dirty, self.hinted, arr))
            self._dirty_count -= cleared
            self.stats.hinted_pages += int(pages)
            self.stats.hint_bits_cleared += cleared
            return cleared

    @staticmethod
    def _as_ranges(ranges: Sequence[tuple[int, int]] | npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
        if isinstance(ranges, np.ndarray):
            if ranges.ndim != 2 or ranges.shape[1] != 2:
                raise BitmapError(f"hint ranges must have shape (n, 2), got {ranges.shape}")
            if ranges.dtype == np.uint64:
                return np.ascontiguousarray(ranges)
            if ranges.dtype.kind == "i" and ranges.size and ranges.min() < 0:
                raise BitmapError("hint ranges contain a negative address or length")
            if ranges.dtype.kind not in "iu":
                raise BitmapError(f"hint ranges must be integers, got {ranges.dtype}")
            return ranges.astype(np.uint64)
        try:
            arr = np.array(list(ranges), dtype=np.uint64).reshape(-1, 2)
        except (OverflowError, ValueError, TypeError) as exc:
            raise BitmapError(
                f"hint ranges must be (gpa, length) pairs of 64-bit unsigned ints: {exc}"
            ) from None
        for gpa, length in ranges:
            if not isinstance(gpa, int | np.integer) or not isinstance(length, int | np.integer):
                raise BitmapError(f"hint range ({gpa!r}, {length!r}) is not a pair of ints")
        return arr

    # ------------------------------------------------------------------------------------ write log

    def merge_write_log(self, log: npt.NDArray[np.uint64]) -> int:
        """Mark every page written since the last harvest (a harvested log snapshot) dirty again; then
        every page hinted free that the destination never got and no logged write made dirty.

        A hint defers a page to the next harvest; it never takes it out of the migration. With
        ``init_on_alloc=1`` the driver's zeroing of each block it hints is a logged write, so the log
        re-marks every hinted page anyway (as a zero page: cheap, often not sent at all). A guest that does
        not zero what it allocates (``init_on_alloc=0``) reuses a hinted block without a store, and a device
        that fills it (virtio-blk reading into the page cache) writes through QEMU, which no write log sees:
        only reading the page, and the switchover check of every page read, can carry that content.

        Returns the number of pages the log made newly dirty (the guest's dirty rate; the hinted pages
        marked again are counted in ``stats.hinted_unwritten``). Refused while a hint epoch is open.
        """
        if not isinstance(log, np.ndarray) or log.dtype != np.uint64 or log.ndim != 1:
            raise BitmapError(f"write log must be a 1-d uint64 array, got {type(log).__name__}")
        if log.shape[0] != self.nwords:
            raise BitmapError(
                f"write log has {log.shape[0]} words, the bitmap {self.nwords} "
                f"({self.nbits} pages of guest-physical space)"
            )
        with self._lock:
            if self.epoch is not None:
                raise BitmapError(f"close hint epoch {self.epoch} before merging the write log")
            marked, newly, redirtied, unwritten = _merge_log(
                self.dirty, self.hinted, self.sent, self._fix_words, self._fix_masks, log
            )
            self.stats.log_pages_marked += int(marked)
            self.stats.redirtied_after_hint += int(redirtied)
            self.stats.hinted_unwritten += int(unwritten)
            self._dirty_count += int(newly) + int(unwritten)
            return int(newly)

    # --------------------------------------------------------------------------------------- sender

    def mark_all(self) -> int:
        """Every RAM page dirty (round 0). Returns the number of pages newly dirty."""
        with self._lock:
            newly = int(_mark_all(self.dirty, self.ram_mask))
            self._dirty_count += newly
            return newly

    def skip_zero_pages(self, runs: npt.NDArray[np.int64]) -> int:
        """Pages the source holds as zeros without them being read (RAM-file holes: never written) leave
        the dirty set where the destination is known to hold zeros, exactly as a sent-and-skipped zero
        page would. Call only with the write log armed: a write after the source was looked at is in
        the next harvest. Returns the number of pages skipped; bad runs raise BitmapError, change nothing.
        """
        arr = np.asarray(runs)
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype.kind not in "iu":
            raise BitmapError(f"page runs must be (first, count) integer pairs, got shape {arr.shape}")
        arr = arr.astype(np.int64)
        if arr.shape[0] and (
            int(arr[:, 0].min()) < 0
            or int(arr[:, 1].min()) < 1
            or int((arr[:, 0] + arr[:, 1]).max()) > self.nbits
        ):
            raise BitmapError(f"page runs must be non-empty and inside the bitmap of {self.nbits} pages")
        with self._lock:
            skipped = int(
                _skip_zero_runs(self.dirty, self.sent, self.hinted, self.known_zero_at_destination, arr)
            )
            self._dirty_count -= skipped
            self.stats.zero_pages_unread += skipped
            return skipped

    def count_hinted(self, among: npt.NDArray[np.bool_]) -> int:
        """Pages marked hinted (hinted free, not sent since), among those true in ``among`` (one entry per
        page): after a round that sent while a hint run streamed, its sent pages hinted later (waste)."""
        if among.shape != (self.nbits,):
            raise BitmapError(f"need one flag per page ({self.nbits}), got shape {among.shape}")
        with self._lock:
            bits = np.unpackbits(self.hinted.view(np.uint8), bitorder="little", count=self.nbits)
        return int(np.count_nonzero(bits.view(np.bool_) & among))

    def count_dirty(self) -> int:
        """Dirty pages now: a counter every operation keeps, so the sender can ask every run."""
        return self._dirty_count

    def recount_dirty(self) -> int:
        """Dirty pages by a popcount over the whole bitmap (checks the counter; ~0.1 ms per 64 GiB)."""
        with self._lock:
            return int(_count(self.dirty))

    def take_dirty_runs(self, budget_bytes: int, max_runs: int = 4096) -> npt.NDArray[np.int64]:
        """Next dirty runs, as (first page, page count) rows, up to ``budget_bytes``; they leave the bitmap.

        The scan resumes where the previous call stopped and wraps once, like QEMU's ``last_seen``.
        """
        if budget_bytes < PAGE_SIZE:
            raise BitmapError(f"send budget of {budget_bytes} bytes is less than one page")
        if max_runs < 1:
            raise BitmapError(f"max_runs must be at least 1, got {max_runs}")
        out = np.empty((max_runs, 2), dtype=np.int64)
        with self._lock:
            n, taken, self._cursor = _take_runs(
                self.dirty, self.sent, self.hinted, self.nbits, self._cursor, budget_bytes // PAGE_SIZE, out
            )
            self._dirty_count -= int(taken)
        return out[:n]

    def plan_send(self, first_page: int, zero_flags: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """Per page of a run: SEND_DATA, SEND_ZERO or SKIP_ZERO; records what the destination will hold.
        ``zero_flags``: copy_scan's page classes (1 = zero; 0 data and 2 fill both hold data)."""
        n = int(zero_flags.shape[0])
        if first_page < 0 or first_page + n > self.nbits:
            raise BitmapError(f"pages [{first_page}, +{n}) are outside the bitmap of {self.nbits} pages")
        out = np.empty(n, dtype=np.uint8)
        with self._lock:
            _plan_send(self.known_zero_at_destination, first_page, zero_flags, out)
        return out

    def sample_dirty(self, k: int, seed: int = 0) -> npt.NDArray[np.int64]:
        """Up to ``k`` dirty pages drawn uniformly (all of them if fewer), sorted; the bitmap is unchanged.
        Read-only: the convergence policy looks at what the next round will send, nothing more."""
        pages = np.flatnonzero(self.dirty_flags())
        if pages.size > k:
            pages = np.sort(np.random.default_rng(seed).choice(pages, k, replace=False))
        return pages.astype(np.int64)

    def dirty_flags(self) -> npt.NDArray[np.bool_]:
        """One flag per page, true where the page is dirty now (a copy: the bitmap is unchanged)."""
        with self._lock:
            bits = np.unpackbits(self.dirty.view(np.uint8), bitorder="little", count=self.nbits)
        return bits.view(np.bool_)

    def is_dirty(self, page: int) -> bool:
        return bool(self.dirty[page >> 6] >> np.uint64(page & 63) & np.uint64(1))

    def page_of(self, gpa: int) -> int:
        """Bitmap index of a RAM GPA (BitmapError if it is not RAM)."""
        try:
            self.layout.range_of(gpa)
        except LayoutError as exc:
            raise BitmapError(str(exc)) from None
        return gpa >> PAGE_SHIFT


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) every kernel, so the first real call is fast."""
    layout = RamLayout.flat(256 * 64 * PAGE_SIZE)
    bm = DirtyBitmap(layout)
    bm.mark_all()
    bm.recount_dirty()
    bm.open_epoch(EPOCH_MIN)
    bm.apply_hints(EPOCH_MIN, np.array([[0, PAGE_SIZE]], dtype=np.uint64))  # a sweep
    bm.apply_hints(EPOCH_MIN, np.array([[0, 1024 * PAGE_SIZE]], dtype=np.uint64))  # range by range
    bm.close_epoch()
    bm.merge_write_log(np.zeros(bm.nwords, dtype=np.uint64))
    runs = bm.take_dirty_runs(8 * PAGE_SIZE, max_runs=2)
    bm.skip_zero_pages(np.array([[0, 1]], dtype=np.int64))
    flags = zero_page_flags(np.zeros(2 * PAGE_SIZE, dtype=np.uint8))
    bm.plan_send(int(runs[0, 0]) if len(runs) else 0, flags)
