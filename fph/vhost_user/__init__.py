"""vhost-user back-end: a sans-IO protocol core (message, handler, backend) and an asyncio transport.

Layout follows rust-vmm's ``vhost`` crate: ``message`` (ids, flags, payload codecs), ``handler`` (protocol
semantics, bytes and fds in, replies and actions out), ``backend`` (what a device implements), ``connection``
and ``server`` (sockets, fds, one event loop for many devices), ``errors`` (one error tree, rooted in
fph.virtio, which this package builds on and which never imports it).
"""

from fph.vhost_user.backend import BackendChannel, VhostUserBackend
from fph.vhost_user.connection import BackendChannelConnection, Runstate, VhostUserConnection
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
from fph.vhost_user.handler import VhostUserHandler
from fph.vhost_user.server import VhostUserServer

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
