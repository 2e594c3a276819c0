"""Precopy rounds over the dirty bitmap: what fph sends, in which order, and when it stops iterating.

Each round sends every dirty page, then ends with a sync (the epoch rule, ``fph/dirty_bitmap.py``): STOP
the guest's hint run and close the epoch, harvest the write log atomically into the bitmap (what the guest
wrote while the round ran: the dirty rate) and, with the every-round policy, issue a new command id and open
its epoch. After the sync :meth:`Precopy.decide` asks the convergence policy (``convergence.py``) whether a
switchover now would fit the downtime limit. Round 0 starts with every RAM page dirty and, when the guest's
balloon can hint, requests the guest's first hint run and sends while it streams (or, with
``first_hint_run=wait``, waits for the run to end first; ``auto`` waits only while the run outpaces the
bandwidth cap); free memory hinted before round 0 reaches it is never sent. Sending never clears a log
bit, so sends may interleave with hints and harvests in any order (docs/protocol-model.md). A guest that
cannot hint (no driver, FREE_PAGE_HINT not negotiated, no answer to the request within
``hint_start_timeout_s``) is migrated without hints and the result says why.

Pages are sent as data, as zero markers, as fill markers (a page repeating one 8-byte value, e.g. a
poisoned free page), or not at all when they are zero and the destination is known to hold zeros. Every
page the destination now holds is fingerprinted; at switchover, with the guest stopped,
``verify_and_resend`` re-reads every page ever sent and resends those whose content no longer matches what
was sent (the TCG write log misses PTE Accessed/Dirty bits set by the page walker, and device DMA). It also
re-reads every page the destination holds as zeros without fph having sent it (read as zero and skipped,
or a hole of the RAM file that holds data now): QEMU's device DMA writes guest pages with no store the log
sees, and a network buffer the guest zeroed and posted before fph read it is filled later (measured: 5-13
pages of received packets lost in 5 of 7 migrations without this, ``bench/results/dma-gap-virtio-net.txt``).
The final round can start that check on a thread of its own as soon as its harvest is done: it reads only
pages the final round does not send, so both run at once over memory that no longer changes.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fph.dirty_bitmap import SEND_DATA, SEND_ZERO, SKIP_ZERO, DirtyBitmap, pack_pages
from fph.kernels import PAGE_FILL, PAGE_ZERO, ZERO_PAGE_FINGERPRINT
from fph.migration.convergence import (
    Convergence,
    ConvergenceConfig,
    Decision,
    FixedCosts,
    RoundMeasure,
    Verdict,
)
from fph.migration.first_hint_run import FirstHintRun
from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE
from fph.transfer.pagehash import changed_pages, copy_scan
from fph.transfer.ram_file import RamFile
from fph.transfer.sender import RamSender
from fph.transfer.wire import MAX_FRAME_PAGES

log = logging.getLogger(__name__)

ZERO_PAGE_HASH = int(ZERO_PAGE_FINGERPRINT)
CHECK_SAMPLE_RUNS = 16
CHECK_SAMPLE_RUN_PAGES = 256
"""The switchover check's rate is timed on 16 runs of 1 MiB (``Precopy._sampled_check_rate``)."""
CHECK_THREADS_TIME = 0.8
"""The check on 2 threads took 0.80-0.81x the serial time (``PrecopyConfig.check_threads_min_pages``)."""
ZERO_READ, ZERO_HOLE = 1, 2
"""Why the destination holds a page as zeros that fph did not send (``Precopy.zero_held``)."""


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
class PrecopyConfig(ConvergenceConfig):
    """The rounds' settings (the convergence policy's are inherited: downtime limit, out-dirty policy, time
    budget, rounds, throttle steps)."""

    bandwidth: int | None = None
    """Bytes/s on the data connection (None: unlimited); also the wire rate the policy never exceeds."""
    first_hint_wait_s: float = 15.0
    """Round 0 waits at most this long for the guest to finish its first hint run."""
    first_hint_idle_s: float = 1.0
    """... and stops waiting once the run has reported no new block for this long."""
    first_hint_run: FirstHintRun = FirstHintRun.AUTO
    """``overlap``: round 0 starts sending as soon as the run is requested, and the sync that ends round 0
    STOPs it (QEMU's order): a block hinted before round 0 reaches it is not sent, one hinted after is
    reported as waste. ``wait``: round 0 first waits for the guest to end its run (bounded by
    ``first_hint_wait_s``): fewer bytes when the guest hints fast, a longer round 0 when it does not
    (under TCG with ``init_on_alloc=1`` the driver zeroes every block it hints: ~0.85 GB/s with the
    write-log plugin armed, a 1 GiB guest's run 1.0 s; bench/results/hint_bench-writelog-ab.json).
    ``auto``: with a bandwidth cap, round 0 waits while the run reports free memory faster than the cap
    could send it (every second of that wait saves more than a second of sending), then overlaps the
    rest; without a cap (the link is not the bottleneck), overlap. Measured at 1 GiB across the lab link
    (bench/results/twohost_bench-s20-overlap.json): overlap took 1.38-1.73x native's time and sent
    1.06-1.38x its bytes, auto 1.89-2.20x and 0.96-0.97x."""
    hint_start_timeout_s: float = 2.0
    """A guest that has not started the requested hint run by then is migrated without hints."""
    take_budget_bytes: int = 64 << 20
    hint_policy: HintPolicy = HintPolicy.RELEASE_EARLY
    """``release-early``: one hint run before round 0, then DONE at once, so the guest gets its memory
    back before anything is sent and the kernel's bookkeeping writes for those pages (struct page: ~1.6 %
    of the memory released) are sent once, in round 0. ``every-round``: a fresh hint run per round, the
    blocks held until they are given back, with DONE, a round before switchover (QEMU keeps them until the
    balloon goes)."""
    hint_poisoned_guests: bool = False
    """A guest that poisons its free pages (``page_poison=1``: the driver reports a non-zero poison value)
    is migrated without hints by default: every free page is one repeated 8-byte value, a FILL marker on
    the wire, while a hint run makes the guest poison every block again when it gets it back (measured:
    2.5x native's total time on a 1 GiB guest, for the same bytes)."""
    hint_reporting_guests: bool = False
    """A guest that reports its free memory (free page reporting, ``RegisterVm`` ``free_page_reporting``)
    is migrated without a hint run by default: its freed memory is already holes in the RAM file, which
    round 0 skips unread, while a hint run would take those blocks back (the driver zeroes each one). Unless
    reporting is behind (the guest reports every 2 s): fph waits up to ``reporting_wait_s`` for the guest's
    free memory (its stats) to be holes, and hints as usual if it is still not."""
    reporting_wait_s: float = 5.0
    """Two and a half reporting passes: with 3 s a 1 GiB guest 207-213 MiB behind, reporting 256 MiB per
    pass, gave up after one pass (none left in the wait) in 2 of 3 runs and hinted: 5.9-6.5 s and 90-97 ms of
    downtime, against 3.1 s and 40 ms in the run that caught up (``bench/results/twohost_bench-stop-to-
    resume.txt``). A guest that cannot catch up is still given up on after its first whole pass."""
    release_settle_s: float = 0.1
    """After DONE, how long to let the guest free its blocks before the sync that precedes round 0."""
    check_zero_held: bool = True
    """The switchover check also re-reads pages the destination holds as zeros that fph did not send
    (device DMA may have filled them since). Off only where no device writes guest memory."""
    check_threads: int = 2
    check_threads_min_pages: int = 1 << 16
    """The switchover check, when it runs alone, reads on ``check_threads`` threads from this many pages
    (256 MiB) up. Measured on this 2-core host (``bench/switchover_bench.py --zero-allocated``, 1 GiB of
    pages checked, 6 runs each): 2 threads took 0.80-0.81x the serial time (45 vs 55-57 ms); pages the
    destination holds as zeros are checked with the zero test (``fph.kernels.changed_pages``), serial
    55-57 ms against 61 ms with their fingerprints. Beside the final round the check keeps one thread:
    the round sends on the other core."""
    check_beside_min_pages: int = 128
    """The switchover check runs beside the final round (``final_round(check_beside=True)``) only when that
    round has at least this many pages to send: measured on this 2-core host (``bench/switchover_bench.py``,
    1 GiB, 12% of pages sent, TLS at 125 MB/s), side by side took 0.73-0.77x the serial time with 210 pages,
    0.92x with 100 and 1.13x with 40 (the threads compete for the cores and there is little to overlap)."""

    live_check_min_pages: int = 256
    """Before switchover, with the guest still running, the switchover check's reads run once
    (``Precopy.live_check``); when they find this many pages (1 MiB) changed with no log bit (device DMA),
    those go in one more live round instead of the stop window (0: never run it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.hint_policy = HintPolicy(self.hint_policy)  # a misspelt name fails here, loudly
        self.first_hint_run = FirstHintRun(self.first_hint_run)


@dataclass
class RoundStats:
    round: int
    dirty_at_start: int = 0
    pages_data: int = 0
    pages_zero_sent: int = 0
    pages_zero_skipped: int = 0
    pages_hole_unread: int = 0
    """Of the zero pages sent or skipped, those in chunks that were holes of the RAM file: never read."""
    bytes_on_wire: int = 0
    hint_cmd_id: int | None = None
    hint_wait_ms: float = 0.0
    ready_wait_ms: float = 0.0
    pages_fill: int = 0
    dirtied_pages: int = 0
    """What the sync that ended the round found the guest had written meanwhile."""
    hinted_pages: int = 0
    hint_bits_cleared: int = 0
    redirtied_after_hint: int = 0
    hinted_unwritten: int = 0
    """Pages hinted free that no logged write made dirty by the sync, dirty again all the same: a device
    may have filled them without a store (``DirtyBitmap.merge_write_log``)."""
    hint_waste_pages: int = 0
    """Pages this round put on the wire and the guest then hinted free in the same run (overlap)."""
    harvest_ms: float = 0.0
    send_ms: float = 0.0
    ms: float = 0.0
    dirty_rate_pps: float = 0.0


@dataclass
class PrecopyResult:
    rounds: list[RoundStats] = field(default_factory=list)
    final: RoundStats | None = None
    pages_unread_holes: int = 0
    holes_filled: int = 0
    """Pages left unread as holes of the RAM file that held data at a later harvest, with or without a log
    bit (a device fills them with none): marked dirty there, so a live round reads them, not the check."""
    live_check_pages_changed: int = 0
    """Pages the check run live before switchover found changed since sent with no log bit: marked dirty."""
    live_check_ms: float = 0.0
    verify_pages_checked: int = 0
    verify_pages_resent: int = 0
    verify_pages_zeroed: int = 0
    """Pages sent with content that the guest then reported free (holes now): zero markers at switchover."""
    verify_ms: float = 0.0
    """The switchover check in the stop window: after the final round, or all of it when it ran alone."""
    verify_beside_final_ms: float = 0.0
    """How long the check's reading took on its own thread while the final round sent (0: not run so)."""
    converged: bool = False
    hinting: str = "unavailable: no balloon"
    """``used``, or ``unavailable: <reason>`` (the migration went on without hints)."""
    decisions: list[Decision] = field(default_factory=list)

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
        *,
        hints_unavailable: str | None = None,
        hints_skipped: str | None = None,
        costs: FixedCosts | None = None,
    ) -> None:
        """``hints``: the balloon, or None; ``hints_unavailable``: why the caller knows it cannot hint,
        ``hints_skipped``: why hinting would not pay (then ``hints`` is not used either)."""
        self.bitmap = bitmap
        self.destination_ready = destination_ready
        """Blocks until the destination can take pages at full speed (its RAM file prepared)."""
        self.ram = ram
        self.channel = channel
        self.harvest = harvest
        self.config = config or PrecopyConfig()
        self.hints = hints if hints_unavailable is None and hints_skipped is None else None
        self.result = PrecopyResult()
        if hints is None and hints_unavailable is None:
            hints_unavailable = "no balloon device"
        self.result.hinting = "used" if self.hints is not None else f"unavailable: {hints_unavailable}"
        if hints_skipped is not None and hints_unavailable is None:
            self.result.hinting = f"skipped: {hints_skipped}"
        self.convergence = Convergence(self.config, costs or FixedCosts(), bandwidth=self.config.bandwidth)
        self.sent_hash = np.zeros(bitmap.nbits, dtype=np.uint64)
        self.on_wire = np.zeros(bitmap.nbits, dtype=np.uint8)
        """1 for pages whose content went on the wire (data or a marker): what the check re-reads."""
        self.zero_held = np.zeros(bitmap.nbits, dtype=np.uint8)
        """Pages the destination holds as zeros that fph did not send: ``ZERO_READ`` (read as zero and
        skipped) or ``ZERO_HOLE`` (a hole of the source RAM file, never read). The check re-reads them."""
        self.round = 0
        self._last_harvest = time.monotonic()
        self._last_dirtied = 0
        self._last_interval = 0.0
        self._first_request_t = 0.0
        self._hashbuf = np.empty(MAX_FRAME_PAGES, dtype=np.uint64)
        self._class = np.empty(MAX_FRAME_PAGES, dtype=np.uint8)
        self._fill = np.empty(MAX_FRAME_PAGES, dtype=np.uint64)
        self._bounce = np.empty(MAX_FRAME_PAGES * PAGE_SIZE, dtype=np.uint8)
        self._check: (
            tuple[futures.Future[tuple[list[npt.NDArray[np.int64]], int, float]], npt.NDArray[np.bool_]]
            | None
        ) = None
        """The switchover check started beside the final round (its changed pages, pages checked and ms),
        and the pages sent with content that were holes when it started (zero markers)."""

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
        for first, n in holes.tolist():
            self.zero_held[first : first + n] = ZERO_HOLE
            self.sent_hash[first : first + n] = ZERO_PAGE_HASH
        self.ram.populate_in_background(extents)

    def sync(
        self,
        *,
        new_epoch: bool,
        waste: tuple[RoundStats, npt.NDArray[np.uint8] | None] | None = None,
        filled_holes: bool = True,
    ) -> tuple[int, float]:
        """Close the hint epoch, harvest the write log, and (if asked) issue a fresh id. The order is
        the safety argument: harvest before issue, so every write after the id is in the next log.

        ``waste``: the round and what was on the wire when it started (None: no epoch was open); the pages
        it sent that the closed epoch then hinted are counted in the round's ``hint_waste_pages``.
        ``filled_holes``: pages left unread as holes that hold data now join the harvest (off for the final
        sync: the switchover check reads those anyway)."""
        if self.hints is not None and self.bitmap.epoch is not None:  # a run of that epoch may be on
            self.hints.stop_hints()
        self.bitmap.close_epoch()
        if waste is not None and waste[1] is not None:
            sent_now = self.on_wire > waste[1]  # put on the wire by this round
            waste[0].hint_waste_pages = self.bitmap.count_hinted(sent_now)
        t0 = time.monotonic()
        log = self.harvest()
        if filled_holes:
            log = self._add_filled_holes(log)
        newly = self.bitmap.merge_write_log(log)
        harvest_ms = (time.monotonic() - t0) * 1e3
        self._last_interval = t0 - self._last_harvest
        self._last_harvest = t0
        self._last_dirtied = newly
        if new_epoch and self.hints is not None:
            self.hints.request_hints(on_issue=self.bitmap.open_epoch)
        return newly, harvest_ms

    def run_round(self) -> RoundStats:
        """Send what is dirty (round 0: after the guest's first hint run), then sync: the next round's
        pages, and the dirty rate the policy decides on, are in the bitmap when this returns."""
        cfg = self.config
        rs = RoundStats(round=self.round)
        t0 = time.monotonic()
        before = self.bitmap.stats.as_dict()
        first = cfg.first_hint_run
        if self.round == 0 and first is FirstHintRun.WAIT:
            rs.harvest_ms += self._round0_hints(rs)
        overlap = self.round == 0 and first is not FirstHintRun.WAIT
        if overlap:
            self._request_first_run()
            if first is FirstHintRun.AUTO and cfg.bandwidth and self.hints is not None:
                waited = self._wait_first_hint_run(cfg.first_hint_wait_s, faster_than_bps=cfg.bandwidth)
                rs.hint_wait_ms = waited * 1e3
        rs.dirty_at_start = self.bitmap.count_dirty()
        if self.round == 0:
            t_ready = time.monotonic()
            if not overlap:  # it ran behind the hint wait; overlapping, reads fault pages in as they go
                self.ram.wait_populated()
            if self.destination_ready is not None:
                self.destination_ready()
            rs.ready_wait_ms = (time.monotonic() - t_ready) * 1e3
        wire_before = self.on_wire.copy() if self.bitmap.epoch is not None else None
        ts = time.monotonic()
        self._send_dirty(rs)
        rs.send_ms = (time.monotonic() - ts) * 1e3
        self.channel.end_round(self.round, {"pages": rs.pages_data, "zero": rs.pages_zero_sent})
        if overlap:
            self._confirm_first_run_started()
        every_round = self.hints is not None and cfg.hint_policy is HintPolicy.EVERY_ROUND
        rs.dirtied_pages, ms = self.sync(new_epoch=every_round, waste=(rs, wire_before))
        rs.harvest_ms += ms
        if overlap and self.hints is not None and cfg.hint_policy is HintPolicy.RELEASE_EARLY:
            self.hints.done_and_wait(2.0)  # the run was STOPped by the sync: the guest takes its blocks back
        rs.dirty_rate_pps = rs.dirtied_pages / self._last_interval if self._last_interval > 0 else 0.0
        rs.hint_cmd_id = self.bitmap.epoch
        after = self.bitmap.stats.as_dict()
        rs.hinted_pages = after["hinted_pages"] - before["hinted_pages"]
        rs.hint_bits_cleared = after["hint_bits_cleared"] - before["hint_bits_cleared"]
        rs.redirtied_after_hint = after["redirtied_after_hint"] - before["redirtied_after_hint"]
        rs.hinted_unwritten = after["hinted_unwritten"] - before["hinted_unwritten"]
        self._note_unwritten_hints(rs)
        rs.ms = (time.monotonic() - t0) * 1e3
        self.result.rounds.append(rs)
        log.info("round %d: %s", self.round, rs)
        self.round += 1
        return rs

    def _note_unwritten_hints(self, rs: RoundStats) -> None:
        """Say so in the report when most of a run's hinted pages had to be read all the same: the guest
        does not zero what it allocates, so hints save it nothing and free page reporting would."""
        if self.result.hinting != "used" or rs.hinted_unwritten * 2 <= rs.hinted_pages:
            return
        self.result.hinting = (
            f"used: {rs.hinted_unwritten} of {rs.hinted_pages} hinted pages were not written by the guest "
            "(it does not zero what it allocates: init_on_alloc=0?) and were read all the same, as a device "
            "may fill a reused page unseen; free page reporting would keep them off the wire"
        )

    def _round0_hints(self, rs: RoundStats) -> float:
        """The first hint run, bounded; then the sync that merges what the guest wrote while it hinted
        (with init_on_alloc=1 the driver zeroes every block it hints) and, with release-early, DONE and a
        second sync. Returns the harvest time. A guest that does not answer is migrated without hints."""
        cfg = self.config
        if self.hints is None:
            return 0.0
        try:
            self.hints.request_hints(on_issue=self.bitmap.open_epoch)
        except Exception as exc:  # the device refused (no driver, not negotiated, broken): go on without
            self._hints_unavailable(f"the hint request was refused: {exc}")
            return 0.0
        waited = self._wait_first_hint_run(cfg.first_hint_wait_s)
        rs.hint_wait_ms = waited * 1e3
        if self.hints is None:  # the guest never started the run
            _newly, ms = self.sync(new_epoch=False)
            return ms
        early = cfg.hint_policy is HintPolicy.RELEASE_EARLY
        _newly, ms = self.sync(new_epoch=not early)
        if early:
            self._release_hints(cfg.release_settle_s)
            _newly, ms2 = self.sync(new_epoch=False)
            ms += ms2
        return ms

    def _request_first_run(self) -> None:
        """Overlap: ask for the first hint run and send at once; a refusal means no hints."""
        if self.hints is None:
            return
        self._first_request_t = time.monotonic()
        try:
            self.hints.request_hints(on_issue=self.bitmap.open_epoch)
        except Exception as exc:  # the device refused (no driver, not negotiated, broken): go on without
            self._hints_unavailable(f"the hint request was refused: {exc}")

    def _confirm_first_run_started(self) -> None:
        """Overlap, end of round 0: a guest that has not started the requested run gets what is left of
        ``hint_start_timeout_s``; then it counts as not answering and the migration goes on without hints."""
        if self.hints is None:
            return
        limit = self.config.hint_start_timeout_s
        while True:
            st = self.hints.status()
            state = getattr(st.state, "value", st.state)
            if state != "requested" or getattr(st, "broken", None):
                return
            if time.monotonic() - self._first_request_t > limit:
                self._hints_unavailable(f"the guest did not start the requested hint run within {limit:g} s")
                return
            time.sleep(0.005)

    def _hints_unavailable(self, reason: str) -> None:
        log.warning("hinting unavailable, migrating without hints: %s", reason)
        self.result.hinting = f"unavailable: {reason}"
        hints, self.hints = self.hints, None
        if hints is not None:
            with contextlib.suppress(Exception):
                hints.stop_hints()
        self.bitmap.close_epoch()

    def _release_hints(self, settle_s: float) -> None:
        """DONE: the guest takes its hinted blocks back. Safe at any time: the epoch is closed and every
        later write to those pages is in the write log."""
        assert self.hints is not None
        self.hints.done_and_wait(2.0)
        time.sleep(settle_s)

    def release_before_switchover(self, settle_s: float = 0.5) -> bool:
        """With the every-round policy the guest still holds its hinted blocks: close the epoch, DONE, and
        give the guest time to take them back while it still runs (one more round sends what that
        changed). False when there was nothing to give back."""
        if self.hints is None or self.config.hint_policy is not HintPolicy.EVERY_ROUND:
            return False
        self.hints.stop_hints()
        self.bitmap.close_epoch()
        self._release_hints(settle_s)
        self.hints = None  # no further runs: the balloon goes at switchover
        return True

    def detach_hints(self) -> None:
        """No more hint runs (the balloon is about to go): STOP a run still open, close its epoch."""
        if self.hints is not None and self.bitmap.epoch is not None:
            self.hints.stop_hints()
        self.bitmap.close_epoch()
        self.hints = None

    def _wait_first_hint_run(self, limit_s: float, faster_than_bps: float | None = None) -> float:
        """Wait until the guest ends its hint run with its STOP (the device leaves REQUESTED/START for
        STOP on its own): free memory hinted before it is sent is never sent. Gives up after ``limit_s``,
        or once a started run has reported no new block for ``first_hint_idle_s`` (a slow guest), or, with
        ``faster_than_bps``, once the run has reported less than that over the last half second. A guest
        still in REQUESTED after ``hint_start_timeout_s`` does not answer: hinting is unavailable."""
        assert self.hints is not None
        t0 = last_progress = time.monotonic()
        blocks = -1
        window: list[tuple[float, int]] = []  # (time, hinted bytes of the run) over the last 0.5 s
        while time.monotonic() - t0 < limit_s:
            st = self.hints.status()
            state = getattr(st.state, "value", st.state)
            if state == "stop" or getattr(st, "broken", None):
                break
            now = time.monotonic()
            if state == "requested" and now - t0 > self.config.hint_start_timeout_s:
                limit = self.config.hint_start_timeout_s
                self._hints_unavailable(f"the guest did not start the requested hint run within {limit:g} s")
                break
            got = int(getattr(st, "blocks", 0))
            if got != blocks:
                blocks, last_progress = got, now
            elif blocks > 0 and now - last_progress > self.config.first_hint_idle_s:
                break
            if faster_than_bps is not None and state != "requested":
                window.append((now, int(getattr(st, "hinted_bytes", 0))))
                while len(window) > 2 and now - window[1][0] >= 0.5:
                    window.pop(0)
                span = now - window[0][0]
                if span >= 0.5 and (window[-1][1] - window[0][1]) / span < faster_than_bps:
                    break  # sending now costs less time than waiting for what is left of the run
            time.sleep(0.005)
        return time.monotonic() - t0

    def recheck_estimate_ms(self) -> float:
        """The switchover check's time: the pages it will read (every page that went on the wire, every
        page held as zeros that is not a hole) at the rate a timed read of a sample of them achieves now,
        on this host (``_sampled_check_rate``; 8 GB/s when the sample is too small to time), times 0.8
        when the check will read on its threads (``check_threads_min_pages``). A constant 8 GB/s predicted
        497-547 ms for checks of 4 GiB that took 148-168 ms (``bench/results/twohost_bench-4g-check``)."""
        selected, _punched = self._check_selection()
        pages = int(np.count_nonzero(selected))
        if pages == 0:
            return 0.0
        rate = self._sampled_check_rate(selected) or 8e9
        ms = pages * PAGE_SIZE / rate * 1e3
        if self.config.check_threads > 1 and pages >= self.config.check_threads_min_pages:
            ms *= CHECK_THREADS_TIME
        return ms

    def _sampled_check_rate(self, selected: npt.NDArray[np.uint8]) -> float | None:
        """Bytes/s of the check's kernel over ``CHECK_SAMPLE_RUNS`` runs of 1 MiB spread evenly over guest
        RAM (reads, no sends), or None when they hold fewer than 256 selected pages."""
        run = CHECK_SAMPLE_RUN_PAGES
        starts = sample_run_starts(self._page_spans(), CHECK_SAMPLE_RUNS, run)
        sampled = 0
        t0 = time.perf_counter()
        for p0 in starts:
            sel = selected[p0 : p0 + run]
            changed_pages(self.ram.pages(p0, sel.size), sel, self.sent_hash[p0 : p0 + sel.size])
            sampled += int(np.count_nonzero(sel))
        elapsed = time.perf_counter() - t0
        return sampled * PAGE_SIZE / elapsed if sampled >= 256 and elapsed > 0 else None

    def decide(self, elapsed_s: float) -> Decision:
        """The convergence policy's verdict on the round that just ended (its sync included)."""
        last = self.result.rounds[-1]
        self.convergence.costs.recheck_ms = self.recheck_estimate_ms()
        self.convergence.costs.final_harvest_ms = max(1.0, last.harvest_ms)
        m = RoundMeasure(
            dirtied_pages=self._last_dirtied,
            dirty_interval_s=self._last_interval,
            bytes_sent=last.bytes_on_wire,
            send_s=last.send_ms / 1e3,
            pending_pages=self.bitmap.count_dirty(),
            pending_data_fraction=self._pending_data_fraction(),
            since_harvest_s=time.monotonic() - self._last_harvest,
            pages_sent=last.pages_data + last.pages_zero_sent + last.pages_zero_skipped + last.pages_fill,
        )
        d = self.convergence.after_round(m, elapsed_s)
        self.result.decisions.append(d)
        self.result.converged = d.verdict is Verdict.SWITCH_OVER
        log.info("after round %d: %s (%s)", self.round - 1, d.verdict.value, d.reason)
        return d

    def _pending_data_fraction(self, sample: int = 1024) -> float:
        """The share of the dirty pages that hold data, from up to ``sample`` of them read now (4 MiB)."""
        pages = self.bitmap.sample_dirty(sample, seed=self.round)
        if pages.size == 0:
            return 1.0
        words = np.empty((pages.size, PAGE_SIZE // 8), dtype=np.uint64)
        for i, p in enumerate(pages.tolist()):
            words[i] = self.ram.pages(p, 1).view(np.uint64)
        marker = (words == words[:, :1]).all(axis=1)  # zero, or one repeated 8-byte value
        return float(np.count_nonzero(~marker)) / pages.size

    def iterate(self, should_abort: Callable[[], bool] = lambda: False) -> Decision:
        """Rounds until the policy says switch over or fail (then the caller fails, source running)."""
        t0 = time.monotonic()
        while True:
            self.run_round()
            if should_abort():
                raise InterruptedError("precopy cancelled")
            d = self.decide(time.monotonic() - t0)
            if d.verdict is not Verdict.ITERATE:
                return d

    def live_check(self) -> int:
        """The switchover check's reads, once, with the guest still running and no hint epoch open: every
        page not dirty now whose content is no longer what the destination holds is marked dirty, so a live
        round sends it. A device's write (virtio-blk filling the page cache, virtio-net a receive buffer)
        is in no write log and would otherwise be resent in the stop window: a 128 MiB disk read into a
        reporting guest's memory was resent there whole (32,715 pages) when the reused pages had been read
        before (tests/test_dma_guest.py). Marking a page dirty only adds a send: what changes after its
        read here is left to the next round's read or the check in the stop window, as before. Reads on
        one thread (the guest runs on the other core); returns the pages marked."""
        if self.bitmap.epoch is not None:
            raise RuntimeError(
                f"the live check needs the hint epoch closed (epoch {self.bitmap.epoch} is open)"
            )
        t0 = time.monotonic()
        selected, _punched = self._check_selection()  # pages sent that are holes now go as markers later
        selected &= ~self.bitmap.dirty_flags()
        changed, checked = self._changed_pages(selected)
        flags = np.zeros(self.bitmap.nbits, dtype=bool)
        for pages in changed:
            flags[pages] = True
        found = int(np.count_nonzero(flags))
        if found:
            self.bitmap.merge_write_log(pack_pages(flags, self.bitmap.nwords))
        self.result.live_check_pages_changed += found
        self.result.live_check_ms += (time.monotonic() - t0) * 1e3
        log.info("live check: %d of %d pages changed with no log bit", found, checked)
        return found

    # ---------------------------------------------------------------------------------- switchover

    def final_round(self, *, check_beside: bool = False) -> RoundStats:
        """With the guest stopped: close the epoch (no new id), harvest, send the rest.

        ``check_beside``: once the harvest is done, if the round has ``check_beside_min_pages`` or more to
        send, the switchover check of every page sent before and not dirty now starts on its own thread
        (``verify_and_resend`` takes its result). The two never touch
        the same page: this round reads, sends and fingerprints only dirty pages, the check only the others
        (the guest is stopped: none of them changes any more); the check's resends come after this round.
        """
        rs = RoundStats(round=self.round)
        t0 = time.monotonic()
        _newly, rs.harvest_ms = self.sync(new_epoch=False, filled_holes=False)
        rs.dirty_at_start = self.bitmap.count_dirty()
        if check_beside and rs.dirty_at_start >= self.config.check_beside_min_pages:
            selected, punched = self._check_selection()
            selected &= ~self.bitmap.dirty_flags()
            pool = ThreadPoolExecutor(1, thread_name_prefix="fph-switchover-check")
            self._check = pool.submit(self._timed_changed_pages, selected), punched
            pool.shutdown(wait=False)  # the thread ends with the check
        ts = time.monotonic()
        try:
            self._send_dirty(rs)
            rs.send_ms = (time.monotonic() - ts) * 1e3
            self.channel.end_round(self.round, {"pages": rs.pages_data, "final": True})
        except BaseException:
            if self._check is not None:  # it reads guest RAM: let it end before the caller unmaps it
                futures.wait([self._check[0]])
                self._check = None
            raise
        rs.ms = (time.monotonic() - t0) * 1e3
        self.result.final = rs
        self.round += 1
        return rs

    def verify_and_resend(self) -> int:
        """Re-read every page sent so far, and every page the destination holds as zeros unsent, and resend
        those that changed since (the guest is stopped): the check the final round started beside itself,
        or all of it now. Pages sent that are holes now go as zero markers, unread."""
        t0 = time.monotonic()
        if self._check is not None:
            (check, punched), self._check = self._check, None
            changed, checked, self.result.verify_beside_final_ms = check.result()
        else:
            selected, punched = self._check_selection()
            many = np.count_nonzero(selected) >= self.config.check_threads_min_pages
            changed, checked = self._changed_pages(selected, self.config.check_threads if many else 1)
        resent = 0
        for pages in changed:  # one array per pass: a run never crosses a RAM region
            for run_start, run_len in _runs(pages):
                self._send_data(self.round, run_start, run_len)
                resent += run_len
        for run_start, run_len in _runs(np.flatnonzero(punched)):  # RAM regions never touch: runs stay in one
            self.channel.send_zeros(self.round, run_start, run_len)
            self.sent_hash[run_start : run_start + run_len] = ZERO_PAGE_HASH
        self.result.verify_pages_checked = checked
        self.result.verify_pages_resent = resent
        self.result.verify_pages_zeroed = int(np.count_nonzero(punched))
        self.result.verify_ms = (time.monotonic() - t0) * 1e3
        return resent

    def _holes_now(self) -> npt.NDArray[np.bool_]:
        """One flag per page: a hole of the source RAM file now."""
        holes = np.zeros(self.bitmap.nbits, dtype=bool)
        for first, n in self.ram.hole_runs(self.ram.data_extents()).tolist():
            holes[first : first + n] = True
        return holes

    def _add_filled_holes(self, log: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """The harvested ``log`` plus every page left unread as a hole that holds data now. A CPU store
        there is in the log already; a device's write (a reporting guest's free memory taken for a disk
        read) is in no log, and would otherwise wait for the switchover check: a 128 MiB disk read into
        such pages was resent whole in the stop window (tests/test_dma_guest.py)."""
        held = self.zero_held == ZERO_HOLE
        if not held.any():
            return log
        filled = held & ~self._holes_now()
        n = int(np.count_nonzero(filled))
        if n == 0:
            return log
        self.result.holes_filled += n
        return log | pack_pages(filled, self.bitmap.nwords)

    def _check_selection(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
        """What the switchover check reads: every page that went on the wire and (``check_zero_held``)
        every page the destination holds as zeros unsent, except the pages that are holes of the RAM file
        now. A hole is zero, and reading one would allocate it on the source (a 4 GiB reporting guest's
        check read 156k of them: 1.8 s, ~12 us a page on the two-host lab's host). Also returns the pages
        sent with content that are holes now (the guest reported them free after they were sent and its
        worker punched them out): they go as zero markers, unread."""
        holes = self._holes_now()
        sent = self.on_wire != 0
        selected = sent | (self.zero_held != 0) if self.config.check_zero_held else sent
        punched = sent & holes & (self.sent_hash != ZERO_PAGE_HASH)
        return (selected & ~holes).astype(np.uint8), punched

    def _changed_pages(
        self, selected: npt.NDArray[np.uint8], threads: int = 1
    ) -> tuple[list[npt.NDArray[np.int64]], int]:
        """Pages flagged in ``selected`` whose content is no longer what was sent (per pass of one RAM
        region), and how many were read. Reads guest RAM and the selected pages' fingerprints only; with
        ``threads`` > 1 the passes are split over that many threads (the kernel releases the GIL)."""
        step = 1 << 15  # 128 MiB of pages per pass
        passes = [
            (first + off, min(step, n - off)) for first, n in self._page_spans() for off in range(0, n, step)
        ]

        def one_pass(span: tuple[int, int]) -> npt.NDArray[np.int64]:
            p0, k = span
            sel = selected[p0 : p0 + k]
            return p0 + changed_pages(self.ram.pages(p0, k), sel, self.sent_hash[p0 : p0 + k])

        if threads > 1 and len(passes) > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="fph-switchover-check") as pool:
                found = list(pool.map(one_pass, passes))
        else:
            found = [one_pass(span) for span in passes]
        return found, sum(int(np.count_nonzero(selected[p0 : p0 + k])) for p0, k in passes)

    def _page_spans(self) -> list[tuple[int, int]]:
        """(first page, pages) of each guest RAM region."""
        return [(r.gpa >> PAGE_SHIFT, r.size >> PAGE_SHIFT) for r in self.bitmap.layout]

    def _timed_changed_pages(
        self, selected: npt.NDArray[np.uint8]
    ) -> tuple[list[npt.NDArray[np.int64]], int, float]:
        t0 = time.monotonic()
        changed, checked = self._changed_pages(selected)
        return changed, checked, (time.monotonic() - t0) * 1e3

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
        """Copy the pages into the bounce buffer while classifying and fingerprinting them, then send. A
        chunk that is a hole of the RAM file is zero pages, unread: reading a hole would allocate it on the
        source (~12-20 us a page on these hosts), and a guest that reports what it frees punches holes while
        the rounds run. The hole answers as a read would at this instant: a later write, CPU or device,
        allocates the page, and the log or the switchover check sees it."""
        bounce = self._bounce[: n * PAGE_SIZE]
        classes, hashes, fills = self._class[:n], self._hashbuf[:n], self._fill[:n]
        hole = self.ram.is_hole(first, n)
        if hole:
            classes[:] = PAGE_ZERO
            rs.pages_hole_unread += n
            uniform = 0  # no data pages: no fill runs among them
        else:  # zero pages go out as markers (or not at all): read, never copied
            pages = self.ram.pages(first, n)
            uniform = copy_scan(pages, bounce, classes, hashes, fills, copy_zero_pages=False)
        plan = self.bitmap.plan_send(first, classes)
        for kind, start, length in _segments(plan):
            p = first + start
            if kind == SEND_DATA:
                self.sent_hash[p : p + length] = hashes[start : start + length]
                self.on_wire[p : p + length] = 1
                self.zero_held[p : p + length] = 0
                if uniform and (classes[start : start + length] == PAGE_FILL).any():
                    self._send_data_or_fill(rs, first, start, length, bounce)
                else:
                    self._send_pages(rs, p, bounce, start, length)
            elif kind == SEND_ZERO:
                self.channel.send_zeros(rs.round, p, length)
                self.sent_hash[p : p + length] = ZERO_PAGE_HASH
                self.on_wire[p : p + length] = 1
                self.zero_held[p : p + length] = 0
                rs.pages_zero_sent += length
            elif kind == SKIP_ZERO:
                self.sent_hash[p : p + length] = ZERO_PAGE_HASH
                self.zero_held[p : p + length] = ZERO_HOLE if hole else ZERO_READ
                rs.pages_zero_skipped += length

    def _send_pages(
        self, rs: RoundStats, p: int, bounce: npt.NDArray[np.uint8], start: int, length: int
    ) -> None:
        payload = bounce[start * PAGE_SIZE : (start + length) * PAGE_SIZE]
        self.channel.send_pages(rs.round, p, payload, self._hashbuf[start : start + length])
        rs.pages_data += length

    def _send_data_or_fill(
        self, rs: RoundStats, first: int, start: int, length: int, bounce: npt.NDArray[np.uint8]
    ) -> None:
        """A run of pages the destination will hold as data: runs of one fill value go as FILL markers."""
        classes = self._class[start : start + length]
        values = np.where(classes == PAGE_FILL, self._fill[start : start + length], 0)
        key = np.where(classes == PAGE_FILL, 1, 0).astype(np.int8)
        edges = np.flatnonzero((np.diff(key) != 0) | (np.diff(values) != 0)) + 1
        bounds = [0, *edges.tolist(), length]
        for a, b in itertools.pairwise(bounds):
            p = first + start + a
            if key[a]:
                self.channel.send_fill(rs.round, p, b - a, int(values[a]))
                rs.pages_fill += b - a
            else:
                self._send_pages(rs, p, bounce, start + a, b - a)

    def _send_data(self, round_: int, first: int, n: int) -> None:
        """Send pages as data whatever they hold (the switchover check's resends)."""
        for off in range(0, n, MAX_FRAME_PAGES):
            k = min(MAX_FRAME_PAGES, n - off)
            p = first + off
            bounce, hashes = self._bounce[: k * PAGE_SIZE], self._hashbuf[:k]
            copy_scan(self.ram.pages(p, k), bounce, self._class[:k], hashes, self._fill[:k])
            self.channel.send_pages(round_, p, bounce, hashes)
            self.bitmap.plan_send(p, np.zeros(k, dtype=np.uint8))  # the destination now holds data there
            self.sent_hash[p : p + k] = hashes
            self.on_wire[p : p + k] = 1
            self.zero_held[p : p + k] = 0


def sample_run_starts(spans: list[tuple[int, int]], runs: int, run: int) -> list[int]:
    """First pages of ``runs`` runs of ``run`` pages spread evenly over the regions ``spans`` ((first page,
    pages) each, in order), each run inside one region (a region shorter than ``run`` gives a shorter one)."""
    total = sum(n for _, n in spans)
    if total < run or runs < 1:
        return []
    starts = []
    for i in range(runs):
        at = (total - run) * i // max(1, runs - 1)
        for first, n in spans:
            if at < n:
                starts.append(first + min(at, max(0, n - run)))
                break
            at -= n
    return starts


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
