"""vhost-user back-end: a sans-IO protocol core (message, handler, backend) and an asyncio transport.

Layout follows rust-vmm's ``vhost`` crate: ``message`` (ids, flags, payload codecs), ``handler`` (protocol
semantics, bytes and fds in, replies and actions out), ``backend`` (what a device implements), ``connection``
and ``server`` (sockets, fds, one event loop for many devices), ``errors`` (one error tree).

The error tree is imported eagerly; everything else on first use, because fph.virtio (guest memory, rings)
raises these errors and the protocol modules use fph.virtio: eager imports here would be circular.
"""

from importlib import import_module
from typing import Any

from fph.vhost_user.errors import (
    ConnectError,
    GuestError,
    GuestMemoryError,
    MessageError,
    ProtocolError,
    StateError,
    UnknownRequestError,
    VhostUserError,
    VirtQueueError,
)

_LAZY = {
    "BackendChannel": "backend",
    "VhostUserBackend": "backend",
    "BackendChannelConnection": "connection",
    "Runstate": "connection",
    "VhostUserConnection": "connection",
    "VhostUserHandler": "handler",
    "VhostUserServer": "server",
}

# The public names; keep in step with the module docstrings.
__all__ = [
    "BackendChannel",
    "BackendChannelConnection",
    "ConnectError",
    "GuestError",
    "GuestMemoryError",
    "MessageError",
    "ProtocolError",
    "Runstate",
    "StateError",
    "UnknownRequestError",
    "VhostUserBackend",
    "VhostUserConnection",
    "VhostUserError",
    "VhostUserHandler",
    "VhostUserServer",
    "VirtQueueError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"fph.vhost_user.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fph.vhost_user' has no attribute {name!r}")
