"""The state of one live vhost-user connection, as plain data plus a table of fds: what a worker hands to
its successor (an upgrade) so that QEMU's connection never drops. QEMU 11.1 aborts when a balloon's
back-end went away and the device is later unplugged or reconnected (fph.balloon.worker), so the
successor takes the very sockets, eventfds and memory fds over (SCM_RIGHTS) and goes on from the same
ring indices.

Fds are named by their index in :class:`FdTable`; the dataclasses are JSON-able through
``fph.balloon.worker_protocol.to_wire``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fph.virtio.memory import RegionSpec
from fph.virtio.queue import QueueState


class FdTable:
    """The fds of a hand-over in sending order; a state names each by its index. The table never owns
    them: the sender keeps its own (until it exits), the receiver's are closed by whoever restores them."""

    def __init__(self, fds: list[int] | None = None) -> None:
        self.fds: list[int] = list(fds or [])

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1

    def add_optional(self, fd: int | None) -> int | None:
        return None if fd is None else self.add(fd)

    def get(self, index: int) -> int:
        if not 0 <= index < len(self.fds):
            raise ValueError(f"hand-over names fd #{index}, {len(self.fds)} were passed")
        return self.fds[index]

    def get_optional(self, index: int | None) -> int | None:
        return None if index is None else self.get(index)


@dataclass(frozen=True)
class VringState:
    index: int
    queue: QueueState
    kick_fd: int | None
    call_fd: int | None
    err_fd: int | None
    started: bool
    enabled: bool
    uva: tuple[int, int, int] | None
    log_flag: bool
    log_guest_addr: int


@dataclass(frozen=True)
class MemoryRegionState:
    spec: RegionSpec
    fd: int


@dataclass(frozen=True)
class LogState:
    fd: int
    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True)
class HandlerState:
    owner: bool
    acked_features: int
    acked_protocol_features: int
    status: int
    regions: list[MemoryRegionState]
    log: LogState | None
    vrings: list[VringState]


@dataclass(frozen=True)
class ChannelState:
    """The back-end request channel (SET_BACKEND_REQ_FD)."""

    fd: int
    need_reply: bool
    sent: int
    acked: int
    nacked: int
    unsent: str = ""
    """Bytes written but not yet taken by the socket (hex)."""


@dataclass(frozen=True)
class ConnectionState:
    fd: int
    handler: HandlerState
    channel: ChannelState | None
    unsent: str = ""
    """Replies written but not yet taken by the socket (hex)."""


@dataclass(frozen=True)
class ListenerState:
    path: str
    fd: int
    inode: int
    connections_served: int
    connection: ConnectionState | None = None
