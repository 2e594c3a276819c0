"""A fake vhost-user front-end (QEMU's side) and a model of the Linux virtio_balloon driver, for fast
end-to-end tests of fph's balloon over a real Unix socket.

Guest memory is a memfd the fake shares with the device (as QEMU does with ``memory-backend-memfd``), kicks
and calls are real eventfds, the back-end channel is a socketpair. The message sequence follows what QEMU
11.1 sends; the driver model follows ``drivers/virtio/virtio_balloon.c``: START out-buffer, one 4 MiB
in-buffer per free max-order block while more than one ring entry is free, STOP out-buffer; DONE returns
every held block.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from fph.hint_receiver import (
    CMD_ID_DONE,
    CMD_ID_STOP,
    F_FREE_PAGE_HINT,
    F_PAGE_POISON,
    F_STATS_VQ,
    QueueRole,
    queue_roles,
)
from fph.vhost_user import message as m
from fph.vhost_user.message import FrontendReq as R
from fph.virtio.memory import GuestMemory, memfd_region
from fph.virtio.mock import BumpAllocator, MockSplitQueue
from fph.waiting import poll_until, retry_until

MiB = 1 << 20
HINT_BLOCK = 4 * MiB


class GuestRam:
    """A memfd-backed guest RAM region plus a driver-side view of it."""

    def __init__(self, size: int = 64 * MiB, gpa: int = 0, uva: int = 0x7F12_0000_0000) -> None:
        self.fd, self.spec = memfd_region(size, gpa=gpa, uva=uva)
        self.mem = GuestMemory.from_fds([self.spec], [self.fd])
        # Rings and small buffers live in the first 4 MiB; the rest is "free memory" in 4 MiB blocks.
        self.alloc = BumpAllocator(gpa + 4096, gpa + HINT_BLOCK)
        self.blocks = list(range(gpa + HINT_BLOCK, gpa + size, HINT_BLOCK))

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrontendError(AssertionError):
    pass


class FakeFrontend:
    """Synchronous QEMU stand-in on the front-end side of one vhost-user socket."""

    def __init__(self, path: str, ram: GuestRam, *, queue_size: int = 256, timeout: float = 15.0) -> None:
        self.path = path
        self.ram = ram
        self.queue_size = queue_size
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        not_listening = (FileNotFoundError, ConnectionRefusedError)
        retry_until(lambda: self.sock.connect(path), timeout, not_listening, 0.01)
        self.protocol_features = 0
        self.offered_features = 0
        self.num_queues = 0
        self.backend: socket.socket | None = None
        self.kicks: list[int] = []
        self.calls: list[int] = []
        self.errs: list[int] = []
        self.queues: dict[int, MockSplitQueue] = {}
        #: Next avail index per ring as QEMU last learned it (GET_VRING_BASE); sent back on SET_VRING_BASE.
        self.bases: dict[int, int] = {}

    # ------------------------------------------------------------------ raw messages

    def send(
        self, req: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False
    ) -> None:
        flags = m.VERSION | (m.NEED_REPLY if need_reply else 0)
        data = m.encode(req, payload, flags)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise FrontendError("back-end closed the connection")
            buf += chunk
        return buf

    def recv_reply(self, req: int) -> bytes:
        header = m.Header.unpack(self.recv_exact(self.sock, m.HEADER_SIZE))
        if header.flags != m.REPLY_FLAGS:
            raise FrontendError(f"reply flags {header.flags:#x}, QEMU requires exactly {m.REPLY_FLAGS:#x}")
        if header.request != req:
            raise FrontendError(f"reply to {header.request}, expected {req}")
        return self.recv_exact(self.sock, header.size)

    def call(
        self, req: R, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False
    ) -> bytes | None:
        self.send(req, payload, fds, need_reply=need_reply)
        replies = m.REQUESTS[req].replies
        if req == R.SET_LOG_BASE and self.protocol_features & m.ProtocolFeature.LOG_SHMFD:
            replies = True
        if replies or (need_reply and self.protocol_features & m.ProtocolFeature.REPLY_ACK):
            reply = self.recv_reply(req)
            if not replies and reply != m.encode_u64(0):
                raise FrontendError(f"{req.name}: REPLY_ACK status {reply.hex()}")
            return reply
        return None

    def call_u64(self, req: R) -> int:
        reply = self.call(req)
        assert reply is not None
        return m.decode_u64(reply)

    def is_closed(self, timeout: float = 2.0) -> bool:
        """True once the back-end has closed the socket (EOF)."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True

    # ------------------------------------------------------------------ QEMU sequences

    def realize(self) -> None:
        """What QEMU sends when the device is created."""
        self.offered_features = self.call_u64(R.GET_FEATURES)
        offered_protocol = self.call_u64(R.GET_PROTOCOL_FEATURES)
        self.protocol_features = offered_protocol & 0x3_FFFF
        self.call(R.SET_PROTOCOL_FEATURES, m.encode_u64(self.protocol_features))
        self.num_queues = self.call_u64(R.GET_QUEUE_NUM)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend = ours
        self.backend.settimeout(self.timeout)
        self.call(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()], need_reply=True)
        theirs.close()
        self.call(R.SET_OWNER)
        self.call_u64(R.GET_FEATURES)
        self._close_eventfds()
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.num_queues)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.num_queues)]
        self.errs = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.num_queues)]
        for i in range(self.num_queues):
            self.call(R.SET_VRING_CALL, m.encode_u64(i), [self.calls[i]])
            self.call(R.SET_VRING_ERR, m.encode_u64(i), [self.errs[i]])

    def layout_queues(self, count: int) -> dict[int, MockSplitQueue]:
        self.queues = {i: MockSplitQueue(self.ram.mem, self.ram.alloc, self.queue_size) for i in range(count)}
        self.bases = {}
        return self.queues

    def start(self, features: int, *, before_kick: Callable[[], None] | None = None) -> None:
        """Guest set DRIVER_OK: QEMU starts the vhost device (SET_FEATURES ... SET_VRING_ENABLE)."""
        self.call(R.SET_FEATURES, m.encode_u64(features | m.F_PROTOCOL_FEATURES))
        spec = self.ram.spec
        table = m.encode_mem_table([m.MemoryRegionMsg(spec.gpa, spec.size, spec.uva, spec.mmap_offset)])
        self.call(R.SET_MEM_TABLE, table, [self.ram.fd], need_reply=True)
        if before_kick is not None:
            before_kick()
        for i, q in self.queues.items():
            self.call(R.SET_VRING_NUM, m.VringState(i, q.size).encode())
            self.call(R.SET_VRING_BASE, m.VringState(i, self.bases.get(i, 0)).encode())
            self.call(
                R.SET_VRING_ADDR,
                m.VringAddr(i, 0, self.uva(q.desc), self.uva(q.used), self.uva(q.avail), 0).encode(),
            )
            self.call(R.SET_VRING_KICK, m.encode_u64(i), [self.kicks[i]])
            self.call(R.SET_VRING_CALL, m.encode_u64(i), [self.calls[i]])
        for i in self.queues:
            self.call(R.SET_VRING_ENABLE, m.VringState(i, 1).encode(), need_reply=True)

    def stop(self) -> list[int]:
        """Device stop (guest reset, device_del): disable then GET_VRING_BASE every ring."""
        for i in self.queues:
            self.call(R.SET_VRING_ENABLE, m.VringState(i, 0).encode(), need_reply=True)
        bases = []
        for i in self.queues:
            reply = self.call(R.GET_VRING_BASE, m.VringState(i, 0).encode())
            assert reply is not None
            bases.append(m.VringState.decode(reply).num)
            self.bases[i] = bases[-1]
        return bases

    def uva(self, gpa: int) -> int:
        return self.ram.spec.uva + gpa - self.ram.spec.gpa

    def get_config(self, size: int = 16) -> bytes:
        reply = self.call(R.GET_CONFIG, m.ConfigMsg(0, size, 0, bytes(size)).encode())
        assert reply is not None
        cfg = m.ConfigMsg.decode(reply, with_data=True)
        return cfg.data

    def config_cmd_id(self) -> int:
        return int(struct.unpack_from("<I", self.get_config(), 8)[0])

    def set_config(self, offset: int, data: bytes) -> None:
        self.call(R.SET_CONFIG, m.ConfigMsg(offset, len(data), 0, data).encode(), need_reply=True)

    def wait_config_change(self, timeout: float | None = None) -> bool:
        """Read one CONFIG_CHANGE_MSG from the back-end channel and ack it (as QEMU does)."""
        assert self.backend is not None
        r, _, _ = select.select([self.backend], [], [], self.timeout if timeout is None else timeout)
        if not r:
            return False
        header = m.Header.unpack(self.recv_exact(self.backend, m.HEADER_SIZE))
        if header.request != m.BackendReq.CONFIG_CHANGE_MSG or header.size != 0:
            raise FrontendError(f"unexpected back-end request {header.request} size {header.size}")
        if header.need_reply:
            self.backend.sendall(m.encode_reply(header.request, m.encode_u64(0)))
        return True

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def wait_call(self, index: int, timeout: float | None = None) -> bool:
        r, _, _ = select.select([self.calls[index]], [], [], self.timeout if timeout is None else timeout)
        if not r:
            return False
        os.eventfd_read(self.calls[index])
        return True

    def wait_until(
        self, cond: Callable[[], bool], timeout: float | None = None, what: str = "condition"
    ) -> None:
        if not poll_until(cond, self.timeout if timeout is None else timeout, 0.001):
            raise FrontendError(f"timed out waiting for {what}")

    def _close_eventfds(self) -> None:
        for fd in self.kicks + self.calls + self.errs:
            os.close(fd)
        self.kicks, self.calls, self.errs = [], [], []

    def close(self) -> None:
        self.sock.close()
        if self.backend is not None:
            self.backend.close()
        self._close_eventfds()


