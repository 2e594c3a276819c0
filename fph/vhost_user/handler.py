"""vhost-user protocol semantics, sans-IO: feed a message (header, payload, fds), get the reply bytes and
a list of actions for the transport (watch a kick fd, adopt the back-end channel). No sockets here.

Every fd handed in is owned by the handler from then on: kept (memory, eventfds, log) or closed, also when the
message is rejected. A message is validated completely before it changes state, so a rejected message
leaves the protocol state as it was. Any :class:`ProtocolError` means: close the connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from fph.vhost_user import message as m
from fph.vhost_user.backend import VhostUserBackend
from fph.vhost_user.errors import GuestMemoryError, MessageError, ProtocolError, VhostUserError
from fph.vhost_user.handover import FdTable, HandlerState, LogState, MemoryRegionState
from fph.vhost_user.message import FrontendReq as R
from fph.vhost_user.message import Message, ProtocolFeature
from fph.vhost_user.vring import Vring
from fph.virtio.memory import GuestMemory, RegionSpec, VhostLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchKick:
    index: int
    fd: int


@dataclass(frozen=True)
class UnwatchKick:
    index: int
    fd: int


@dataclass(frozen=True)
class AdoptBackendChannel:
    """The transport takes ownership of ``fd`` (a socket) and gives the device a BackendChannel."""

    fd: int


Action = WatchKick | UnwatchKick | AdoptBackendChannel


@dataclass
class Result:
    reply: bytes | None = None
    actions: list[Action] = field(default_factory=list)


class VhostUserHandler:
    def __init__(self, backend: VhostUserBackend, name: str = "vhost-user") -> None:
        self.backend = backend
        self.name = name
        self.owner = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.memory: GuestMemory | None = None
        self.log: VhostLog | None = None
        self.status = 0
        self.vrings = [Vring(i, backend.max_queue_size) for i in range(backend.num_queues)]
        self._dispatch: dict[R, Callable[[Message, list[int], Result], None]] = {
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.SET_OWNER: self._set_owner,
            R.RESET_OWNER: self._reset_owner,
            R.RESET_DEVICE: self._reset_owner,
            R.SET_MEM_TABLE: self._set_mem_table,
            R.SET_LOG_BASE: self._set_log_base,
            R.SET_LOG_FD: self._set_log_fd,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_fd,
            R.SET_VRING_CALL: self._set_vring_fd,
            R.SET_VRING_ERR: self._set_vring_fd,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.GET_QUEUE_NUM: self._get_queue_num,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            R.GET_CONFIG: self._get_config,
            R.SET_CONFIG: self._set_config,
            R.VRING_KICK: self._vring_kick,
            R.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: self._get_status,
        }

    # ------------------------------------------------------------------ hand-over (a worker upgrade)

    def export_state(self, fds: FdTable) -> HandlerState:
        """Everything a successor needs to serve this connection from where it is; the fds go in ``fds``."""
        mem, vlog = self.memory, self.log
        return HandlerState(
            owner=self.owner,
            acked_features=self.acked_features,
            acked_protocol_features=self.acked_protocol_features,
            status=self.status,
            regions=[MemoryRegionState(r.spec, fds.add(r.fd)) for r in (mem.regions if mem else [])],
            log=LogState(fds.add(vlog.fd), vlog.mmap_size, vlog.mmap_offset) if vlog else None,
            vrings=[v.export_state(fds) for v in self.vrings],
        )

    @classmethod
    def from_state(
        cls, backend: VhostUserBackend, state: HandlerState, fds: FdTable, name: str = "vhost-user"
    ) -> VhostUserHandler:
        """A handler that goes on from a predecessor's ``state``. It keeps duplicates of the fds it uses
        (the caller closes ``fds``); on error everything it took is released again."""
        h = cls(backend, name)
        if len(state.vrings) != len(h.vrings):
            raise ProtocolError(f"hand-over has {len(state.vrings)} rings, this device {len(h.vrings)}")
        try:
            if state.regions:
                specs = [r.spec for r in state.regions]
                h.memory = GuestMemory.from_fds(specs, [fds.get(r.fd) for r in state.regions])
            if state.log is not None:
                h.log = VhostLog(fds.get(state.log.fd), state.log.mmap_size, state.log.mmap_offset)
            h.owner, h.status = state.owner, state.status
            h.acked_features, h.acked_protocol_features = state.acked_features, state.acked_protocol_features
            for vring, vs in zip(h.vrings, state.vrings, strict=True):
                vring.import_state(vs, h.memory, fds)
                vring.queue.log = h.log if h.acked_features & m.F_LOG_ALL else None
        except BaseException:
            h.close()
            raise
        backend.set_memory(h.memory)
        return h

    # ------------------------------------------------------------------ entry points

    def handle(self, msg: Message) -> Result:
        """Process one front-end request. Raises ProtocolError (fds already closed) on bad input."""
        fds = list(msg.fds)
        try:
            request = m.check_request(msg.header, msg.payload, msg.fds)
            result = Result()
            self._dispatch[request](msg, fds, result)
        except ProtocolError:
            _close_all(fds)
            raise
        except VhostUserError as exc:
            _close_all(fds)
            raise ProtocolError(f"{_name(msg.header.request)}: {exc}") from exc
        except BaseException:
            _close_all(fds)  # a bug, or an error from outside the tree, must not leak the message's fds
            raise
        _close_all(fds)  # whatever the request handler did not take
        spec = m.REQUESTS[request]
        if msg.header.need_reply and not spec.replies and self._has(ProtocolFeature.REPLY_ACK):
            result.reply = m.encode_reply(request, m.encode_u64(0))
        return result

    def kick(self, index: int) -> None:
        """The kick eventfd of ring ``index`` fired (already drained by the transport)."""
        vring = self.vrings[index]
        if vring.active:
            self.backend.process_queue(vring)

    def used_ring_ranges(self) -> list[tuple[int, int]]:
        """GPA ranges of the used rings: the back-end writes them, so no guest store ever logs them."""
        return [
            (v.queue.used_ring, 6 + 8 * v.queue.size)
            for v in self.vrings
            if v.queue.size and v.queue.used_ring
        ]

    def close(self) -> None:
        """The connection is gone: drop fds and mappings, tell the device."""
        for vring in self.vrings:
            vring.close()
        self.backend.set_backend_channel(None)
        self.backend.reset()
        self.backend.set_memory(None)
        self._swap_memory(None)
        self._set_log(None)

    # ------------------------------------------------------------------ helpers

    def _has(self, feature: ProtocolFeature) -> bool:
        return bool(self.acked_protocol_features & feature)

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise MessageError(f"vring index {index} >= {len(self.vrings)} queues")
        return self.vrings[index]

    def _swap_memory(self, mem: GuestMemory | None) -> None:
        old, self.memory = self.memory, mem
        if old is not None:
            old.close()

    def _set_log(self, vlog: VhostLog | None) -> None:
        old, self.log = self.log, vlog
        for vring in self.vrings:
            vring.queue.log = vlog if self.acked_features & m.F_LOG_ALL else None
        if old is not None:
            old.close()

    def _apply_ring_addresses(self, vring: Vring) -> None:
        if vring.uva is None or self.memory is None:
            return
        desc_uva, avail_uva, used_uva = vring.uva
        q, mem = vring.queue, self.memory
        try:
            desc = mem.uva_to_gpa(desc_uva, 16 * q.size)
            avail = mem.uva_to_gpa(avail_uva, 6 + 2 * q.size)
            used = mem.uva_to_gpa(used_uva, 6 + 8 * q.size)
        except GuestMemoryError as exc:
            raise ProtocolError(f"vring {vring.index}: {exc}") from exc
        q.set_addresses(mem, desc, avail, used)
        q.log_used_gpa = vring.log_guest_addr if vring.log_flag else None

    def _start_ring(self, vring: Vring) -> None:
        if self.memory is None or vring.uva is None:
            raise ProtocolError(f"vring {vring.index} kicked before memory table and ring addresses")
        vring.queue.restart(self.memory)
        vring.started = True

    def _stop_ring(self, vring: Vring, result: Result) -> None:
        if vring.kick_fd is not None:
            result.actions.append(UnwatchKick(vring.index, vring.kick_fd))
            vring.replace_fd("kick_fd", None)
        was_started = vring.started
        vring.started = False
        vring.queue.ready = False
        if was_started:
            self.backend.queue_stopped(vring)

    # ------------------------------------------------------------------ requests

    def _get_features(self, msg: Message, fds: list[int], res: Result) -> None:
        res.reply = m.encode_reply(
            R.GET_FEATURES, m.encode_u64(self.backend.features() | m.F_PROTOCOL_FEATURES)
        )

    def _set_features(self, msg: Message, fds: list[int], res: Result) -> None:
        features = m.decode_u64(msg.payload)
        offered = self.backend.features() | m.F_PROTOCOL_FEATURES
        if features & ~offered:
            raise ProtocolError(f"SET_FEATURES {features:#x} acks bits never offered ({offered:#x})")
        self.acked_features = features
        for vring in self.vrings:
            vring.queue.event_idx = bool(features & m.F_EVENT_IDX)
            vring.queue.indirect = bool(features & m.F_INDIRECT_DESC)
            vring.queue.log = self.log if features & m.F_LOG_ALL else None
            if not features & m.F_PROTOCOL_FEATURES:
                vring.enabled = True  # without protocol features rings are enabled from the start
        self.backend.set_features(features & ~m.F_PROTOCOL_FEATURES)

    def _set_owner(self, msg: Message, fds: list[int], res: Result) -> None:
        if self.owner:
            log.info("%s: SET_OWNER again on the same connection: device re-plugged, resetting", self.name)
            self._reset(res)
        self.owner = True

    def _reset_owner(self, msg: Message, fds: list[int], res: Result) -> None:
        self._reset(res)
        self.owner = False

    def _reset(self, res: Result) -> None:
        for vring in self.vrings:
            self._stop_ring(vring, res)
            vring.enabled = False
            vring.uva = None  # the next device instance sets its own rings
            q = vring.queue
            q.next_avail = q.desc_table = q.avail_ring = q.used_ring = 0
        self.acked_features = 0
        self.backend.reset()

    def _set_mem_table(self, msg: Message, fds: list[int], res: Result) -> None:
        regions = m.decode_mem_table(msg.payload, len(fds))
        specs = [
            RegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in regions
        ]
        new = GuestMemory.from_fds(specs, fds)
        old_mem = self.memory
        self.memory = new
        try:
            # Ring GPAs stay valid across a new table (front-end addresses may not): re-check bounds only.
            for vring in self.vrings:
                q = vring.queue
                if q.desc_table:
                    try:
                        q.set_addresses(new, q.desc_table, q.avail_ring, q.used_ring)
                    except VhostUserError as exc:
                        raise ProtocolError(
                            f"vring {vring.index} is outside the new memory table: {exc}"
                        ) from exc
        except VhostUserError:
            self.memory = old_mem
            new.close()
            raise
        if old_mem is not None:
            old_mem.close()
        self.backend.set_memory(new)

    def _set_log_base(self, msg: Message, fds: list[int], res: Result) -> None:
        size, offset = m.LOG_BASE.unpack(msg.payload)
        if self.memory is not None and size * 8 * 4096 < self.memory.end:
            raise ProtocolError(
                f"SET_LOG_BASE: log of {size} bytes cannot cover guest memory up to {self.memory.end:#x}"
            )
        self._set_log(VhostLog(fds[0], size, offset))
        if self._has(ProtocolFeature.LOG_SHMFD):
            res.reply = m.encode_reply(R.SET_LOG_BASE, m.encode_u64(0))

    def _set_log_fd(self, msg: Message, fds: list[int], res: Result) -> None:
        pass  # fph never pokes the log eventfd; the fd is closed with the unclaimed ones

    def _set_vring_num(self, msg: Message, fds: list[int], res: Result) -> None:
        state = m.VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if vring.started:
            raise ProtocolError(f"SET_VRING_NUM on started vring {state.index}")
        vring.queue.set_size(state.num)

    def _set_vring_addr(self, msg: Message, fds: list[int], res: Result) -> None:
        addr = m.VringAddr.decode(msg.payload)
        vring = self._vring(addr.index)
        if addr.flags & ~m.VRING_F_LOG:
            raise ProtocolError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        if self.memory is None:
            raise ProtocolError("SET_VRING_ADDR before SET_MEM_TABLE")
        saved = (vring.uva, vring.log_flag, vring.log_guest_addr)
        vring.uva = (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
        vring.log_flag = bool(addr.flags & m.VRING_F_LOG)
        vring.log_guest_addr = addr.log_guest_addr
        try:
            self._apply_ring_addresses(vring)
        except VhostUserError:
            vring.uva, vring.log_flag, vring.log_guest_addr = saved
            raise

    def _set_vring_base(self, msg: Message, fds: list[int], res: Result) -> None:
        state = m.VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if state.num > 0xFFFF:
            raise ProtocolError(
                f"SET_VRING_BASE: base {state.num} exceeds 16 bits (packed rings unsupported)"
            )
        if vring.started:
            raise ProtocolError(f"SET_VRING_BASE on started vring {state.index}")
        vring.queue.next_avail = state.num

    def _get_vring_base(self, msg: Message, fds: list[int], res: Result) -> None:
        state = m.VringState.decode(msg.payload)
        vring = self._vring(state.index)
        self._stop_ring(vring, res)
        res.reply = m.encode_reply(
            R.GET_VRING_BASE, m.VringState(state.index, vring.queue.next_avail).encode()
        )

    def _set_vring_fd(self, msg: Message, fds: list[int], res: Result) -> None:
        value = m.decode_u64(msg.payload)
        vring = self._vring(value & m.VRING_INDEX_MASK)
        if value & ~(m.VRING_INDEX_MASK | m.VRING_NOFD):
            raise ProtocolError(f"{_name(msg.header.request)}: unknown bits in {value:#x}")
        nofd = bool(value & m.VRING_NOFD)
        if nofd == bool(fds):
            raise MessageError(f"{_name(msg.header.request)}: NOFD={nofd} with {len(fds)} fds")
        fd = fds.pop() if fds else None
        request = msg.header.request
        if request == R.SET_VRING_CALL:
            vring.replace_fd("call_fd", fd)
        elif request == R.SET_VRING_ERR:
            vring.replace_fd("err_fd", fd)
        else:
            if vring.kick_fd is not None:
                res.actions.append(UnwatchKick(vring.index, vring.kick_fd))
            vring.replace_fd("kick_fd", fd)
            if fd is not None:
                res.actions.append(WatchKick(vring.index, fd))
            # libvhost-user starts the ring here; polling mode (NOFD) starts it too.
            self._start_ring(vring)
            if vring.active:
                self.backend.process_queue(vring)

    def _get_protocol_features(self, msg: Message, fds: list[int], res: Result) -> None:
        res.reply = m.encode_reply(R.GET_PROTOCOL_FEATURES, m.encode_u64(self.backend.protocol_features()))

    def _set_protocol_features(self, msg: Message, fds: list[int], res: Result) -> None:
        features = m.decode_u64(msg.payload)
        if features & ~self.backend.protocol_features():
            raise ProtocolError(f"SET_PROTOCOL_FEATURES {features:#x} acks bits never offered")
        self.acked_protocol_features = features

    def _get_queue_num(self, msg: Message, fds: list[int], res: Result) -> None:
        res.reply = m.encode_reply(R.GET_QUEUE_NUM, m.encode_u64(len(self.vrings)))

    def _set_vring_enable(self, msg: Message, fds: list[int], res: Result) -> None:
        state = m.VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if self.acked_features and not self.acked_features & m.F_PROTOCOL_FEATURES:
            # Without bit 30 every ring is enabled from the start and cannot be toggled (vhost-user spec).
            raise ProtocolError("SET_VRING_ENABLE although VHOST_USER_F_PROTOCOL_FEATURES was not acked")
        if state.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: value {state.num} is not 0 or 1")
        vring.enabled = bool(state.num)
        # The stats buffer is queued before DRIVER_OK (its kick went to QEMU): look at the ring now.
        if vring.active:
            self.backend.process_queue(vring)

    def _set_backend_req_fd(self, msg: Message, fds: list[int], res: Result) -> None:
        res.actions.append(AdoptBackendChannel(fds.pop()))

    def _get_config(self, msg: Message, fds: list[int], res: Result) -> None:
        req = m.ConfigMsg.decode(msg.payload, with_data=False)
        try:
            data = self.backend.get_config(req.offset, req.size)
        except ValueError as exc:
            log.error("%s: GET_CONFIG offset=%d size=%d refused: %s", self.name, req.offset, req.size, exc)
            res.reply = m.encode_reply(R.GET_CONFIG, m.ConfigMsg(req.offset, 0, req.flags, b"").encode())
            return
        if len(data) != req.size:
            raise ProtocolError(f"device returned {len(data)} config bytes for {req.size}")
        res.reply = m.encode_reply(R.GET_CONFIG, m.ConfigMsg(req.offset, req.size, req.flags, data).encode())

    def _set_config(self, msg: Message, fds: list[int], res: Result) -> None:
        req = m.ConfigMsg.decode(msg.payload, with_data=True)
        try:
            self.backend.set_config(req.offset, req.data, req.flags)
        except ValueError as exc:
            raise ProtocolError(f"SET_CONFIG offset={req.offset} size={req.size}: {exc}") from exc

    def _vring_kick(self, msg: Message, fds: list[int], res: Result) -> None:
        state = m.VringState.decode(msg.payload)
        self._vring(state.index)
        self.kick(state.index)

    def _get_max_mem_slots(self, msg: Message, fds: list[int], res: Result) -> None:
        res.reply = m.encode_reply(R.GET_MAX_MEM_SLOTS, m.encode_u64(m.MAX_FDS))

    def _set_status(self, msg: Message, fds: list[int], res: Result) -> None:
        self.status = m.decode_u64(msg.payload) & 0xFF

    def _get_status(self, msg: Message, fds: list[int], res: Result) -> None:
        res.reply = m.encode_reply(R.GET_STATUS, m.encode_u64(self.status))


def _name(request: int) -> str:
    try:
        return R(request).name
    except ValueError:
        return f"request {request}"


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())
