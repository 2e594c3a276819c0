"""A hostile or buggy front-end on one VM's socket: it never leaks fph's fds or mappings and never stalls the
event loop that serves every VM's balloon.

"No leak" is counted (``/proc/self/fd`` and the memfd mappings in ``/proc/self/maps``, before and after 200
hostile messages or connect-disconnect cycles); "no stall" is timed (a healthy front-end on another socket of
the same server keeps getting replies within 100 ms). The fake front-ends (tests/fake_frontend.py) talk to
fph over real Unix sockets; fph's loop runs on a thread of this process, so both sides' fds are counted and
every test closes its own.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fph.hint_receiver import BalloonDevice, QueueRole, RecordingSink, ThreadedHintReceiver
from fph.vhost_user import message as m
from fph.vhost_user.connection import MAX_QUEUED_BYTES, VhostUserConnection
from fph.vhost_user.errors import GuestMemoryError, ProtocolError, VirtQueueError
from fph.vhost_user.handler import VhostUserHandler
from fph.vhost_user.message import FrontendReq as R
from fph.vhost_user.message import Header, Message
from fph.vhost_user.vring import Vring
from fph.virtio.memory import MAX_REGIONS, PAGE_SIZE, GuestMemory, RegionSpec, VhostLog, memfd_region
from fph.virtio.mock import BumpAllocator
from fph.virtio.queue import MAX_QUEUE_SIZE, SplitQueue
from fph.waiting import poll_until
from tests.fake_frontend import HINT_BLOCK, FakeFrontend, GuestRam, MiB, boot

pytestmark = pytest.mark.timeout(120)
RECEIVER_CLOSE_S = 0.5
"""How long the ``receiver`` fixture's close waits for the guests to read DONE (tests/conftest.py)."""

U64 = 1 << 64
STALL_S = 0.1
"""A healthy front-end's round trip must stay under this while another VM's front-end misbehaves."""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("/memfd:" in line for line in f)


def settled(expected: int, probe: Callable[[], int] = open_fds) -> int:
    """``probe()`` once it equals ``expected`` (the loop thread may still be closing), else its last value."""
    return poll_until(probe, 2.0, 0.01, until=lambda n: n == expected)


def wait_disconnected(receiver: ThreadedHintReceiver, path: str) -> None:
    assert poll_until(lambda: not receiver.connected(path), 2.0, 0.005), "fph kept the connection"


def live_connection(receiver: ThreadedHintReceiver, path: str) -> VhostUserConnection:
    conn = poll_until(lambda: receiver.connection(path), 2.0, 0.005)
    assert conn is not None, "fph did not accept the front-end"
    return conn


def send_and_close(fe: FakeFrontend, req: int, payload: bytes, fds: list[int]) -> None:
    """Send a message with fds (fph gets its own copies) and close ours."""
    try:
        socket.send_fds(fe.sock, [m.encode(req, payload)], fds)
    finally:
        for fd in fds:
            os.close(fd)


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- hostile

Hostile = Callable[[FakeFrontend, GuestRam], str]
"""Sends one hostile message; returns what the reason fph closes the connection with must contain."""


def bad_region(gpa: int, size: int, uva: int, offset: int, expected: str) -> Hostile:
    def send(fe: FakeFrontend, ram: GuestRam) -> str:
        table = m.encode_mem_table([m.MemoryRegionMsg(gpa, size, uva, offset)])
        send_and_close(fe, R.SET_MEM_TABLE, table, [os.dup(ram.fd)])
        return expected

    return send


def too_many_regions(fe: FakeFrontend, ram: GuestRam) -> str:
    region = m.MemoryRegionMsg(0, PAGE_SIZE, 0, 0)
    payload = m.MEM_TABLE_HEAD.pack(m.MAX_FDS + 1, 0) + region.encode() * (m.MAX_FDS + 1)
    send_and_close(fe, R.SET_MEM_TABLE, payload, [os.dup(ram.fd) for _ in range(m.MAX_FDS)])
    return f"at most {m.MAX_FDS}"


def log_offset_overflow(fe: FakeFrontend, ram: GuestRam) -> str:
    send_and_close(fe, R.SET_LOG_BASE, m.LOG_BASE.pack(4096, U64 - 8), [os.dup(ram.fd)])
    return "log offset"