class LinuxBalloonDriver:
    """The guest side: probe (stats buffer before DRIVER_OK, poison value), config change handling, the
    free page hint run, DONE. Memory is the GuestRam's 4 MiB blocks."""

    def __init__(self, fe: FakeFrontend, features: int | None = None, poison_val: int = 0) -> None:
        self.fe = fe
        offered = fe.offered_features
        wanted = features if features is not None else offered & ~m.F_PROTOCOL_FEATURES & ~m.F_LOG_ALL
        if not poison_val:
            wanted &= ~F_PAGE_POISON  # virtballoon_validate() clears it without poisoning
        self.features = wanted
        self.poison_val = poison_val
        self.roles = {role: i for i, role in queue_roles(wanted).items()}
        self.free = list(fe.ram.blocks)
        self.held: list[int] = []
        self.cmd_id_active = 0
        ram = fe.ram
        self.cmd_buf = ram.alloc.alloc(4, 4)
        self.stop_buf = ram.alloc.alloc(4, 4)
        self.stats_buf = ram.alloc.alloc(10 * 10, 8)
        ram.mem.write_u32(self.stop_buf, CMD_ID_STOP)
        self.runs: list[tuple[int, int]] = []  # (cmd id, blocks hinted)

    def queue(self, role: QueueRole) -> MockSplitQueue:
        return self.fe.queues[self.roles[role]]

    def probe(self, stats: dict[int, int] | None = None) -> None:
        fe = self.fe
        fe.layout_queues(len(self.roles))
        if self.features & F_STATS_VQ:
            self.write_stats(stats or {4: 100 * MiB, 5: 256 * MiB})
            self.queue(QueueRole.STATS).add_chain(out=[(self.stats_buf, 20)])  # posted in init_vqs()
        if self.features & F_PAGE_POISON:
            fe.set_config(12, struct.pack("<I", self.poison_val))
        fe.start(self.features)

    def write_stats(self, stats: dict[int, int]) -> None:
        data = b"".join(struct.pack("<HQ", tag, value) for tag, value in list(stats.items())[:2])
        self.fe.ram.mem.write(self.stats_buf, data.ljust(20, b"\0"))

    def config_changed(self) -> None:
        """virtballoon_changed() + report_free_page_func()."""
        if not self.features & F_FREE_PAGE_HINT:
            return
        cmd = self.fe.config_cmd_id()
        if cmd == CMD_ID_DONE:
            self.free.extend(self.held)
            self.held.clear()
        elif cmd != CMD_ID_STOP and cmd != self.cmd_id_active:
            self.run(cmd)

    def run(self, cmd: int) -> int:
        fe = self.fe
        q = self.queue(QueueRole.FREE_PAGE)
        q.reap()
        self.cmd_id_active = cmd
        fe.ram.mem.write_u32(self.cmd_buf, cmd)
        q.add_chain(out=[(self.cmd_buf, 4)])
        fe.kick(self.roles[QueueRole.FREE_PAGE])
        hinted = 0
        while self.free:
            if fe.backend is not None and select.select([fe.backend], [], [], 0)[0]:
                break  # a config interrupt: the id changed, end this run (the worker re-reads it)
            q.reap()
            block = self.free.pop()
            if q.num_free > 1:
                q.add_chain(in_=[(block, HINT_BLOCK)])
                fe.kick(self.roles[QueueRole.FREE_PAGE])
                self.held.append(block)
                hinted += 1
            else:
                self.free.append(block)
                break
        q.add_chain(out=[(self.stop_buf, 4)])
        fe.kick(self.roles[QueueRole.FREE_PAGE])
        self.runs.append((cmd, hinted))
        return hinted

    def drain(self, role: QueueRole = QueueRole.FREE_PAGE) -> None:
        """Wait until the device has returned every buffer of a queue."""
        q = self.queue(role)
        self.fe.wait_until(lambda: q.used_idx == q.avail_idx, what=f"{role.value} queue drained")
        q.reap()


def boot(path: str, ram: GuestRam, **driver_args: Any) -> tuple[FakeFrontend, LinuxBalloonDriver]:
    """QEMU starts the device on the vhost-user socket at ``path``; the Linux driver probes it."""
    fe = FakeFrontend(path, ram)
    fe.realize()
    drv = LinuxBalloonDriver(fe, **driver_args)
    drv.probe()
    return fe, drv


def boot_and_read_done(
    path: str, ram: GuestRam, **driver_args: Any
) -> tuple[FakeFrontend, LinuxBalloonDriver]:
    """:func:`boot`, then the driver reads the DONE that a fresh device announces."""
    fe, drv = boot(path, ram, **driver_args)
    assert fe.wait_config_change()  # a fresh device announces DONE
    drv.config_changed()
    return fe, drv


def guest_hints(fe: FakeFrontend, drv: LinuxBalloonDriver) -> None:
    """The guest reads the new command id, hints its free blocks and sends its STOP; returns once fph has
    taken every buffer."""
    assert fe.wait_config_change()
    drv.config_changed()
    drv.drain()
