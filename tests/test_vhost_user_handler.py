"""The sans-IO protocol core, message by message: crafted messages in, replies and actions out. No socket."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from fph.hint_receiver import BalloonDevice, RecordingSink
from fph.vhost_user import message as m
from fph.vhost_user.errors import MessageError, ProtocolError, UnknownRequestError
from fph.vhost_user.handler import AdoptBackendChannel, Result, UnwatchKick, VhostUserHandler, WatchKick
from fph.vhost_user.message import FrontendReq as R
from fph.vhost_user.message import Header, Message
from fph.virtio.mock import MockSplitQueue
from tests.fake_frontend import GuestRam, MiB

GUEST_RAM = (16 * MiB, 0x4000_0000)
"""The ``ram`` fixture's size and guest-physical address here (tests/conftest.py)."""

DRIVER_FEATURES = m.F_VERSION_1 | (1 << 1) | (1 << 3)  # VERSION_1, STATS_VQ, FREE_PAGE_HINT


class Channel:
    def __init__(self) -> None:
        self.changes = 0

    def config_changed(self) -> None:
        self.changes += 1


def feed(
    h: VhostUserHandler,
    req: int,
    payload: bytes = b"",
    fds: tuple[int, ...] = (),
    *,
    need_reply: bool = False,
) -> Result:
    flags = m.VERSION | (m.NEED_REPLY if need_reply else 0)
    return h.handle(Message(Header(req, flags, len(payload)), payload, fds))


def reply_u64(res: Result, req: int) -> int:
    assert res.reply is not None
    request, flags, size = m.HEADER.unpack_from(res.reply)
    assert (request, flags, size) == (req, 0x5, 8)
    return m.decode_u64(res.reply[12:])


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def dev() -> BalloonDevice:
    return BalloonDevice(RecordingSink(), name="t")


@pytest.fixture
def h(dev: BalloonDevice) -> Iterator[VhostUserHandler]:
    handler = VhostUserHandler(dev, name="t")
    yield handler
    handler.close()


def negotiate(h: VhostUserHandler, features: int = DRIVER_FEATURES) -> None:
    feed(h, R.SET_PROTOCOL_FEATURES, m.encode_u64(h.backend.protocol_features()))
    feed(h, R.SET_OWNER)
    feed(h, R.SET_FEATURES, m.encode_u64(features | m.F_PROTOCOL_FEATURES))


def mem_table(h: VhostUserHandler, ram: GuestRam) -> Result:
    s = ram.spec
    table = m.encode_mem_table([m.MemoryRegionMsg(s.gpa, s.size, s.uva, s.mmap_offset)])
    return feed(h, R.SET_MEM_TABLE, table, (os.dup(ram.fd),), need_reply=True)


def setup_ring(
    h: VhostUserHandler, ram: GuestRam, index: int, size: int = 64
) -> tuple[MockSplitQueue, int, Result]:
    q = MockSplitQueue(ram.mem, ram.alloc, size)
    uva = lambda gpa: ram.spec.uva + gpa - ram.spec.gpa  # noqa: E731
    feed(h, R.SET_VRING_NUM, m.VringState(index, size).encode())
    feed(h, R.SET_VRING_BASE, m.VringState(index, 0).encode())
    feed(h, R.SET_VRING_ADDR, m.VringAddr(index, 0, uva(q.desc), uva(q.used), uva(q.avail), q.used).encode())
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    res = feed(h, R.SET_VRING_KICK, m.encode_u64(index), (kick,))
    return q, kick, res


def test_get_features_reply_is_exact(h: VhostUserHandler, dev: BalloonDevice) -> None:
    res = feed(h, R.GET_FEATURES)
    assert reply_u64(res, R.GET_FEATURES) == dev.features() | m.F_PROTOCOL_FEATURES
    assert reply_u64(feed(h, R.GET_QUEUE_NUM), R.GET_QUEUE_NUM) == dev.num_queues == 4
    protocol = reply_u64(feed(h, R.GET_PROTOCOL_FEATURES), R.GET_PROTOCOL_FEATURES)
    for bit in (
        m.ProtocolFeature.MQ,
        m.ProtocolFeature.REPLY_ACK,
        m.ProtocolFeature.BACKEND_REQ,
        m.ProtocolFeature.CONFIG,
        m.ProtocolFeature.LOG_SHMFD,
    ):
        assert protocol & bit


