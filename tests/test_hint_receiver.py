"""The balloon device's logic through the sans-IO handler (no socket): queue roles, the free page hint state
machine and its guards, hint validation and the sink, stats, inflate/deflate, reporting, broken devices."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence

import pytest

from fph.hint_receiver import (
    CMD_ID_DONE,
    CMD_ID_MIN,
    CMD_ID_STOP,
    F_DEFLATE_ON_OOM,
    F_FREE_PAGE_HINT,
    F_PAGE_POISON,
    F_REPORTING,
    F_STATS_VQ,
    BalloonDevice,
    HintState,
    QueueRole,
    RecordingSink,
    queue_roles,
)
from fph.vhost_user import message as m
from fph.vhost_user.errors import StateError
from fph.vhost_user.handler import VhostUserHandler
from fph.vhost_user.message import FrontendReq as R
from fph.vhost_user.message import Header, Message
from fph.virtio.mock import MockSplitQueue
from tests.fake_frontend import HINT_BLOCK, GuestRam

BASE = m.F_VERSION_1 | F_STATS_VQ | F_FREE_PAGE_HINT


class Channel:
    def __init__(self) -> None:
        self.changes = 0

    def config_changed(self) -> None:
        self.changes += 1


class Harness:
    """A started device: crafted front-end messages, mock driver queues, a recording sink."""

    def __init__(self, ram: GuestRam, features: int = BASE, sink: object | None = None) -> None:
        self.ram = ram
        self.sink = sink if sink is not None else RecordingSink()
        self.dev = BalloonDevice(self.sink, name="t", reporting=True, event_idx=True)  # type: ignore[arg-type]
        self.h = VhostUserHandler(self.dev, name="t")
        self.chan = Channel()
        self.dev.set_backend_channel(self.chan)
        self.roles = {r: i for i, r in queue_roles(features).items()}
        self.feed(R.SET_PROTOCOL_FEATURES, m.encode_u64(self.dev.protocol_features()))
        self.feed(R.SET_OWNER)
        self.feed(R.SET_FEATURES, m.encode_u64(features | m.F_PROTOCOL_FEATURES))
        s = ram.spec
        table = m.encode_mem_table([m.MemoryRegionMsg(s.gpa, s.size, s.uva, s.mmap_offset)])
        self.feed(R.SET_MEM_TABLE, table, (os.dup(ram.fd),))
        self.q: dict[int, MockSplitQueue] = {}
        self.errs: dict[int, int] = {}
        for i in range(len(self.roles)):
            q = self.q[i] = MockSplitQueue(ram.mem, ram.alloc, 64)
            self.feed(R.SET_VRING_NUM, m.VringState(i, 64).encode())
            self.feed(
                R.SET_VRING_ADDR,
                m.VringAddr(i, 0, self.uva(q.desc), self.uva(q.used), self.uva(q.avail), 0).encode(),
            )
            self.errs[i] = os.eventfd(0, os.EFD_NONBLOCK)
            self.feed(R.SET_VRING_ERR, m.encode_u64(i), (os.dup(self.errs[i]),))
            self.feed(R.SET_VRING_KICK, m.encode_u64(i | m.VRING_NOFD))
            self.feed(R.SET_VRING_ENABLE, m.VringState(i, 1).encode())
        if features & F_FREE_PAGE_HINT:
            # A fresh device announces DONE when its free page ring first runs (crash-restart safety).
            assert self.chan.changes == 1 and self.config_id() == CMD_ID_DONE
        self.chan.changes = 0

    def uva(self, gpa: int) -> int:
        return self.ram.spec.uva + gpa - self.ram.spec.gpa

    def feed(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        self.h.handle(Message(Header(req, m.VERSION, len(payload)), payload, fds))

    def queue(self, role: QueueRole) -> MockSplitQueue:
        return self.q[self.roles[role]]

    def kick(self, role: QueueRole) -> None:
        self.h.kick(self.roles[role])

    def cmd(self, cmd_id: int) -> None:
        buf = self.ram.alloc.alloc(4, 4)
        self.ram.mem.write_u32(buf, cmd_id)
        self.queue(QueueRole.FREE_PAGE).add_chain(out=[(buf, 4)])
        self.kick(QueueRole.FREE_PAGE)

    def hint(self, *ranges: tuple[int, int]) -> None:
        for gpa, length in ranges:
            self.queue(QueueRole.FREE_PAGE).add_chain(in_=[(gpa, length)])
        self.kick(QueueRole.FREE_PAGE)

    def config_id(self) -> int:
        return int(struct.unpack_from("<I", self.dev.get_config(0, 16), 8)[0])

    def all_returned(self, role: QueueRole = QueueRole.FREE_PAGE) -> bool:
        q = self.queue(role)
        return q.used_idx == q.avail_idx

    def close(self) -> None:
        self.h.close()
        for fd in self.errs.values():
            os.close(fd)


@pytest.fixture
def hx(ram: GuestRam) -> Iterator[Harness]:
    x = Harness(ram)
    yield x
    x.close()


def blocks(ram: GuestRam, n: int) -> list[tuple[int, int]]:
    return [(b, HINT_BLOCK) for b in ram.blocks[:n]]


def test_reporting_is_opt_in() -> None:
    assert not BalloonDevice().features() & F_REPORTING and BalloonDevice().num_queues == 4
    assert BalloonDevice(reporting=True).num_queues == 5


def test_queue_roles_are_compacted_like_linux() -> None:
    assert queue_roles(0) == {0: QueueRole.INFLATE, 1: QueueRole.DEFLATE}
    assert queue_roles(F_FREE_PAGE_HINT)[2] is QueueRole.FREE_PAGE
    assert queue_roles(F_REPORTING)[2] is QueueRole.REPORTING
    assert queue_roles(F_STATS_VQ | F_FREE_PAGE_HINT)[3] is QueueRole.FREE_PAGE
    assert queue_roles(F_STATS_VQ | F_REPORTING)[3] is QueueRole.REPORTING
    full = queue_roles(F_STATS_VQ | F_FREE_PAGE_HINT | F_REPORTING | F_PAGE_POISON | F_DEFLATE_ON_OOM)
    assert full == {
        0: QueueRole.INFLATE,
        1: QueueRole.DEFLATE,
        2: QueueRole.STATS,
        3: QueueRole.FREE_PAGE,
        4: QueueRole.REPORTING,
    }


def test_full_run(hx: Harness, ram: GuestRam) -> None:
    cmd = hx.dev.request_hints()
    assert cmd >= CMD_ID_MIN and hx.chan.changes == 1
    assert hx.config_id() == cmd and hx.dev.hinting.state is HintState.REQUESTED
    hx.cmd(cmd)
    assert hx.dev.hinting.state is HintState.START
    assert hx.config_id() == cmd  # kept while started (QEMU would expose 0 = STOP)
    hx.hint(*blocks(ram, 4))
    assert hx.sink.ranges(cmd) == blocks(ram, 4)
    hx.cmd(CMD_ID_STOP)
    st = hx.dev.status()
    assert st.state is HintState.STOP and st.blocks == 4 and st.hinted_bytes == 4 * HINT_BLOCK
    assert st.guest_cmd_id == CMD_ID_STOP and st.host_cmd_id == cmd
    assert hx.config_id() == CMD_ID_STOP
    assert hx.all_returned()
    assert len(hx.dev.hinting.latency_ns) == 4


def test_start_needs_requested_and_matching_id(hx: Harness, ram: GuestRam) -> None:
    cmd = hx.dev.request_hints()
    hx.cmd(cmd - 1)  # stale id of an earlier run
    assert hx.dev.hinting.state is HintState.REQUESTED
    hx.hint(*blocks(ram, 2))  # in-buffers outside START: dropped, but returned
    assert hx.sink.calls == [] and hx.dev.hinting.dropped == 2
    hx.cmd(CMD_ID_STOP)  # a stale STOP must not end the new request
    assert hx.dev.hinting.state is HintState.REQUESTED
    hx.cmd(cmd)
    assert hx.dev.hinting.state is HintState.START
    assert hx.all_returned()


def test_host_stop_then_late_hints_are_dropped(hx: Harness, ram: GuestRam) -> None:
    cmd = hx.dev.request_hints()
    hx.cmd(cmd)
    hx.hint(*blocks(ram, 1))
    hx.dev.stop_hints()
    assert hx.config_id() == CMD_ID_STOP and hx.chan.changes == 2
    hx.hint(*blocks(ram, 3)[1:])
    assert hx.sink.ranges() == blocks(ram, 1)
    hx.cmd(cmd)  # a replayed START after STOP does not restart the run
    assert hx.dev.hinting.state is HintState.STOP
    assert hx.all_returned()


def test_new_request_while_started_and_stale_stop(hx: Harness, ram: GuestRam) -> None:
    first = hx.dev.request_hints()
    hx.cmd(first)
    second = hx.dev.request_hints()
    assert second != first
    hx.hint(*blocks(ram, 1))  # late block of the first run
    hx.cmd(CMD_ID_STOP)  # the guest's STOP for the first run, arriving in REQUESTED
    assert hx.dev.hinting.state is HintState.REQUESTED
    hx.cmd(second)
    hx.hint(*blocks(ram, 2)[1:])
    assert [e for e, _ in hx.sink.calls] == [second]


def test_ids_wrap_and_skip_the_id_the_guest_still_runs(hx: Harness) -> None:
    hx.dev.hinting._last_id = 0xFFFF_FFFE
    a = hx.dev.request_hints()
    assert a == 0xFFFF_FFFF
    hx.cmd(a)  # the guest runs a and has not sent STOP
    hx.dev.hinting._last_id = a - 1  # force a full cycle back onto a
    b = hx.dev.request_hints()
    assert b != a and b == CMD_ID_MIN  # a skipped, wrapped past 0 and 1
    hx.cmd(CMD_ID_STOP)
    hx.dev.hinting._last_id = a - 1
    assert hx.dev.request_hints() == a  # reusable after the guest's STOP


def test_hint_validation_and_sink_errors(ram: GuestRam) -> None:
    class Refusing(RecordingSink):
        def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int:
            if any(length > HINT_BLOCK for _, length in ranges):
                raise ValueError("range too long for this test sink")
            return super().apply_hints(epoch, ranges)

    hx = Harness(ram, sink=Refusing())
    try:
        cmd = hx.dev.request_hints()
        hx.cmd(cmd)
        b = ram.blocks[0]
        hx.hint((b + 1, HINT_BLOCK - 4096), (b, 100))  # not page aligned
        assert hx.dev.hinting.rejected == 2 and hx.sink.calls == []
        hx.hint((ram.blocks[1], 2 * HINT_BLOCK))
        assert hx.dev.hinting.sink_errors == 1 and hx.dev.broken is None
        hx.hint((ram.blocks[3], HINT_BLOCK))
        assert hx.sink.ranges(cmd) == [(ram.blocks[3], HINT_BLOCK)]
        assert hx.all_returned()
    finally:
        hx.close()


def test_hint_outside_ram_breaks_the_device_and_returns_memory(hx: Harness, ram: GuestRam) -> None:
    cmd = hx.dev.request_hints()
    hx.cmd(cmd)
    hx.hint(*blocks(ram, 1))
    hx.hint((ram.spec.gpa + ram.spec.size, HINT_BLOCK))
    assert hx.dev.broken is not None and "outside guest memory" in hx.dev.broken
    assert os.eventfd_read(hx.errs[hx.roles[QueueRole.FREE_PAGE]]) == 1
    assert hx.config_id() == CMD_ID_DONE  # the guest gives back what it held
    assert hx.dev.status().broken
    with pytest.raises(StateError, match="broken"):
        hx.dev.request_hints()
    hx.feed(R.SET_OWNER)  # re-plug: a fresh device instance
    assert hx.dev.broken is None


def test_bad_command_buffer_breaks_the_device(hx: Harness) -> None:
    hx.dev.request_hints()
    buf = hx.ram.alloc.alloc(8, 8)
    hx.queue(QueueRole.FREE_PAGE).add_chain(out=[(buf, 8)])
    hx.kick(QueueRole.FREE_PAGE)
    assert hx.dev.broken is not None and "command id buffer of 8 bytes" in hx.dev.broken


def test_control_requires_negotiation_and_channel(ram: GuestRam) -> None:
    hx = Harness(ram, features=m.F_VERSION_1 | F_STATS_VQ)
    try:
        with pytest.raises(StateError, match="FREE_PAGE_HINT"):
            hx.dev.request_hints()
    finally:
        hx.close()
    dev = BalloonDevice()
    dev.set_features(BASE)
    with pytest.raises(StateError, match="channel"):
        dev.request_hints()


def test_done_and_stop_notify_once(hx: Harness) -> None:
    hx.dev.done()
    assert hx.chan.changes == 0  # already DONE
    hx.dev.request_hints()
    hx.dev.stop_hints()
    hx.dev.stop_hints()
    hx.dev.done()
    assert hx.chan.changes == 3 and hx.config_id() == CMD_ID_DONE and hx.dev.hinting.held_bytes == 0


def test_stats_buffer_is_held_and_refreshed(hx: Harness, ram: GuestRam) -> None:
    q = hx.queue(QueueRole.STATS)
    buf = ram.alloc.alloc(30, 8)
    ram.mem.write(buf, struct.pack("<HQHQHQ", 4, 100, 5, 200, 99, 7))
    q.add_chain(out=[(buf, 30)])
    hx.kick(QueueRole.STATS)
    stats = hx.dev.guest_stats()
    assert stats.values == {"free_memory": 100, "total_memory": 200, "tag_99": 7} and stats.updated
    assert q.used_idx == 0  # held
    assert hx.dev.request_stats()
    assert q.used_idx == 1 and not hx.dev.request_stats()


def test_inflate_discards_and_deflate_counts(hx: Harness, ram: GuestRam) -> None:
    page = ram.blocks[0]
    ram.mem.write(page, b"\x5a" * 8192)
    pfns = [page >> 12, (page >> 12) + 1, 0x1]  # the last one is outside guest memory
    buf = ram.alloc.alloc(12, 4)
    ram.mem.write(buf, struct.pack("<3I", *pfns))
    hx.queue(QueueRole.INFLATE).add_chain(out=[(buf, 12)])
    hx.kick(QueueRole.INFLATE)
    assert ram.mem.read(page, 8192) == bytes(8192)
    c = hx.dev.counters
    assert (c.inflated_pages, c.discarded_bytes, c.invalid_pfns) == (2, 8192, 1)
    hx.queue(QueueRole.DEFLATE).add_chain(out=[(buf, 8)])
    hx.kick(QueueRole.DEFLATE)
    assert c.deflated_pages == 2
    assert hx.all_returned(QueueRole.INFLATE) and hx.all_returned(QueueRole.DEFLATE)
    hx.dev.set_target(1234)
    assert hx.dev.get_config(0, 4) == struct.pack("<I", 1234) and hx.chan.changes == 1


@pytest.mark.parametrize("poison", [0, 0xAA])
def test_reporting_discards_unless_poisoned(ram: GuestRam, poison: int) -> None:
    hx = Harness(ram, features=BASE | F_REPORTING | F_PAGE_POISON)
    try:
        hx.dev.set_config(12, struct.pack("<I", poison), 0)
        block = ram.blocks[2]
        ram.mem.write(block, b"\xaa" * 4096)
        hx.queue(QueueRole.REPORTING).add_chain(in_=[(block, HINT_BLOCK)])
        hx.kick(QueueRole.REPORTING)
        assert hx.all_returned(QueueRole.REPORTING)
        kept = ram.mem.read(block, 4096) == b"\xaa" * 4096
        assert kept is bool(poison)
        assert hx.dev.counters.reported_bytes == (0 if poison else HINT_BLOCK)
    finally:
        hx.close()


def test_into_a_real_dirty_bitmap(ram: GuestRam) -> None:
    """The sink contract matches fph.dirty_bitmap.DirtyBitmap: hints of the open epoch clear bits."""
    from fph.dirty_bitmap import DirtyBitmap
    from fph.ram_layout import RamLayout, RamRange

    bitmap = DirtyBitmap(RamLayout([RamRange(ram.spec.gpa, ram.spec.size, 0)]))
    bitmap.mark_all()
    hx = Harness(ram, sink=bitmap)
    try:
        cmd = hx.dev.request_hints()
        bitmap.open_epoch(cmd)
        hx.cmd(cmd)
        hx.hint(*blocks(ram, 2))
        assert hx.dev.hinting.sink_errors == 0 and hx.dev.status().blocks == 2
        assert not bitmap.is_dirty(ram.blocks[0] >> 12) and not bitmap.is_dirty((ram.blocks[1] >> 12) + 1023)
        assert bitmap.is_dirty(ram.blocks[2] >> 12)
    finally:
        hx.close()


def test_entries_added_while_draining_are_not_stranded(ram: GuestRam) -> None:
    """With EVENT_IDX the driver does not kick for entries added before the device re-arms; the device
    must look again after writing avail_event."""

    class AddsMore(RecordingSink):
        def __init__(self) -> None:
            super().__init__()
            self.queue: MockSplitQueue | None = None

        def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int:
            if self.queue is not None and not self.calls:
                self.queue.add_chain(in_=[(ram.blocks[5], HINT_BLOCK)])  # the guest, racing, no kick
            return super().apply_hints(epoch, ranges)

    sink = AddsMore()
    hx = Harness(ram, features=BASE | m.F_EVENT_IDX, sink=sink)
    try:
        q = hx.queue(QueueRole.FREE_PAGE)
        cmd = hx.dev.request_hints()
        hx.cmd(cmd)
        sink.queue = q
        hx.hint((ram.blocks[0], HINT_BLOCK))
        assert sink.ranges(cmd) == [(ram.blocks[0], HINT_BLOCK), (ram.blocks[5], HINT_BLOCK)]
        assert hx.all_returned() and q.avail_event == q.avail_idx
    finally:
        hx.close()


def test_hints_before_a_broken_chain_still_reach_the_sink(hx: Harness, ram: GuestRam) -> None:
    cmd = hx.dev.request_hints()
    hx.cmd(cmd)
    q = hx.queue(QueueRole.FREE_PAGE)
    q.add_chain(in_=[(ram.blocks[0], HINT_BLOCK)])
    q.add_chain(in_=[(ram.spec.gpa + ram.spec.size, HINT_BLOCK)])  # outside RAM, same kick
    hx.kick(QueueRole.FREE_PAGE)
    assert hx.dev.broken is not None
    assert hx.sink.ranges(cmd) == [(ram.blocks[0], HINT_BLOCK)]


def test_done_without_a_channel_is_not_pretended(hx: Harness, ram: GuestRam) -> None:
    cmd = hx.dev.request_hints()
    hx.cmd(cmd)
    hx.hint(*blocks(ram, 2))
    hx.dev.set_backend_channel(None)  # QEMU closed the channel (device_del in progress)
    hx.dev.done()
    assert hx.dev.status().held_bytes == 2 * HINT_BLOCK  # the guest was not told
    with pytest.raises(StateError, match="channel"):
        hx.dev.set_target(10)
    hx.dev.set_backend_channel(hx.chan)
    hx.kick(QueueRole.FREE_PAGE)  # the next time the ring runs, DONE is announced
    assert hx.chan.changes == 2 and hx.config_id() == CMD_ID_DONE
    assert hx.dev.status().held_bytes == 0


def test_held_bytes_count_each_block_once_across_runs(hx: Harness, ram: GuestRam) -> None:
    """The shrinker gives a held block back unseen and the driver hints it again in a later run: held
    bytes count it once (they once grew to 3.5x guest RAM over repeated runs); DONE clears them."""
    for _ in range(3):
        cmd = hx.dev.request_hints()
        hx.cmd(cmd)
        hx.hint(*blocks(ram, 2))  # the same two blocks every run
        hx.dev.stop_hints()
    st = hx.dev.status()
    assert st.held_bytes == 2 * HINT_BLOCK and st.hinted_bytes == 2 * HINT_BLOCK
    hx.dev.done()
    assert hx.dev.status().held_bytes == 0
