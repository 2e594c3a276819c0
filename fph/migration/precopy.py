"""Precopy rounds over the dirty bitmap: what fph sends, in which order, and when it stops iterating.

Each round (the epoch rule, ``fph/dirty_bitmap.py``): STOP the guest's hint run and close the epoch,
harvest the write log atomically into the bitmap, issue a new command id and open its epoch, then send
every dirty page. Round 0 starts with every RAM page dirty and, when a balloon is attached, waits for
the guest to finish its first hint run before sending, so the free memory it reports is never sent.

Pages are sent as data, as zero markers, or not at all when they are zero and the destination is
known to hold zeros. Every page the destination now holds is fingerprinted; at switchover, with the
guest stopped, ``verify_and_resend`` re-reads every page ever sent and resends those whose content no
longer matches what was sent (the TCG write log misses PTE Accessed/Dirty bits set by the page walker).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fph.dirty_bitmap import SEND_DATA, SEND_ZERO, SKIP_ZERO, DirtyBitmap
from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE
from fph.transfer.pagehash import changed_pages, copy_scan, page_hashes
from fph.transfer.ram_file import RamFile
from fph.transfer.sender import RamSender
from fph.transfer.wire import MAX_FRAME_PAGES

log = logging.getLogger(__name__)

ZERO_PAGE_HASH = int(page_hashes(np.zeros(PAGE_SIZE, dtype=np.uint8))[0])


class HintPolicy(enum.Enum):
    """When the guest gets its hinted blocks back (see ``PrecopyConfig.hint_policy``)."""

    RELEASE_EARLY = "release-early"
    EVERY_ROUND = "every-round"


class HintControl(Protocol):
    """The balloon device's control API as the sender needs it (``fph.hint_receiver.BalloonControl``)."""

    def request_hints(self, on_issue: Callable[[int], None] | None = None) -> int:
        """Start a hint run. ``on_issue(id)`` runs before the guest can see the id (on the device's
        loop, with the config change), so the bitmap opens the epoch before any hint of it can arrive."""
        ...

    def stop_hints(self) -> None: ...

    def done(self) -> None: ...

    def done_and_wait(self, timeout: float = 2.0) -> bool:
        """DONE, then wait (bounded) until the guest read it; False if it did not within ``timeout``."""
        ...

    def status(self) -> Any: ...

    def set_sink(self, sink: Any) -> None:
        """Where the device hands accepted hints (the migration's bitmap while it runs)."""
        ...


Harvest = Callable[[], npt.NDArray[np.uint64]]
"""An atomic fetch-and-clear of the write log(s), in DirtyBitmap word layout."""


@dataclass
class PrecopyConfig:
    max_rounds: int = 30
    downtime_limit_ms: float = 300.0
    """Switch over once the pages left would take at most this long at the measured rate."""
    min_rounds: int = 1
    bandwidth: int | None = None
    first_hint_wait_s: float = 15.0
    """Round 0 waits at most this long for the guest to finish its first hint run."""
    first_hint_idle_s: float = 1.0
    """... and stops waiting once the run has reported no new block for this long."""
    take_budget_bytes: int = 64 << 20
    hint_policy: HintPolicy = HintPolicy.RELEASE_EARLY
    """``release-early``: one hint run before round 0, then DONE at once, so the guest gets its memory
    back before anything is sent and the kernel's bookkeeping writes for those pages (struct page: ~1.6 %
    of the memory released) are sent once, in round 0. ``every-round``: a fresh hint run per round, the
    blocks held until the balloon is unplugged at switchover (QEMU's behaviour)."""
    release_settle_s: float = 0.1
    """After DONE, how long to let the guest free its blocks before the sync that precedes round 0."""

    def __post_init__(self) -> None:
        self.hint_policy = HintPolicy(self.hint_policy)  # a misspelt name fails here, loudly


@dataclass
class RoundStats:
    round: int
    dirty_at_start: int = 0
    pages_data: int = 0
    pages_zero_sent: int = 0
    pages_zero_skipped: int = 0
    bytes_on_wire: int = 0
    hint_cmd_id: int | None = None
    hint_wait_ms: float = 0.0
    ready_wait_ms: float = 0.0
    hinted_pages: int = 0
    hint_bits_cleared: int = 0
    redirtied_after_hint: int = 0
    harvest_ms: float = 0.0
    send_ms: float = 0.0
    ms: float = 0.0
    dirty_rate_pps: float = 0.0


