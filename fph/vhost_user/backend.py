"""What a device implements to sit behind :class:`fph.vhost_user.handler.VhostUserHandler`.

The handler owns the protocol (features, memory table, vrings, fds); the device owns the virtio semantics.
Calls arrive on the event loop thread and must not block: every guest config read is a synchronous round
trip for QEMU's main loop.
"""

from __future__ import annotations

from typing import Protocol

from fph.vhost_user.vring import Vring
from fph.virtio.memory import GuestMemory


class BackendChannel(Protocol):
    """The back-end -> front-end request channel (SET_BACKEND_REQ_FD)."""

    def config_changed(self) -> None:
        """Send CONFIG_CHANGE_MSG; the front-end's ack is read asynchronously."""


class VhostUserBackend(Protocol):
    num_queues: int
    max_queue_size: int

    def features(self) -> int:
        """Virtio feature bits offered (device bits and transport bits such as VERSION_1)."""

    def protocol_features(self) -> int:
        """vhost-user protocol feature bits offered."""

    def set_features(self, features: int) -> None:
        """The bits the driver acked (bit 30 removed)."""

    def get_config(self, offset: int, size: int) -> bytes:
        """Config space bytes; raise ValueError when the range is outside the config."""

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Driver (flags 0) or migration (flags 1) config write."""

    def set_memory(self, mem: GuestMemory | None) -> None:
        """New guest memory map (None when the connection drops)."""

    def set_backend_channel(self, channel: BackendChannel | None) -> None: ...

    def process_queue(self, vring: Vring) -> None:
        """Drain a ring (kick, or ring started/enabled). Must handle guest errors itself."""

    def queue_stopped(self, vring: Vring) -> None:
        """GET_VRING_BASE stopped this ring: release what the device holds of it."""

    def reset(self) -> None:
        """A new owner on the connection (re-plug), RESET_DEVICE, or the front-end went away."""