def test_reply_ack_only_when_negotiated(h: VhostUserHandler) -> None:
    assert feed(h, R.SET_OWNER, need_reply=True).reply is None
    feed(h, R.SET_PROTOCOL_FEATURES, m.encode_u64(m.ProtocolFeature.REPLY_ACK))
    assert reply_u64(feed(h, R.SET_OWNER, need_reply=True), R.SET_OWNER) == 0
    assert feed(h, R.SET_OWNER).reply is None
    # A request with its own reply is not acked twice.
    res = feed(h, R.GET_FEATURES, need_reply=True)
    assert res.reply is not None and len(res.reply) == 20


def test_feature_acks_must_be_offered(h: VhostUserHandler) -> None:
    with pytest.raises(ProtocolError, match="never offered"):
        feed(h, R.SET_FEATURES, m.encode_u64(1 << 60))
    assert h.acked_features == 0
    with pytest.raises(ProtocolError, match="never offered"):
        feed(h, R.SET_PROTOCOL_FEATURES, m.encode_u64(1 << 40))


def test_fds_are_closed_when_a_message_is_refused(h: VhostUserHandler) -> None:
    extra = os.eventfd(0)
    with pytest.raises(MessageError):
        feed(h, R.SET_FEATURES, m.encode_u64(0), (extra,))
    assert not fd_is_open(extra)
    unknown = os.eventfd(0)
    with pytest.raises(UnknownRequestError):
        feed(h, 99, b"", (unknown,))
    assert not fd_is_open(unknown)
    bad_kick = os.eventfd(0)
    with pytest.raises(MessageError, match="NOFD"):
        feed(h, R.SET_VRING_KICK, m.encode_u64(m.VRING_NOFD | 0), (bad_kick,))
    assert not fd_is_open(bad_kick)
    with pytest.raises(MessageError, match="vring index"):
        feed(h, R.SET_VRING_NUM, m.VringState(7, 64).encode())


def test_mem_table_fd_mismatch(h: VhostUserHandler, ram: GuestRam) -> None:
    s = ram.spec
    table = m.encode_mem_table([m.MemoryRegionMsg(s.gpa, s.size, s.uva, 0)] * 2)
    fd = os.dup(ram.fd)
    with pytest.raises(MessageError, match="fds for 2 regions"):
        feed(h, R.SET_MEM_TABLE, table, (fd,))
    assert not fd_is_open(fd) and h.memory is None


def test_ring_lifecycle(h: VhostUserHandler, ram: GuestRam, dev: BalloonDevice) -> None:
    negotiate(h)
    assert reply_u64(mem_table(h, ram), R.SET_MEM_TABLE) == 0
    assert h.memory is not None and h.memory.end == ram.spec.gpa + ram.spec.size
    q, kick, res = setup_ring(h, ram, 3)
    assert res.actions == [WatchKick(3, kick)]
    vring = h.vrings[3]
    assert vring.started and not vring.enabled
    assert vring.queue.desc_table == q.desc  # converted from the front-end address once
    assert (
        reply_u64(
            feed(h, R.SET_VRING_ENABLE, m.VringState(3, 1).encode(), need_reply=True), R.SET_VRING_ENABLE
        )
        == 0
    )
    assert vring.active
    res = feed(h, R.GET_VRING_BASE, m.VringState(3, 0).encode())
    assert res.actions == [UnwatchKick(3, kick)]
    assert res.reply is not None and m.VringState.decode(res.reply[12:]) == m.VringState(3, 0)
    assert not vring.started and not fd_is_open(kick)
    with pytest.raises(ProtocolError, match="16 bits"):
        feed(h, R.SET_VRING_BASE, m.VringState(3, 1 << 16).encode())


def test_ring_address_outside_memory(h: VhostUserHandler, ram: GuestRam) -> None:
    negotiate(h)
    with pytest.raises(ProtocolError, match="before SET_MEM_TABLE"):
        feed(h, R.SET_VRING_ADDR, m.VringAddr(0, 0, 0, 0, 0, 0).encode())
    mem_table(h, ram)
    feed(h, R.SET_VRING_NUM, m.VringState(0, 64).encode())
    with pytest.raises(ProtocolError, match="in no region"):
        feed(h, R.SET_VRING_ADDR, m.VringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0).encode())
    assert h.vrings[0].uva is None


def test_backend_channel_is_handed_to_the_transport(h: VhostUserHandler) -> None:
    a, b = os.pipe()
    res = feed(h, R.SET_BACKEND_REQ_FD, b"", (a,))
    assert res.actions == [AdoptBackendChannel(a)]
    assert fd_is_open(a)
    os.close(a)
    os.close(b)


