"""One error tree for the vhost-user back-end and the virtio device side.

Callers catch :class:`VhostUserError`; the subclass says who is at fault and what the loop does:
``ProtocolError`` (the front-end broke the wire protocol: close that connection), ``GuestError`` (the guest
put bad data in a ring or a hint: mark that device broken), ``StateError`` (a control call made at the wrong
time: tell the caller, change nothing), ``ConnectError`` (the socket side).
"""

from __future__ import annotations

from fph.virtio.errors import GuestError, GuestMemoryError, VirtioError, VirtQueueError

#: One tree: the root lives in fph.virtio (which this package builds on), so the guest's errors from the
#: rings and the front-end's errors from the wire are caught with one base.
VhostUserError = VirtioError

__all__ = [
    "ConnectError",
    "GuestError",
    "GuestMemoryError",
    "MessageError",
    "ProtocolError",
    "StateError",
    "UnknownRequestError",
    "VhostUserError",
    "VirtQueueError",
]


class ProtocolError(VhostUserError):
    """The front-end sent something the protocol forbids; the connection is closed."""


class MessageError(ProtocolError):
    """Malformed framing: header flags, payload size, fd count."""


class UnknownRequestError(ProtocolError):
    """A request id this back-end does not implement."""


class StateError(VhostUserError):
    """A call that is not valid in the current run state."""


class ConnectError(VhostUserError):
    """The transport could not listen, accept or talk on the socket."""