def backend_channel_pipe(fe: FakeFrontend, ram: GuestRam) -> str:
    r, w = os.pipe()
    os.close(w)
    send_and_close(fe, R.SET_BACKEND_REQ_FD, b"", [r])
    return "not a socket"


def backend_channel_datagram(fe: FakeFrontend, ram: GuestRam) -> str:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.close()
    send_and_close(fe, R.SET_BACKEND_REQ_FD, b"", [b.detach()])
    return "not a Unix stream socket"


def fd_on_request_without_fds(fe: FakeFrontend, ram: GuestRam) -> str:
    send_and_close(fe, R.SET_FEATURES, m.encode_u64(0), eventfds(1))
    return "1 fds attached, expected 0..0"


def fd_on_get_features(fe: FakeFrontend, ram: GuestRam) -> str:
    send_and_close(fe, R.GET_FEATURES, b"", eventfds(3))
    return "3 fds attached, expected 0..0"


def unsupported_add_mem_reg(fe: FakeFrontend, ram: GuestRam) -> str:
    region = m.MemoryRegionMsg(0, PAGE_SIZE, 0, 0).encode()
    send_and_close(fe, R.ADD_MEM_REG, bytes(8) + region, [os.dup(ram.fd)])
    return "unsupported request id 37"


def oversized_payload(fe: FakeFrontend, ram: GuestRam) -> str:
    fds = eventfds(2)
    try:
        socket.send_fds(fe.sock, [m.HEADER.pack(R.SET_CONFIG, m.VERSION, 1 << 20)], fds)
    finally:
        for fd in fds:
            os.close(fd)
    return f"exceeds {m.MAX_PAYLOAD}"


def too_many_fds(fe: FakeFrontend, ram: GuestRam) -> str:
    send_and_close(fe, R.SET_VRING_CALL, m.encode_u64(0), eventfds(m.MAX_FDS + 4))
    return "control data truncated"


def kick_on_missing_ring(fe: FakeFrontend, ram: GuestRam) -> str:
    send_and_close(fe, R.SET_VRING_KICK, m.encode_u64(200), eventfds(1))
    return "vring index 200"


def vring_num(num: int) -> Hostile:
    def send(fe: FakeFrontend, ram: GuestRam) -> str:
        fe.send(R.SET_VRING_NUM, m.VringState(0, num).encode())
        return "not a power of two"

    return send


GIB = 1 << 30
HOSTILE: dict[str, Hostile] = {
    "mmap_offset_near_2_64": bad_region(0, 8 * MiB, 0x7F00_0000_0000, U64 - PAGE_SIZE, "overflows 64 bits"),
    "mmap_length_past_ssize_t": bad_region(0, 8 * MiB, 0x7F00_0000_0000, 1 << 63, "cannot map region"),
    "gpa_plus_size_overflows": bad_region(U64 - PAGE_SIZE, 8 * MiB, 0x7F00_0000_0000, 0, "overflows 64 bits"),
    "uva_plus_size_overflows": bad_region(GIB, 8 * MiB, U64 - PAGE_SIZE, 0, "overflows 64 bits"),
    "empty_region": bad_region(GIB, 0, 0x7F00_0000_0000, 0, "empty or not page aligned"),
    "unaligned_mmap_offset": bad_region(GIB, 4 * MiB, 0x7F00_0000_0000, 100, "not page aligned"),
    "too_many_regions": too_many_regions,
    "log_offset_overflow": log_offset_overflow,
    "backend_channel_pipe": backend_channel_pipe,
    "backend_channel_datagram": backend_channel_datagram,
    "fd_on_request_without_fds": fd_on_request_without_fds,
    "fds_on_get_features": fd_on_get_features,
    "unsupported_add_mem_reg": unsupported_add_mem_reg,
    "oversized_payload_with_fds": oversized_payload,
    "too_many_fds": too_many_fds,
    "kick_on_missing_ring": kick_on_missing_ring,
    "queue_size_above_32768": vring_num(2 * MAX_QUEUE_SIZE),
    "queue_size_not_power_of_two": vring_num(1000),
}