def test_config_get_set(h: VhostUserHandler, dev: BalloonDevice) -> None:
    negotiate(h)
    res = feed(h, R.GET_CONFIG, m.ConfigMsg(0, 16, 0, bytes(16)).encode())
    assert res.reply is not None
    assert m.HEADER.unpack_from(res.reply) == (R.GET_CONFIG, 0x5, 28)
    cfg = m.ConfigMsg.decode(res.reply[12:], with_data=True)
    assert struct.unpack("<IIII", cfg.data) == (0, 0, 1, 0)  # fresh fph exposes DONE
    # The front-end writes the whole config, read-only fields included: only actual/poison_val change.
    feed(h, R.SET_CONFIG, m.ConfigMsg(0, 16, 0, struct.pack("<IIII", 77, 5, 0x8000_0002, 0xAA)).encode())
    assert (dev.num_pages, dev.actual, dev.poison_val) == (0, 5, 0xAA)
    assert dev.config_bytes()[8:12] == struct.pack("<I", 1)
    res = feed(h, R.GET_CONFIG, m.ConfigMsg(12, 8, 0, bytes(8)).encode())  # beyond the 16 bytes
    assert res.reply is not None and struct.unpack_from("<III", res.reply, 12)[1] == 0
    with pytest.raises(MessageError):
        feed(h, R.GET_CONFIG, m.ConfigMsg(0, 16, 0, bytes(16)).encode()[:20])


def test_dirty_log_of_used_ring_writes(h: VhostUserHandler, ram: GuestRam, dev: BalloonDevice) -> None:
    negotiate(h, DRIVER_FEATURES | m.F_LOG_ALL)
    mem_table(h, ram)
    dev.set_backend_channel(Channel())
    size = ram.mem.end // 4096 // 8
    logfd = os.memfd_create("log")
    os.ftruncate(logfd, size)
    view = mmap.mmap(logfd, size)
    res = feed(h, R.SET_LOG_BASE, m.LOG_BASE.pack(size, 0), (os.dup(logfd),))
    assert reply_u64(res, R.SET_LOG_BASE) == 0
    os.close(logfd)
    q = MockSplitQueue(ram.mem, ram.alloc, 64)
    uva = lambda gpa: ram.spec.uva + gpa - ram.spec.gpa  # noqa: E731
    feed(h, R.SET_VRING_NUM, m.VringState(3, 64).encode())
    feed(
        h,
        R.SET_VRING_ADDR,
        m.VringAddr(3, m.VRING_F_LOG, uva(q.desc), uva(q.used), uva(q.avail), q.used).encode(),
    )
    feed(h, R.SET_VRING_KICK, m.encode_u64(3 | m.VRING_NOFD))
    feed(h, R.SET_VRING_ENABLE, m.VringState(3, 1).encode())
    buf = ram.alloc.alloc(4, 4)
    ram.mem.write_u32(buf, 0)
    q.add_chain(out=[(buf, 4)])
    feed(h, R.VRING_KICK, m.VringState(3, 0).encode())
    assert q.used_idx == 1
    page = q.used // 4096
    word = int.from_bytes(view[(page >> 6) * 8 : (page >> 6) * 8 + 8], "little")
    assert word == 1 << (page & 63)
    view.close()


def test_second_set_owner_resets_for_replug(h: VhostUserHandler, ram: GuestRam, dev: BalloonDevice) -> None:
    negotiate(h)
    mem_table(h, ram)
    _, kick, _ = setup_ring(h, ram, 0)
    res = feed(h, R.SET_OWNER)
    assert res.actions == [UnwatchKick(0, kick)]
    assert not h.vrings[0].started and h.acked_features == 0 and dev.acked == 0


def test_mem_table_is_replaced_whole_and_rings_retranslated(h: VhostUserHandler, ram: GuestRam) -> None:
    negotiate(h)
    mem_table(h, ram)
    q, _, _ = setup_ring(h, ram, 0)
    first = h.memory
    # The front-end remaps the same RAM at another virtual address: a new table, same rings.
    moved = m.MemoryRegionMsg(ram.spec.gpa, ram.spec.size, ram.spec.uva + (1 << 40), 0)
    feed(h, R.SET_MEM_TABLE, m.encode_mem_table([moved]), (os.dup(ram.fd),))
    assert h.memory is not first and h.memory is not None
    assert all(r.mm.closed for r in first.regions)  # type: ignore[union-attr]
    assert h.vrings[0].queue.desc_table == q.desc
    # A table that no longer covers a ring is refused and the working map stays.
    other = GuestRam(4 * MiB, gpa=0x1000_0000)
    try:
        s = other.spec
        table = m.encode_mem_table([m.MemoryRegionMsg(s.gpa, s.size, s.uva, 0)])
        current = h.memory
        with pytest.raises(ProtocolError):
            feed(h, R.SET_MEM_TABLE, table, (os.dup(other.fd),))
        assert h.memory is current
    finally:
        other.close()
