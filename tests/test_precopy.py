"""Precopy rounds end to end over a real TCP data plane, with a simulated guest writing its RAM file.

The "guest" is a thread that writes pages of the source RAM file and logs every write in a software write
log with an atomic (locked) fetch-and-clear; the "balloon" hints free blocks through the bitmap's epoch.
At the end the destination RAM file must equal the source byte for byte, except pages the guest hinted
free and did not use again. A negative control (the write log ignored) must be caught by the same check.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from fph.dirty_bitmap import DirtyBitmap
from fph.migration.precopy import Precopy, PrecopyConfig, sample_run_starts
from fph.ram_layout import PAGE_SIZE, RamLayout, RamRange
from fph.transfer.channel import ChannelError
from fph.transfer.pagehash import page_hashes
from fph.transfer.ram_file import RamFile, RamFileError
from fph.transfer.receiver import FilePrep, RamReceiver
from fph.transfer.sender import RamSender

MiB = 1 << 20
LAYOUT = RamLayout([RamRange(0, 48 * MiB, 0), RamRange(64 * MiB, 16 * MiB, 48 * MiB)])


class SoftGuest:
    """Writes random pages of RAM and logs them; hints 4 MiB blocks it declares free."""

    def __init__(self, ram: RamFile, layout: RamLayout, seed: int = 1) -> None:
        self.ram = ram
        self.pages = np.array([p for r in layout for p in range(r.gpa >> 12, r.end >> 12)], dtype=np.int64)
        self.log = np.zeros((layout.span_pages + 63) // 64, dtype=np.uint64)
        self.lock = threading.Lock()
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.writes = 0
        self.free_blocks: set[int] = set()  # GPAs of 4 MiB blocks the guest freed and hinted
        self.balloon: FakeBalloon | None = None

    def write(self, page: int) -> None:
        with self.lock:
            self.ram.pages(page, 1)[:] = self.rng.integers(1, 255, PAGE_SIZE, dtype=np.uint8)
            self.log[page >> 6] |= np.uint64(1) << np.uint64(page & 63)
            self.writes += 1
            self.free_blocks.discard((page << 12) & ~(4 * MiB - 1))

    def harvest(self) -> np.ndarray:
        with self.lock:
            words = self.log.copy()
            self.log[:] = 0
            return words

    def run(self, pages_per_s: float) -> None:
        while not self.stop.is_set():
            self.write(int(self.rng.choice(self.pages)))
            time.sleep(1 / pages_per_s)


class FakeBalloon:
    """HintControl whose guest hints ``blocks`` (free, zero-filled like init_on_alloc=1) on each request."""

    def __init__(self, bitmap: DirtyBitmap, guest: SoftGuest, blocks: list[int]) -> None:
        self.bitmap, self.guest, self.blocks = bitmap, guest, blocks
        self.cmd = 0x8000_0000
        self.state = "stop"
        self.dones = 0
        self.requests = 0

    answers = True
    """The guest starts the run it is asked for (SilentBalloon's does not)."""

    def request_hints(self, on_issue: Callable[[int], None] | None = None) -> int:
        self.requests += 1
        self.cmd += 1
        if on_issue is not None:
            on_issue(self.cmd)
        self.state = "requested"
        if self.answers:
            threading.Timer(0.02, self._hint, args=(self.cmd,)).start()
        return self.cmd

    def _hint(self, cmd: int) -> None:
        blocks, self.blocks = self.blocks, []  # a block stays held by the driver: hinted once
        for gpa in blocks:
            with self.guest.lock:  # the driver zeroes each block after the id, then hints it
                self.guest.ram.pages(gpa >> 12, 1024)[:] = 0
                for p in range(gpa >> 12, (gpa >> 12) + 1024):
                    self.guest.log[p >> 6] |= np.uint64(1) << np.uint64(p & 63)
                self.guest.free_blocks.add(gpa)
            self.bitmap.apply_hints(cmd, [(gpa, 4 * MiB)])
        self.state = "stop"

    def stop_hints(self) -> None:
        self.state = "stop"

    def done(self) -> None:
        self.dones += 1
        self.state = "done"

    def done_and_wait(self, timeout: float = 2.0) -> bool:
        self.done()
        return True

    def status(self) -> object:
        return type("S", (), {"state": self.state, "broken": None})()


@pytest.fixture
def ram_files(shm_files: Callable[..., list[Path]]) -> Iterator[tuple[RamFile, RamFile]]:
    src_path, dst_path = shm_files(LAYOUT.ram_bytes, "src", "dst")
    src, dst = RamFile(src_path, LAYOUT, writable=True), RamFile(dst_path, LAYOUT, writable=True)
    rng = np.random.default_rng(7)
    src.buf[: 40 * MiB] = rng.integers(0, 255, 40 * MiB, dtype=np.uint8)  # data; the rest zero
    src.buf[56 * MiB : 60 * MiB] = 0x5A
    try:
        yield src, dst
    finally:
        src.close()
        dst.close()


def migrate(
    src: RamFile,
    dst: RamFile,
    *,
    ignore_log: bool,
    hint_blocks: list[int],
    rate: float,
    verify: bool = True,
    policy: str = "release-early",
    first_run: str = "overlap",
) -> tuple:
    bitmap = DirtyBitmap(LAYOUT)
    guest = SoftGuest(src, LAYOUT)
    receiver = RamReceiver(dst)
    addr = receiver.start()
    channel = RamSender(addr, RamFile(src.path, LAYOUT, writable=False))
    channel.connect()
    empty = np.zeros_like(guest.log)
    harvest = (lambda: (guest.harvest(), empty)[1]) if ignore_log else guest.harvest
    balloon = guest.balloon = FakeBalloon(bitmap, guest, hint_blocks)
    pc = Precopy(
        bitmap,
        channel.ram,
        channel,
        harvest,
        balloon,
        PrecopyConfig(
            max_rounds=4,
            min_rounds=3,
            first_hint_wait_s=2,
            hint_policy=policy,
            first_hint_run=first_run,
            check_beside_min_pages=0,
        ),
    )
    writer = threading.Thread(target=guest.run, args=(rate,), daemon=True)
    pc.start()
    writer.start()
    pc.iterate()
    if pc.release_before_switchover(0.0):  # every-round: DONE while the guest runs, one more round
        pc.run_round()
    guest.stop.set()  # "stop" the VM
    writer.join()
    pc.final_round(check_beside=verify)  # the check on its own thread while the final round sends
    if verify:
        pc.verify_and_resend()
    ack = channel.finish({"rounds": pc.round})
    result = receiver.wait(10)
    channel.close()
    return pc, guest, ack, result


def differing_pages(src: RamFile, dst: RamFile, guest: SoftGuest) -> list[int]:
    a = src.buf.reshape(-1, PAGE_SIZE)
    b = dst.buf.reshape(-1, PAGE_SIZE)
    diff = np.flatnonzero((a != b).any(axis=1))
    free = {(blk >> 12) + i for blk in guest.free_blocks for i in range(1024)}
    return [
        int(LAYOUT.offset_to_gpa(int(d) * PAGE_SIZE) >> 12)
        for d in diff
        if int(LAYOUT.offset_to_gpa(int(d) * PAGE_SIZE) >> 12) not in free
    ]


@pytest.mark.parametrize("first_run", ["overlap", "wait"])
@pytest.mark.parametrize("policy", ["release-early", "every-round"])
def test_destination_equals_source_with_a_running_guest_and_hints(
    ram_files: tuple[RamFile, RamFile], policy: str, first_run: str
) -> None:
    src, dst = ram_files
    hinted = [8 * MiB, 12 * MiB, 44 * MiB, 68 * MiB]
    pc, guest, ack, result = migrate(
        src, dst, ignore_log=False, hint_blocks=hinted, rate=2000, policy=policy, first_run=first_run
    )
    assert result.ok, result.error
    balloon = guest.balloon
    assert balloon is not None
    if policy == "release-early":  # one run, DONE before anything is sent
        assert balloon.requests == 1 and balloon.dones == 1
    else:  # a run per round (the first run, its sync, each round's sync), DONE a round before switchover
        first_run_sync = first_run == "wait"  # waiting, the first run ends with its own sync
        assert balloon.requests == len(pc.result.rounds) + first_run_sync and balloon.dones == 1
    assert guest.writes > 20
    assert differing_pages(src, dst, guest) == []
    r0 = pc.result.rounds[0]
    assert r0.hinted_pages == 4 * 1024 and r0.hint_wait_ms < 2000
    # zeroed hinted blocks never went on the wire as data, unless round 0 sent them before their hint came
    # (overlap: counted as waste); zero pages the destination holds are skipped
    sent_data = sum(r.pages_data for r in pc.result.rounds) + pc.result.final.pages_data
    assert sent_data < (48 + 16) * 256 - 4 * 1024 + r0.hint_waste_pages
    # the zeroed hinted blocks: skipped where read after their zeroing, zero markers where sent before it
    assert sum(r.pages_zero_skipped + r.pages_zero_sent for r in pc.result.rounds) > 0
    assert ack["counters"]["pages"] == sum(r.pages_data for r in [*pc.result.rounds, pc.result.final]) + (
        pc.result.verify_pages_resent
    )


def test_negative_control_ignoring_the_write_log_is_caught(ram_files: tuple[RamFile, RamFile]) -> None:
    src, dst = ram_files
    _pc, guest, _ack, result = migrate(src, dst, ignore_log=True, hint_blocks=[], rate=2000, verify=False)
    assert result.ok  # the stream itself is fine...
    assert differing_pages(src, dst, guest), (
        "ignoring the write log must lose writes"
    )  # ...but it lost writes


def test_hinted_pages_written_without_a_log_bit_are_read_and_then_checked(
    ram_files: tuple[RamFile, RamFile],
) -> None:
    """A device filling a reused hinted block writes no log bit (here the log is ignored for every write).
    The harvest after the hint run marks the block dirty again all the same, so round 0 reads it; a later
    write is the next round's if a log bit says so, else the switchover check's, like every page read."""
    src, dst = ram_files
    guest = SoftGuest(src, LAYOUT)
    bitmap, channel, receiver = connected(src, dst)
    balloon = FakeBalloon(bitmap, guest, [8 * MiB])
    # round 0 waits for the hint run, so the block is never sent (overlapping, it could go first)
    cfg = PrecopyConfig(first_hint_run="wait")
    pc = Precopy(bitmap, channel.ram, channel, lambda: np.zeros(bitmap.nwords, dtype=np.uint64), balloon, cfg)
    pc.start()
    pc.run_round()
    block = range(8 * MiB >> 12, 12 * MiB >> 12)
    assert pc.result.rounds[0].hint_waste_pages == 0
    assert bitmap.stats.hinted_unwritten == len(block)  # hinted, and no log bit: read all the same
    assert pc.result.hinting.startswith("used: 1024 of 1024 hinted pages were not written by the guest")
    sent = np.unpackbits(bitmap.sent.view(np.uint8), bitorder="little")
    assert sent[block.start : block.stop].all()
    guest.write(block[3])  # the guest took the block back; a device filled page 3 ...
    pc.run_round()
    guest.write(block[5])  # ... and page 5
    pc.final_round()
    assert pc.verify_and_resend() == 2
    channel.finish({})
    assert receiver.wait(10).ok
    assert differing_pages(src, dst, guest) == []


def test_a_chunk_punched_while_the_rounds_run_goes_as_zeros_unread(
    ram_files: tuple[RamFile, RamFile],
) -> None:
    """The guest reports 1 MiB of its data pages free after round 0 began and its worker punches it: the
    round sends those 256 pages as zeros without reading them (a read would allocate the hole again), and
    a page of it written later by a device still reaches the destination through the switchover check."""
    src, dst = ram_files
    bitmap, channel, receiver = connected(src, dst)
    pc = Precopy(bitmap, channel.ram, channel, lambda: np.zeros(bitmap.nwords, dtype=np.uint64))
    pc.start()
    channel.ram.wait_populated()  # the background populate would fault the hole back in
    first = 8 * MiB // PAGE_SIZE  # data: dirty since the start, sent by round 0's 256-page chunks
    src._mm.madvise(mmap.MADV_REMOVE, 8 * MiB, 1 * MiB)
    pc.run_round()
    rs = pc.result.rounds[0]
    assert rs.pages_hole_unread == 256
    assert src.is_hole(first, 256) and not src.is_hole(first - 256, 256)
    src.buf[8 * MiB + 5 * PAGE_SIZE] = 9  # a device fills page 5 of it: no log bit
    pc.final_round()
    assert pc.verify_and_resend() == 1
    finish_equal(channel, receiver, src, dst)


def test_a_hole_a_device_fills_is_sent_by_the_next_round_not_by_the_check(
    ram_files: tuple[RamFile, RamFile],
) -> None:
    """Pages that were holes at the start leave unread; a device then fills two of them (no log bit). The
    harvest that ends round 0 finds them holding data, so round 1 sends them with the guest running and the
    switchover check has nothing left to resend in the stop window."""
    src, dst = ram_files
    src._mm.madvise(mmap.MADV_REMOVE, 44 * MiB, 4 * MiB)  # 44-48 MiB: never written (a hole)
    bitmap, channel, receiver = connected(src, dst)
    pc = Precopy(bitmap, channel.ram, channel, lambda: np.zeros(bitmap.nwords, dtype=np.uint64))
    pc.start()
    assert pc.result.pages_unread_holes >= 1024
    hole_page = 44 * MiB // PAGE_SIZE
    src.buf[44 * MiB + 7] = 1  # a device writes into the hole: page hole_page holds data now
    src.buf[46 * MiB] = 2
    pc.run_round()
    assert pc.result.holes_filled == 2
    assert bitmap.is_dirty(hole_page) and bitmap.is_dirty(46 * MiB // PAGE_SIZE)
    rs = pc.run_round()
    assert rs.pages_data == 2
    pc.final_round()
    assert pc.verify_and_resend() == 0
    finish_equal(channel, receiver, src, dst)


def finish_equal(channel: RamSender, receiver: RamReceiver, src: RamFile, dst: RamFile) -> None:
    """FINISH, the destination's ACK, then both RAM files equal page for page."""
    channel.finish({})
    assert receiver.wait(10).ok
    assert np.array_equal(src.buf, dst.buf)


def connected(src: RamFile, dst: RamFile) -> tuple[DirtyBitmap, RamSender, RamReceiver]:
    """A fresh bitmap and a sender connected to a receiver on ``dst``."""
    bitmap = DirtyBitmap(LAYOUT)
    receiver = RamReceiver(dst)
    channel = RamSender(receiver.start(), RamFile(src.path, LAYOUT, writable=False))
    channel.connect()
    return bitmap, channel, receiver


def no_log_precopy(src: RamFile, dst: RamFile) -> tuple[Precopy, RamSender, RamReceiver]:
    """A connected precopy with an empty write log, after its first round."""
    bitmap, channel, receiver = connected(src, dst)
    pc = Precopy(bitmap, channel.ram, channel, lambda: np.zeros(bitmap.nwords, dtype=np.uint64))
    pc.start()
    pc.run_round()
    return pc, channel, receiver


@pytest.mark.parametrize("check_beside", [False, True])
def test_verify_resends_pages_changed_without_a_logged_store(
    ram_files: tuple[RamFile, RamFile], check_beside: bool
) -> None:
    """TCG's page walker sets PTE A/D bits with no logged store: the switchover check finds them, also
    when it runs beside the final round."""
    src, dst = ram_files
    pc, channel, receiver = no_log_precopy(src, dst)
    src.buf[5 * PAGE_SIZE + 8] ^= 0x20  # an "Accessed" bit in a page sent as data, not in any log
    pc.final_round()
    pc.config.check_beside_min_pages = 0
    assert pc.final_round(check_beside=check_beside).pages_data == 0
    assert pc.verify_and_resend() == 1
    assert (pc.result.verify_beside_final_ms > 0) == check_beside
    finish_equal(channel, receiver, src, dst)


def test_the_check_beside_the_final_round_reads_only_pages_that_round_does_not_send(
    ram_files: tuple[RamFile, RamFile],
) -> None:
    """The final round sends the pages its harvest found dirty while the check reads every other page
    sent before: no page is read by both, an unlogged change outside the log is still resent, and the
    destination ends equal to the source."""
    src, dst = ram_files
    bitmap, channel, receiver = connected(src, dst)
    log = np.zeros(bitmap.nwords, dtype=np.uint64)
    logged = [7, 8, 9, 300]

    def harvest() -> npt.NDArray[np.uint64]:
        out = log.copy()
        log[:] = 0
        return out

    pc = Precopy(
        bitmap, channel.ram, channel, harvest, config=PrecopyConfig(check_beside_min_pages=len(logged))
    )
    pc.start()
    pc.run_round()
    on_wire_before = int(np.count_nonzero(pc.on_wire))
    for page in logged:  # the guest's last stores before stop: in the log
        src.buf[page * PAGE_SIZE + 100] ^= 0x5A
        log[page >> 6] |= np.uint64(1) << np.uint64(page & 63)
    src.buf[20 * PAGE_SIZE + 8] ^= 0x20  # the walker's Accessed bit: in no log
    final = pc.final_round(check_beside=True)
    assert final.pages_data == len(logged)
    assert pc.verify_and_resend() == 1
    assert pc.result.verify_pages_checked == on_wire_before - len(logged)
    finish_equal(channel, receiver, src, dst)


def test_the_live_check_sends_unlogged_changes_in_a_live_round_not_in_the_stop_window(
    ram_files: tuple[RamFile, RamFile],
) -> None:
    """Device DMA with the guest running: a page sent as data and a zero page read and skipped are both
    written with no log bit. The live check marks them dirty, the next live round sends them, and the check
    in the stop window resends nothing; a change after the live check is still left to that check."""
    src, dst = ram_files
    pc, channel, receiver = no_log_precopy(src, dst)
    src.buf[5 * PAGE_SIZE + 8] ^= 0x20  # a page sent as data
    src.buf[50 * MiB + 16] = 0x40  # a zero page read and skipped
    assert pc.live_check() == 2
    assert pc.result.live_check_pages_changed == 2
    assert pc.run_round().pages_data == 2
    assert pc.live_check() == 0
    pc.final_round()
    assert pc.verify_and_resend() == 0
    finish_equal(channel, receiver, src, dst)


def test_the_live_check_refuses_an_open_hint_epoch(ram_files: tuple[RamFile, RamFile]) -> None:
    """It marks pages dirty as a harvest does, and the bitmap merges nothing while a hint epoch is open."""
    src, dst = ram_files
    pc, channel, receiver = no_log_precopy(src, dst)
    pc.bitmap.open_epoch(7)
    with pytest.raises(RuntimeError, match="epoch 7 is open"):
        pc.live_check()
    pc.bitmap.close_epoch()
    pc.final_round()
    pc.verify_and_resend()
    finish_equal(channel, receiver, src, dst)


@pytest.mark.parametrize("check_zero_held", [True, False])
def test_a_skipped_zero_page_filled_by_device_dma_is_resent(
    ram_files: tuple[RamFile, RamFile], check_zero_held: bool
) -> None:
    """A zero page is read and skipped (the destination holds zeros); then a device writes it with no
    logged store (QEMU's DMA into a network buffer the guest had zeroed and posted). The check re-reads
    pages held as zeros and resends it; without that (the negative control) the destination keeps zeros."""
    src, dst = ram_files
    pc, channel, receiver = no_log_precopy(src, dst)
    pc.config.check_zero_held = check_zero_held
    src.buf[50 * MiB + 16] = 0x40
    pc.final_round()
    assert pc.verify_and_resend() == (1 if check_zero_held else 0)
    channel.finish({})
    assert receiver.wait(10).ok
    lost = differing_pages(src, dst, SoftGuest(src, LAYOUT))
    assert lost == ([] if check_zero_held else [66 * MiB >> 12])  # file offset 50 MiB


def test_sample_runs_are_spread_over_every_region_and_stay_inside_one() -> None:
    spans = [(0, 12288), (16384, 4096)]  # this file's LAYOUT in pages: 48 MiB, a hole, 16 MiB
    starts = sample_run_starts(spans, 16, 256)
    assert len(starts) == 16 and starts[0] == 0 and starts[-1] == 16384 + 4096 - 256
    assert all(a < b for a, b in itertools.pairwise(starts)), starts
    for p in starts:
        assert any(first <= p and p + 256 <= first + n for first, n in spans), p
    assert sample_run_starts([(0, 100)], 16, 256) == []  # smaller than one run


def test_the_check_estimate_is_timed_on_this_host(ram_files: tuple[RamFile, RamFile]) -> None:
    """The predicted check time comes from a timed read of a sample of the pages it will read, and agrees
    with the check's own time within a wide factor (a shared host's timing); nothing selected costs 0."""
    src, dst = ram_files
    pc, channel, receiver = no_log_precopy(src, dst)
    selected, _punched = pc._check_selection()
    assert pc._sampled_check_rate(selected) is not None  # 40 MiB of data pages: the sample holds some
    assert pc._sampled_check_rate(np.zeros_like(selected)) is None
    estimate = pc.recheck_estimate_ms()
    t0 = time.perf_counter()
    pc._changed_pages(selected)
    actual = (time.perf_counter() - t0) * 1e3
    assert actual / 10 <= estimate <= actual * 10, (estimate, actual)
    on_wire, zero_held = pc.on_wire.copy(), pc.zero_held.copy()
    pc.on_wire[:] = 0
    pc.zero_held[:] = 0
    assert pc.recheck_estimate_ms() == 0.0
    pc.on_wire[:], pc.zero_held[:] = on_wire, zero_held
    pc.final_round()
    assert pc.verify_and_resend() == 0
    channel.finish({})
    assert receiver.wait(10).ok


@pytest.mark.parametrize("check_beside", [False, True])
def test_pages_reported_free_after_they_were_sent_go_as_zero_markers_unread(
    ram_files: tuple[RamFile, RamFile], check_beside: bool
) -> None:
    """A reporting guest frees pages that round 0 sent with data, and its worker punches them out of the
    RAM file (MADV_REMOVE, as ``GuestMemory.discard``). The switchover check must not read them (a read
    would allocate each page again on the source): they go as zero markers, the file keeps its holes,
    and the destination ends equal to the source."""
    src, dst = ram_files
    pc, channel, receiver = no_log_precopy(src, dst)
    punched = range(8 * MiB, 12 * MiB)  # file offsets = GPA here: 1,024 pages sent with data
    with open(src.path, "r+b") as f, mmap.mmap(f.fileno(), LAYOUT.ram_bytes) as mm:
        mm.madvise(mmap.MADV_REMOVE, punched.start, len(punched))
    holes_before = sum(n for _, n in src.hole_runs().tolist())  # (a read of a hole would fill it)
    assert holes_before >= len(punched) // PAGE_SIZE
    pc.config.check_beside_min_pages = 0
    src.buf[0] ^= 1  # one logged store for the final round, so that the check can run beside it
    pc.bitmap.merge_write_log(_log_of(pc.bitmap, [0]))
    pc.final_round(check_beside=check_beside)
    assert pc.verify_and_resend() == 0
    assert pc.result.verify_pages_zeroed == len(punched) // PAGE_SIZE
    assert sum(n for _, n in src.hole_runs().tolist()) == holes_before  # nothing read back in
    finish_equal(channel, receiver, src, dst)


def _log_of(bitmap: DirtyBitmap, pages: list[int]) -> npt.NDArray[np.uint64]:
    log = np.zeros(bitmap.nwords, dtype=np.uint64)
    for page in pages:
        log[page >> 6] |= np.uint64(1) << np.uint64(page & 63)
    return log


def test_receiver_failure_reaches_the_source(ram_files: tuple[RamFile, RamFile]) -> None:
    src, dst = ram_files
    _bitmap, channel, receiver = connected(src, dst)
    page = np.ones(16 * PAGE_SIZE, dtype=np.uint8)
    channel.send_pages(0, 0, page[:PAGE_SIZE], page_hashes(page[:PAGE_SIZE]))
    receiver.stop()  # the destination goes away mid-stream
    with pytest.raises(ChannelError):
        for i in range(2000):
            channel.send_pages(0, i % 1000, page, page_hashes(page))
            channel.end_round(0, {})
    assert not receiver.wait(5).ok


def test_unreachable_destination_and_bad_ram_file(tmp_path: Path) -> None:
    with pytest.raises(ChannelError, match="cannot reach"):
        RamSender(("127.0.0.1", 1), None, timeout=2).connect()  # type: ignore[arg-type]
    small = tmp_path / "small.ram"
    small.write_bytes(b"\0" * PAGE_SIZE)
    with pytest.raises(RamFileError, match="holds 4096 bytes"):
        RamFile(small, LAYOUT, writable=False)
    with pytest.raises(RamFileError, match="cannot open"):
        RamFile(tmp_path / "missing.ram", LAYOUT, writable=False)


def test_holes_of_the_source_stay_unread_and_a_later_write_into_one_still_arrives(
    ram_files: tuple[RamFile, RamFile],
) -> None:
    """The fixture's source holds data in [0, 40 MiB) and [56, 60 MiB) of the file; the rest never was
    written. Those pages must not be read (reading a tmpfs hole allocates it), nor sent; a page written
    into a hole after the sender looked must still reach the destination through the write log, and one a
    device wrote (no log entry) through the switchover check, which reads no page that is still a hole."""
    src, dst = ram_files
    if os.stat(src.path).st_blocks * 512 >= LAYOUT.ram_bytes:
        pytest.skip("file system without holes")
    guest = SoftGuest(src, LAYOUT)
    bitmap, channel, receiver = connected(src, dst)
    pc = Precopy(bitmap, channel.ram, channel, guest.harvest)
    pc.start()
    hole_pages = (LAYOUT.ram_bytes - 44 * MiB) // PAGE_SIZE
    assert pc.result.pages_unread_holes == hole_pages
    allocated = os.stat(src.path).st_blocks
    pc.run_round()
    assert os.stat(src.path).st_blocks == allocated, "round 0 read (and allocated) a hole"
    late = (66 * MiB >> 12) + 3  # file offset 50 MiB + 3 pages
    guest.write(late)
    pc.run_round()
    src.buf[52 * MiB + 8] = 0x11  # a device writes into another hole: no log entry (DMA)
    pc.final_round()
    assert pc.verify_and_resend() == 1  # found: that hole holds data now; the others are not read
    assert pc.result.verify_pages_checked == 44 * MiB // PAGE_SIZE + 1 + 1
    finish_equal(channel, receiver, src, dst)
    sent = sum(r.pages_data + r.pages_zero_sent + r.pages_fill for r in [*pc.result.rounds, pc.result.final])
    assert sent == 44 * MiB // PAGE_SIZE + 1
    channel.close()


def test_the_receiver_is_prepared_when_it_says_so(ram_files: tuple[RamFile, RamFile]) -> None:
    """wait_prepared returns once every page of the destination file is allocated: round 0 waits for it
    rather than streaming into a socket the kernel cannot drain while it allocates."""
    _src, dst = ram_files
    receiver = RamReceiver(dst)
    receiver.start()
    try:
        assert receiver.wait_prepared(60) > 0.0
        assert os.stat(dst.path).st_blocks * 512 >= LAYOUT.ram_bytes
    finally:
        receiver.stop()
    unprepared = RamReceiver(dst, prepare=FilePrep.NONE)
    with pytest.raises(ChannelError, match="still preparing"):
        unprepared.wait_prepared(0.01)  # never started
    unprepared.stop()


class SilentBalloon(FakeBalloon):
    """A driver that never answers: the request is made, the guest never starts the run."""

    answers = False


class RefusingBalloon(FakeBalloon):
    def request_hints(self, on_issue: Callable[[int], None] | None = None) -> int:
        raise RuntimeError("the driver has not negotiated FREE_PAGE_HINT")


@pytest.mark.parametrize("balloon_class", [SilentBalloon, RefusingBalloon])
def test_a_guest_that_cannot_hint_is_migrated_without_hints(
    ram_files: tuple[RamFile, RamFile], balloon_class: type[FakeBalloon]
) -> None:
    src, dst = ram_files
    guest = SoftGuest(src, LAYOUT)
    bitmap, channel, receiver = connected(src, dst)
    balloon = balloon_class(bitmap, guest, [8 * MiB])
    cfg = PrecopyConfig(first_hint_wait_s=5, hint_start_timeout_s=0.3)
    pc = Precopy(bitmap, channel.ram, channel, guest.harvest, balloon, cfg)
    pc.start()
    t0 = time.monotonic()
    pc.iterate()
    assert time.monotonic() - t0 < 3  # bounded: no 5 s wait for a run that never starts
    pc.final_round()
    pc.verify_and_resend()
    finish_equal(channel, receiver, src, dst)
    assert pc.result.hinting.startswith("unavailable: ")
    why = "did not start the requested hint run" if balloon_class is SilentBalloon else "FREE_PAGE_HINT"
    assert why in pc.result.hinting, pc.result.hinting
    assert bitmap.stats.hinted_pages == 0


def test_poisoned_pages_cost_a_marker(ram_files: tuple[RamFile, RamFile]) -> None:
    """Pages that repeat one 8-byte value (page_poison's 0xaa) go as FILL markers, not as data, and the
    destination holds exactly the source's bytes."""
    src, dst = ram_files
    src.buf[: 8 * MiB] = 0xAA  # a poisoned 8 MiB
    src.buf[8 * MiB : 8 * MiB + PAGE_SIZE] = 0x5B  # another fill value, one page
    guest = SoftGuest(src, LAYOUT)
    bitmap, channel, receiver = connected(src, dst)
    pc = Precopy(bitmap, channel.ram, channel, guest.harvest)
    pc.start()
    r0 = pc.run_round()
    pc.final_round()
    assert pc.verify_and_resend() == 0
    channel.finish({})
    rx = receiver.wait(10)
    assert rx.ok and np.array_equal(src.buf, dst.buf)
    fill_pages = (8 * MiB + 4 * MiB) // PAGE_SIZE + 1  # the fixture's 4 MiB of 0x5A too
    assert r0.pages_fill == fill_pages
    assert rx.counters["fill_pages"] == fill_pages
    assert channel.counters.bytes_on_wire < (40 * MiB - 8 * MiB) + 2 * MiB  # data only, plus markers


class LateBalloon(FakeBalloon):
    """Its guest hints only after round 0 has sent everything (when the sender asks for the run's state),
    before the STOP that ends the run: every data page of its blocks was sent for nothing."""

    answers = False

    def status(self) -> object:
        if self.state == "requested":
            self._hint(self.cmd)
        return super().status()


def test_overlap_counts_pages_sent_before_their_hint_as_waste(ram_files: tuple[RamFile, RamFile]) -> None:
    """Round 0 overlapping the hint run: blocks hinted after round 0 read them were sent (waste, counted);
    the driver's zeroing of those blocks is logged and resent as zero markers; the destination is exact."""
    src, dst = ram_files
    guest = SoftGuest(src, LAYOUT)
    bitmap, channel, receiver = connected(src, dst)
    balloon = guest.balloon = LateBalloon(bitmap, guest, [8 * MiB, 44 * MiB])  # data, and zeros (skipped)
    cfg = PrecopyConfig(first_hint_run="overlap")
    pc = Precopy(bitmap, channel.ram, channel, guest.harvest, balloon, cfg)
    pc.start()
    r0 = pc.run_round()
    r1 = pc.run_round()
    pc.final_round()
    assert pc.verify_and_resend() == 0
    channel.finish({})
    assert receiver.wait(10).ok
    assert r0.hinted_pages == 2048 and r0.hint_bits_cleared == 0
    assert r0.hint_waste_pages == 1024  # the data block; the zero block was skipped, never on the wire
    assert r1.pages_zero_sent == 1024  # the zeroed data block, as markers
    assert balloon.dones == 1 and pc.result.hinting == "used"
    assert differing_pages(src, dst, guest) == []
    channel.close()


class SteadyBalloon(FakeBalloon):
    """A guest whose hint run reports one 4 MiB block every 50 ms (80 MiB/s), then its STOP."""

    answers = False

    def request_hints(self, on_issue: Callable[[int], None] | None = None) -> int:
        cmd = super().request_hints(on_issue)
        self.state = "start"
        threading.Thread(target=self._trickle, args=(cmd, list(self.blocks)), daemon=True).start()
        self.blocks = []
        self.run_bytes = 0
        return cmd

    def _trickle(self, cmd: int, blocks: list[int]) -> None:
        for gpa in blocks:
            time.sleep(0.05)
            if self.state != "start":
                return
            self.bitmap.apply_hints(cmd, [(gpa, 4 * MiB)])
            self.run_bytes += 4 * MiB
        self.state = "stop"

    def status(self) -> object:
        return type("S", (), {"state": self.state, "broken": None, "blocks": self.run_bytes // (4 * MiB),
                              "hinted_bytes": self.run_bytes})()  # fmt: skip


@pytest.mark.parametrize(
    ("bandwidth", "waits"),
    [(None, "no"), (1 * MiB, "whole run"), (1 << 30, "half a second")],
)
def test_auto_waits_only_while_the_run_outpaces_the_cap(
    ram_files: tuple[RamFile, RamFile], bandwidth: int | None, waits: str
) -> None:
    """``auto``: no cap, no wait; a run hinting 80 MiB/s against a 1 MiB/s cap is waited for to its end;
    against a 1 GiB/s cap only as long as it takes to see it is slower (0.5 s), then round 0 overlaps it."""
    src, dst = ram_files
    guest = SoftGuest(src, LAYOUT)
    bitmap, channel, receiver = connected(src, dst)
    blocks = [g * MiB for g in range(0, 48, 4)] + [g * MiB for g in range(64, 80, 4)]  # 16 blocks: 0.8 s
    balloon = SteadyBalloon(bitmap, guest, blocks)
    cfg = PrecopyConfig(first_hint_run="auto", bandwidth=bandwidth)
    pc = Precopy(bitmap, channel.ram, channel, guest.harvest, balloon, cfg)
    pc.start()
    r0 = pc.run_round()
    pc.final_round()
    pc.verify_and_resend()
    channel.finish({})
    assert receiver.wait(30).ok
    if waits == "no":
        assert r0.hint_wait_ms == 0
    elif waits == "whole run":
        assert r0.hint_wait_ms >= 700 and r0.hinted_pages == 16 * 1024, r0
    else:
        assert 450 <= r0.hint_wait_ms < 750, r0
    channel.close()