@dataclass
class PrecopyResult:
    rounds: list[RoundStats] = field(default_factory=list)
    final: RoundStats | None = None
    pages_unread_holes: int = 0
    verify_pages_checked: int = 0
    verify_pages_resent: int = 0
    verify_ms: float = 0.0
    converged: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Precopy:
    """Runs the rounds for one source VM; the caller owns QEMU (stop, device_del, migrate, cont)."""

    def __init__(
        self,
        bitmap: DirtyBitmap,
        ram: RamFile,
        channel: RamSender,
        harvest: Harvest,
        hints: HintControl | None = None,
        config: PrecopyConfig | None = None,
        destination_ready: Callable[[], object] | None = None,
    ) -> None:
        self.bitmap = bitmap
        self.destination_ready = destination_ready
        """Blocks until the destination can take pages at full speed (its RAM file prepared)."""
        self.ram = ram
        self.channel = channel
        self.harvest = harvest
        self.hints = hints
        self.config = config or PrecopyConfig()
        self.sent_hash = np.zeros(bitmap.nbits, dtype=np.uint64)
        self.on_wire = np.zeros(bitmap.nbits, dtype=np.uint8)
        """1 for pages whose content went on the wire (data or a zero marker): what the check re-reads."""
        self.result = PrecopyResult()
        self.round = 0
        self._rate_bps = 0.0
        self._dirty_rate = 0.0
        self._last_harvest = time.monotonic()
        self._hashbuf = np.empty(MAX_FRAME_PAGES, dtype=np.uint64)
        self._zero = np.empty(MAX_FRAME_PAGES, dtype=np.uint8)
        self._bounce = np.empty(MAX_FRAME_PAGES * PAGE_SIZE, dtype=np.uint8)

    # ------------------------------------------------------------------------------------- rounds

    def start(self) -> None:
        """Arm: discard what the log holds (every page is about to be dirty anyway), mark all dirty.

        Then pages in holes of the source RAM file (never written: zero) that the destination holds as
        zeros leave the dirty set unread, after the harvest so any later write is in the next log; the
        rest of the mapping is populated meanwhile, hidden behind round 0's wait for the guest's hints.
        Reading a hole would allocate it: a sparse guest would grow to its full size on the source."""
        self.harvest()
        self._last_harvest = time.monotonic()
        self.bitmap.mark_all()
        extents = self.ram.data_extents()
        holes = self.ram.hole_runs(extents)
        self.result.pages_unread_holes = self.bitmap.skip_zero_pages(holes)
        self.ram.populate_in_background(extents)

    def sync(self, *, new_epoch: bool) -> tuple[int, float]:
        """Close the hint epoch, harvest the write log, and (if asked) issue a fresh id. The order is
        the safety argument: harvest before issue, so every write after the id is in the next log."""
        if self.hints is not None and self.bitmap.epoch is not None:  # a run of that epoch may be on
            self.hints.stop_hints()
        self.bitmap.close_epoch()
        t0 = time.monotonic()
        newly = self.bitmap.merge_write_log(self.harvest())
        harvest_ms = (time.monotonic() - t0) * 1e3
        elapsed = t0 - self._last_harvest
        self._last_harvest = t0
        self._dirty_rate = newly / elapsed if elapsed > 0 else 0.0
        if new_epoch and self.hints is not None:
            self.hints.request_hints(on_issue=self.bitmap.open_epoch)
        return newly, harvest_ms

    def run_round(self) -> RoundStats:
        cfg = self.config
        rs = RoundStats(round=self.round)
        t0 = time.monotonic()
        before = self.bitmap.stats.as_dict()
        if self.round == 0:
            if self.hints is not None:
                self.hints.request_hints(on_issue=self.bitmap.open_epoch)
                rs.hint_wait_ms = self._wait_first_hint_run(cfg.first_hint_wait_s) * 1e3
                # The first run is over: sync once more before sending, so the pages the guest wrote
                # while hinting (with init_on_alloc=1 the driver zeroes every block it hints) are
                # merged now and sent once, instead of being sent and then sent again in round 1.
                early = cfg.hint_policy is HintPolicy.RELEASE_EARLY
                _newly, rs.harvest_ms = self.sync(new_epoch=not early)
                if early:
                    self._release_hints(cfg.release_settle_s)
                    _newly, ms2 = self.sync(new_epoch=False)
                    rs.harvest_ms += ms2
                rs.hint_cmd_id = self.bitmap.epoch
        else:
            _newly, rs.harvest_ms = self.sync(new_epoch=cfg.hint_policy is HintPolicy.EVERY_ROUND)
            rs.dirty_rate_pps = self._dirty_rate
            rs.hint_cmd_id = self.bitmap.epoch
        rs.dirty_at_start = self.bitmap.count_dirty()
        if self.round == 0:  # both overlap the hint wait; without hints they are round 0's first cost
            t_ready = time.monotonic()
            self.ram.wait_populated()
            if self.destination_ready is not None:
                self.destination_ready()
            rs.ready_wait_ms = (time.monotonic() - t_ready) * 1e3
        ts = time.monotonic()
        self._send_dirty(rs)
        rs.send_ms = (time.monotonic() - ts) * 1e3
        after = self.bitmap.stats.as_dict()
        rs.hinted_pages = after["hinted_pages"] - before["hinted_pages"]
        rs.hint_bits_cleared = after["hint_bits_cleared"] - before["hint_bits_cleared"]
        rs.redirtied_after_hint = after["redirtied_after_hint"] - before["redirtied_after_hint"]
        self.channel.end_round(self.round, {"pages": rs.pages_data, "zero": rs.pages_zero_sent})
        rs.ms = (time.monotonic() - t0) * 1e3
        if rs.send_ms > 0 and rs.bytes_on_wire > (4 << 20):
            self._rate_bps = rs.bytes_on_wire / (rs.send_ms / 1e3)
        self.result.rounds.append(rs)
        log.info("round %d: %s", self.round, rs)
        self.round += 1
        return rs

    def _release_hints(self, settle_s: float) -> None:
        """DONE: the guest takes its hinted blocks back. Safe at any time: the epoch is closed and every
        later write to those pages is in the write log."""
        assert self.hints is not None
        self.hints.done_and_wait(2.0)
        time.sleep(settle_s)

    def _wait_first_hint_run(self, limit_s: float) -> float:
        """Wait until the guest ends its hint run with its STOP (the device leaves REQUESTED/START for
        STOP on its own): free memory hinted before it is sent is never sent. Gives up after ``limit_s``,
        or once a started run has reported no new block for ``first_hint_idle_s`` (a slow guest)."""
        assert self.hints is not None
        t0 = last_progress = time.monotonic()
        blocks = -1
        while time.monotonic() - t0 < limit_s:
            st = self.hints.status()
            state = getattr(st.state, "value", st.state)
            if state == "stop" or getattr(st, "broken", None):
                break
            now = time.monotonic()
            got = int(getattr(st, "blocks", 0))
            if got != blocks:
                blocks, last_progress = got, now
            elif blocks > 0 and now - last_progress > self.config.first_hint_idle_s:
                break
            time.sleep(0.005)
        return time.monotonic() - t0

    def should_switch_over(self) -> bool:
        """After a round: switch when what a harvest now would leave fits the downtime limit."""
        cfg = self.config
        if self.round >= cfg.max_rounds:
            return True
        if self.round < cfg.min_rounds:
            return False
        # Pages dirtied since the last harvest, extrapolated over the time the next round would take.
        pending_pages = self._dirty_rate * max(1e-3, time.monotonic() - self._last_harvest)
        rate = cfg.bandwidth or self._rate_bps or 1e9
        expected_ms = pending_pages * PAGE_SIZE / rate * 1e3
        self.result.converged = expected_ms <= cfg.downtime_limit_ms
        return self.result.converged

    def iterate(self, should_abort: Callable[[], bool] = lambda: False) -> None:
        """Rounds until the downtime estimate fits (or the round limit); the guest keeps running."""
        while True:
            self.run_round()
            if should_abort():
                raise InterruptedError("precopy cancelled")
            if self.should_switch_over():
                return

    # ---------------------------------------------------------------------------------- switchover

    def final_round(self) -> RoundStats:
        """With the guest stopped: close the epoch (no new id), harvest, send the rest."""
        rs = RoundStats(round=self.round)
        t0 = time.monotonic()
        _newly, rs.harvest_ms = self.sync(new_epoch=False)
        rs.dirty_at_start = self.bitmap.count_dirty()
        ts = time.monotonic()
        self._send_dirty(rs)
        rs.send_ms = (time.monotonic() - ts) * 1e3
        self.channel.end_round(self.round, {"pages": rs.pages_data, "final": True})
        rs.ms = (time.monotonic() - t0) * 1e3
        self.result.final = rs
        self.round += 1
        return rs

    def verify_and_resend(self) -> int:
        """Re-read every page sent so far and resend those that changed since (the guest is stopped).

        Pages skipped as zero were not sent: one that is no longer zero had a logged store (a PTE is
        written before the walker can set its A/D bits), so the final harvest already resent it.
        """
        t0 = time.monotonic()
        sent = self.on_wire
        checked = resent = 0
        for r in self.bitmap.layout:
            first = r.gpa >> PAGE_SHIFT
            n = r.size >> PAGE_SHIFT
            step = 1 << 15  # 128 MiB of pages per pass
            for off in range(0, n, step):
                k = min(step, n - off)
                p0 = first + off
                selected = sent[p0 : p0 + k]
                changed = changed_pages(self.ram.pages(p0, k), selected, self.sent_hash[p0 : p0 + k])
                checked += int(np.count_nonzero(selected))
                for run_start, run_len in _runs(changed):
                    self._send_data(self.round, p0 + run_start, run_len)
                    resent += run_len
        self.result.verify_pages_checked = checked
        self.result.verify_pages_resent = resent
        self.result.verify_ms = (time.monotonic() - t0) * 1e3
        return resent

    # --------------------------------------------------------------------------------------- sending

    def _send_dirty(self, rs: RoundStats) -> None:
        start_bytes = self.channel.counters.bytes_on_wire
        while True:
            runs = self.bitmap.take_dirty_runs(self.config.take_budget_bytes)
            if runs.size == 0:
                break
            for first, n in runs.tolist():
                for off in range(0, n, MAX_FRAME_PAGES):
                    self._send_chunk(rs, first + off, min(MAX_FRAME_PAGES, n - off))
        rs.bytes_on_wire = self.channel.counters.bytes_on_wire - start_bytes

    def _send_chunk(self, rs: RoundStats, first: int, n: int) -> None:
        """Copy the pages into the bounce buffer while classifying and fingerprinting them, then send."""
        bounce = self._bounce[: n * PAGE_SIZE]
        zero, hashes = self._zero[:n], self._hashbuf[:n]
        copy_scan(self.ram.pages(first, n), bounce, zero, hashes)
        plan = self.bitmap.plan_send(first, zero)
        for kind, start, length in _segments(plan):
            p = first + start
            if kind == SEND_DATA:
                payload = bounce[start * PAGE_SIZE : (start + length) * PAGE_SIZE]
                self.channel.send_pages(rs.round, p, payload, hashes[start : start + length])
                self.sent_hash[p : p + length] = hashes[start : start + length]
                self.on_wire[p : p + length] = 1
                rs.pages_data += length
            elif kind == SEND_ZERO:
                self.channel.send_zeros(rs.round, p, length)
                self.sent_hash[p : p + length] = ZERO_PAGE_HASH
                self.on_wire[p : p + length] = 1
                rs.pages_zero_sent += length
            elif kind == SKIP_ZERO:
                self.sent_hash[p : p + length] = ZERO_PAGE_HASH
                rs.pages_zero_skipped += length

    def _send_data(self, round_: int, first: int, n: int) -> None:
        """Send pages as data whatever they hold (the switchover check's resends)."""
        for off in range(0, n, MAX_FRAME_PAGES):
            k = min(MAX_FRAME_PAGES, n - off)
            p = first + off
            bounce, hashes = self._bounce[: k * PAGE_SIZE], self._hashbuf[:k]
            copy_scan(self.ram.pages(p, k), bounce, self._zero[:k], hashes)
            self.channel.send_pages(round_, p, bounce, hashes)
            self.bitmap.plan_send(p, np.zeros(k, dtype=np.uint8))  # the destination now holds data there
            self.sent_hash[p : p + k] = hashes
            self.on_wire[p : p + k] = 1


def _segments(plan: npt.NDArray[np.uint8]) -> list[tuple[int, int, int]]:
    """(kind, start, length) for each run of equal verdicts."""
    if plan.size == 0:
        return []
    if plan.min() == plan.max():  # the common case: a whole chunk of data, or of zeros
        return [(int(plan[0]), 0, int(plan.size))]
    edges = np.flatnonzero(np.diff(plan)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [plan.size]))
    return [(int(plan[s]), int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def _runs(indexes: npt.NDArray[np.intp]) -> list[tuple[int, int]]:
    """Consecutive index runs as (start, length)."""
    if indexes.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indexes) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [indexes.size]))
    return [(int(indexes[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]
