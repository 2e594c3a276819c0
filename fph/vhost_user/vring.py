"""A vring as the vhost-user protocol sees it: the split queue plus its kick/call/err eventfds and the
started/enabled states (the vhost-user specification: rings start stopped and disabled; start on a kick fd,
stop on GET_VRING_BASE, enable with SET_VRING_ENABLE)."""

from __future__ import annotations

import logging
import os

from fph.vhost_user.handover import FdTable, VringState
from fph.virtio.memory import GuestMemory
from fph.virtio.queue import SplitQueue

log = logging.getLogger(__name__)


class Vring:
    def __init__(self, index: int, max_size: int) -> None:
        self.index = index
        self.queue = SplitQueue(max_size)
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.started = False
        self.enabled = False
        #: Front-end virtual addresses from SET_VRING_ADDR, kept to re-translate after SET_MEM_TABLE.
        self.uva: tuple[int, int, int] | None = None
        self.log_flag = False
        self.log_guest_addr = 0

    @property
    def active(self) -> bool:
        """Started and enabled: the device may pop, push and notify."""
        return self.started and self.enabled and self.queue.ready

    def signal_used(self, mem: GuestMemory) -> None:
        """Interrupt the driver if it asked for one (suppression honoured)."""
        if self.call_fd is not None and self.queue.needs_notification(mem):
            self._notify(self.call_fd, "call")

    def signal_error(self) -> None:
        if self.err_fd is not None:
            self._notify(self.err_fd, "err")

    def _notify(self, fd: int, what: str) -> None:
        """The transport made the fd non-blocking; EAGAIN means the front-end has not read the last
        notification yet (a full counter or pipe), so this one is already pending: drop it."""
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            log.debug("vring %d: %s fd full, notification already pending", self.index, what)
        except OSError as exc:
            log.error("vring %d: %s eventfd write failed: %s", self.index, what, exc)

    def export_state(self, fds: FdTable) -> VringState:
        return VringState(
            self.index, self.queue.export_state(),
            fds.add_optional(self.kick_fd), fds.add_optional(self.call_fd), fds.add_optional(self.err_fd),
            self.started, self.enabled, self.uva, self.log_flag, self.log_guest_addr,
        )  # fmt: skip

    def import_state(self, state: VringState, mem: GuestMemory | None, fds: FdTable) -> None:
        """Go on from a predecessor's ring: its indices, and duplicates of its eventfds."""
        if state.index != self.index:
            raise ValueError(f"ring {state.index} handed over to ring {self.index}")
        self.queue.import_state(state.queue, mem)
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = fds.get_optional(getattr(state, name))
            self.replace_fd(name, os.dup(fd) if fd is not None else None)
        self.started, self.enabled = state.started, state.enabled
        self.uva = tuple(state.uva) if state.uva is not None else None  # type: ignore[assignment]
        self.log_flag, self.log_guest_addr = state.log_flag, state.log_guest_addr

    def replace_fd(self, name: str, fd: int | None) -> None:
        old = getattr(self, name)
        if old is not None and old != fd:
            os.close(old)
        setattr(self, name, fd)

    def close(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            self.replace_fd(name, None)
        self.started = False
        self.enabled = False
        self.queue.ready = False