def hostile_cycle(receiver: ThreadedHintReceiver, path: str, ram: GuestRam, kind: str) -> None:
    fe = FakeFrontend(path, ram)
    try:
        conn = live_connection(receiver, path)
        expected = HOSTILE[kind](fe, ram)
        assert fe.is_closed(), f"{kind}: fph should close the connection"
    finally:
        fe.sock.close()
    wait_disconnected(receiver, path)
    assert conn.close_reason is not None and expected in conn.close_reason, (kind, conn.close_reason)


@pytest.fixture
def small_ram() -> Iterator[GuestRam]:
    with GuestRam(8 * MiB, gpa=GIB) as ram:
        yield ram


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_message_is_refused_and_its_fds_closed(
    receiver: ThreadedHintReceiver, small_ram: GuestRam, tmp_path: Path, kind: str
) -> None:
    path = str(tmp_path / "bad.sock")
    receiver.add_vm(path)
    hostile_cycle(receiver, path, small_ram, kind)  # warm-up: lazily opened fds (the loop's, logging's)
    fds, maps = open_fds(), memfd_mappings()
    hostile_cycle(receiver, path, small_ram, kind)
    assert settled(fds) == fds
    assert memfd_mappings() == maps
    # The socket serves the next front-end as usual.
    fe = FakeFrontend(path, small_ram)
    fe.realize()
    fe.close()


def test_200_hostile_messages_leak_no_fd(
    receiver: ThreadedHintReceiver, small_ram: GuestRam, tmp_path: Path
) -> None:
    path = str(tmp_path / "bad.sock")
    receiver.add_vm(path)
    kinds = sorted(HOSTILE)
    for kind in kinds:
        hostile_cycle(receiver, path, small_ram, kind)
    fds, maps = open_fds(), memfd_mappings()
    for i in range(200):
        hostile_cycle(receiver, path, small_ram, kinds[i % len(kinds)])
    assert settled(fds) == fds
    assert memfd_mappings() == maps


def test_200_connect_disconnect_cycles_leak_nothing(
    receiver: ThreadedHintReceiver, small_ram: GuestRam, balloon_socket: str
) -> None:
    """A full start each time (memory table, rings, kick/call/err fds, back-end channel), then a drop."""
    receiver.add_vm(balloon_socket)

    def cycle() -> None:
        small_ram.alloc = BumpAllocator(small_ram.spec.gpa + 4096, small_ram.spec.gpa + HINT_BLOCK)
        fe, _ = boot(balloon_socket, small_ram)
        fe.close()
        wait_disconnected(receiver, balloon_socket)

    cycle()
    fds, maps = open_fds(), memfd_mappings()
    for _ in range(200):
        cycle()
    assert settled(fds) == fds
    assert settled(maps, memfd_mappings) == maps


def test_backend_channel_replaced_200_times_and_closed_on_disconnect(
    receiver: ThreadedHintReceiver, small_ram: GuestRam, balloon_socket: str
) -> None:
    receiver.add_vm(balloon_socket)
    baseline = open_fds()
    fe = FakeFrontend(balloon_socket, small_ram)
    fe.realize()  # sends the first SET_BACKEND_REQ_FD
    assert fe.backend is not None
    fe.call_u64(R.GET_QUEUE_NUM)  # the last SET_VRING_ERRs have no reply: wait until fph holds their fds
    fds = open_fds()
    for _ in range(200):
        ours, theirs = socket.socketpair()
        fe.call(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()], need_reply=True)
        theirs.close()
        old, fe.backend = fe.backend, ours
        old.settimeout(2.0)
        assert old.recv(1) == b"", "fph should close the channel it replaced"
        old.close()
    assert settled(fds) == fds
    conn = live_connection(receiver, balloon_socket)
    assert conn.backend_channel is not None
    fe.close()
    wait_disconnected(receiver, balloon_socket)
    assert settled(baseline) == baseline


def test_unsolicited_reply_on_the_backend_channel_closes_it(
    receiver: ThreadedHintReceiver, small_ram: GuestRam, balloon_socket: str
) -> None:
    receiver.add_vm(balloon_socket)
    fe = FakeFrontend(balloon_socket, small_ram)
    fe.realize()
    assert fe.backend is not None
    fe.backend.sendall(m.encode_reply(m.BackendReq.CONFIG_CHANGE_MSG, m.encode_u64(0)))
    assert fe.backend.recv(1) == b""  # fph asked nothing: the channel is dropped, not the connection
    assert fe.call_u64(R.GET_QUEUE_NUM) == fe.num_queues
    fe.close()


# ---------------------------------------------------------------------------------------------- stalls


def fill_pipe(fd: int) -> None:
    """Fill a pipe to capacity and leave it blocking, as a front-end that never reads its call fd would."""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(fd, bytes(65536))
    os.set_blocking(fd, True)


def round_trip(fe: FakeFrontend) -> float:
    t0 = time.monotonic()
    fe.call_u64(R.GET_FEATURES)
    return time.monotonic() - t0


def test_full_blocking_call_pipe_does_not_stall_other_vms(
    receiver: ThreadedHintReceiver, ram: GuestRam, tmp_path: Path
) -> None:
    bad_path, good_path = str(tmp_path / "bad.sock"), str(tmp_path / "good.sock")
    receiver.add_vm(bad_path)
    receiver.add_vm(good_path)
    good_ram = GuestRam(8 * MiB)
    good = FakeFrontend(good_path, good_ram)
    good.realize()
    bad, drv = boot(bad_path, ram)
    inflate = drv.roles[QueueRole.INFLATE]
    q = drv.queue(QueueRole.INFLATE)
    r, w = os.pipe()
    try:
        fill_pipe(w)
        bad.call(R.SET_VRING_CALL, m.encode_u64(inflate), [w], need_reply=True)
        pfns = ram.alloc.alloc(4, 4)
        ram.mem.write_u32(pfns, ram.blocks[0] >> 12)
        worst = 0.0
        for n in range(1, 21):  # every returned buffer is a call notification into the full pipe
            q.add_chain(out=[(pfns, 4)])
            bad.kick(inflate)
            worst = max(worst, round_trip(good))
            bad.wait_until(lambda n=n: q.used_idx == n, 2.0, "fph to return the inflate buffer")
        assert worst < STALL_S, f"a healthy front-end waited {worst * 1000:.0f} ms"
        assert bad.call_u64(R.GET_QUEUE_NUM) == bad.num_queues  # the bad VM's own connection still works
    finally:
        os.set_blocking(r, False)  # unblock a loop stuck in write() so that teardown can run
        with contextlib.suppress(BlockingIOError):
            while os.read(r, 65536):
                pass
        os.close(r)
        os.close(w)
        bad.close()
        good.close()
        good_ram.close()


def test_received_fds_are_made_non_blocking(
    receiver: ThreadedHintReceiver, small_ram: GuestRam, balloon_socket: str
) -> None:
    receiver.add_vm(balloon_socket)
    fe = FakeFrontend(balloon_socket, small_ram)
    fe.realize()
    r, w = os.pipe()
    assert os.get_blocking(w)
    fe.call(R.SET_VRING_ERR, m.encode_u64(0), [w], need_reply=True)
    # fph's copy shares the open file description with ours, so its O_NONBLOCK shows here.
    assert not os.get_blocking(w)
    os.close(r)
    os.close(w)
    fe.close()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_kick_pipe_at_eof_is_unwatched_not_spun(
    receiver: ThreadedHintReceiver, ram: GuestRam, balloon_socket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipe whose writer is gone is readable forever; watching it would spin the shared loop."""
    receiver.add_vm(balloon_socket)
    fe, drv = boot(balloon_socket, ram)
    r, w = os.pipe()
    os.close(w)
    fe.call(R.SET_VRING_KICK, m.encode_u64(drv.roles[QueueRole.INFLATE]), [r], need_reply=True)
    os.close(r)
    assert poll_until(lambda: "is at EOF" in caplog.text, 2.0, 0.01)
    before = cpu_seconds()
    time.sleep(0.5)
    assert cpu_seconds() - before < 0.25, "the event loop is spinning"
    assert fe.call_u64(R.GET_QUEUE_NUM) == fe.num_queues
    fe.close()


def test_kick_fd_that_cannot_be_polled_is_refused(
    receiver: ThreadedHintReceiver, ram: GuestRam, balloon_socket: str
) -> None:
    receiver.add_vm(balloon_socket)
    fds = open_fds()
    fe, drv = boot(balloon_socket, ram)
    conn = live_connection(receiver, balloon_socket)
    memfd = os.memfd_create("not-an-eventfd")
    fe.send(R.SET_VRING_KICK, m.encode_u64(drv.roles[QueueRole.INFLATE]), [memfd])
    os.close(memfd)
    assert fe.is_closed()
    assert conn.close_reason is not None and "cannot be watched" in conn.close_reason
    fe.close()
    wait_disconnected(receiver, balloon_socket)
    assert settled(fds) == fds


def test_a_flood_does_not_starve_other_vms(
    receiver: ThreadedHintReceiver, small_ram: GuestRam, tmp_path: Path
) -> None:
    """One front-end writes requests as fast as it can; fph handles a bounded batch per wake-up."""
    bad_path, good_path = str(tmp_path / "bad.sock"), str(tmp_path / "good.sock")
    receiver.add_vm(bad_path)
    receiver.add_vm(good_path)
    good = FakeFrontend(good_path, small_ram)
    good.realize()
    bad = FakeFrontend(bad_path, small_ram)
    bad.realize()
    burst = m.encode(R.SET_STATUS, m.encode_u64(0)) * 4096  # no replies: only fph's reading is measured
    stop = threading.Event()

    def flood() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                bad.sock.sendall(burst)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        time.sleep(0.1)
        worst = max(round_trip(good) for _ in range(30))
    finally:
        stop.set()
        flooder.join(10)
    assert worst < STALL_S, f"a healthy front-end waited {worst * 1000:.0f} ms during a flood"
    bad.close()
    good.close()


def test_a_front_end_that_never_reads_its_replies_is_dropped(
    receiver: ThreadedHintReceiver, small_ram: GuestRam, balloon_socket: str
) -> None:
    receiver.add_vm(balloon_socket)
    fe = FakeFrontend(balloon_socket, small_ram)
    conn = live_connection(receiver, balloon_socket)
    requests = m.encode(R.GET_FEATURES) * (4 * MAX_QUEUED_BYTES // 20)  # replies: 20 bytes each
    with contextlib.suppress(OSError):  # fph may reset the connection before it has read them all
        fe.sock.sendall(requests)
    wait_disconnected(receiver, balloon_socket)
    assert conn.close_reason is not None and "does not read" in conn.close_reason
    fe.close()


# ---------------------------------------------------------------------------------------------- sans-IO


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (RegionSpec(0, 8 * MiB, 0, U64 - PAGE_SIZE), "overflows 64 bits"),
        (RegionSpec(U64 - PAGE_SIZE, 2 * PAGE_SIZE, 0, 0), "overflows 64 bits"),
        (RegionSpec(0, 2 * PAGE_SIZE, U64 - PAGE_SIZE, 0), "overflows 64 bits"),
        (RegionSpec(0, 0, 0, 0), "empty"),
        (RegionSpec(0, PAGE_SIZE + 1, 0, 0), "not page aligned"),
        (RegionSpec(100, PAGE_SIZE, 0, 0), "not page aligned"),
        (RegionSpec(0, PAGE_SIZE, 0, 100), "not page aligned"),
        (RegionSpec(-PAGE_SIZE, PAGE_SIZE, 0, 0), "not a u64"),
        (RegionSpec(0, 8 * MiB, 0, 1 << 63), "cannot map"),
    ],
)
def test_region_numbers_are_checked_before_mmap(spec: RegionSpec, message: str) -> None:
    fd, _ = memfd_region(8 * MiB)
    try:
        with pytest.raises(GuestMemoryError, match=message):
            GuestMemory.from_fds([spec], [fd])
    finally:
        os.close(fd)


def test_region_count_and_fd_count_are_capped() -> None:
    fd, spec = memfd_region(PAGE_SIZE)
    try:
        specs = [RegionSpec(i * PAGE_SIZE, PAGE_SIZE, i * PAGE_SIZE, 0) for i in range(MAX_REGIONS + 1)]
        with pytest.raises(GuestMemoryError, match=f"at most {MAX_REGIONS}"):
            GuestMemory.from_fds(specs, [fd] * len(specs))
        with pytest.raises(GuestMemoryError, match="2 fds for 1"):
            GuestMemory.from_fds([spec], [fd, fd])
        GuestMemory.from_fds(specs[:MAX_REGIONS], [fd] * MAX_REGIONS).close()
    finally:
        os.close(fd)


@pytest.mark.parametrize(("size", "offset"), [(4096, U64 - 8), (4096, 4), (4096, -8), (1 << 63, 0)])
def test_dirty_log_numbers_are_checked_before_mmap(size: int, offset: int) -> None:
    fd = os.memfd_create("log")
    try:
        with pytest.raises(GuestMemoryError):
            VhostLog(fd, size, offset)
    finally:
        os.close(fd)


def test_queue_sizes_are_powers_of_two_up_to_32768() -> None:
    q = SplitQueue(MAX_QUEUE_SIZE)
    q.set_size(MAX_QUEUE_SIZE)
    for bad in (0, 3, 1000, 2 * MAX_QUEUE_SIZE, 1 << 32):
        with pytest.raises(VirtQueueError, match="power of two"):
            q.set_size(bad)
    for bad in (0, 1000, 2 * MAX_QUEUE_SIZE):
        with pytest.raises(ValueError, match="max queue size"):
            SplitQueue(bad)


def test_device_with_an_impossible_queue_size_refuses_connections_without_leaking(
    receiver: ThreadedHintReceiver, small_ram: GuestRam, balloon_socket: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.add_vm(balloon_socket, queue_size=2 * MAX_QUEUE_SIZE)
    fds = open_fds()
    for _ in range(3):
        fe = FakeFrontend(balloon_socket, small_ram)
        assert fe.is_closed()
        fe.close()
    assert settled(fds) == fds
    assert "cannot serve the new front-end connection" in caplog.text


def test_handler_closes_the_fds_on_an_error_outside_the_tree(small_ram: GuestRam) -> None:
    """A device bug during SET_MEM_TABLE: the error reaches the transport (which drops the connection) and
    the message's fds are closed, not leaked."""

    class Buggy(BalloonDevice):
        def set_memory(self, mem: GuestMemory | None) -> None:
            if mem is not None:
                raise RuntimeError("device bug")

    h = VhostUserHandler(Buggy(RecordingSink()), name="t")
    s = small_ram.spec
    table = m.encode_mem_table([m.MemoryRegionMsg(s.gpa, s.size, s.uva, 0)])
    fd = os.dup(small_ram.fd)
    with pytest.raises(RuntimeError, match="device bug"):
        h.handle(Message(Header(R.SET_MEM_TABLE, m.VERSION, len(table)), table, (fd,)))
    with pytest.raises(OSError):
        os.fstat(fd)
    bad = os.dup(small_ram.fd)
    region = m.encode_mem_table([m.MemoryRegionMsg(s.gpa, s.size, s.uva, U64 - PAGE_SIZE)])
    with pytest.raises(ProtocolError, match="overflows 64 bits"):
        h.handle(Message(Header(R.SET_MEM_TABLE, m.VERSION, len(region)), region, (bad,)))
    with pytest.raises(OSError):
        os.fstat(bad)
    h.close()


def test_full_call_fd_drops_the_notification(small_ram: GuestRam) -> None:
    vring = Vring(0, 64)
    r, w = os.pipe()
    fill_pipe(w)
    os.set_blocking(w, False)  # what the transport does on arrival
    vring.call_fd, vring.err_fd = w, os.dup(w)
    vring.queue.size = 64
    vring.queue.avail_ring = small_ram.spec.gpa  # flags 0: the driver wants interrupts
    t0 = time.monotonic()
    vring.signal_used(small_ram.mem)  # no EVENT_IDX: reads the avail flags (0: wants an interrupt)
    vring.signal_error()
    assert time.monotonic() - t0 < STALL_S
    os.close(r)
    vring.close()
