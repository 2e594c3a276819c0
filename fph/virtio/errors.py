"""The root of fph's device-side error tree: what the guest got wrong.

fph.vhost_user builds on this package and extends the same tree (its ``VhostUserError`` is
:class:`VirtioError`), so callers catch one base for the transport and the rings alike.
"""

from __future__ import annotations


class VirtioError(Exception):
    """Base of every error raised by fph.virtio and fph.vhost_user."""


class GuestError(VirtioError):
    """The guest driver put invalid data where the device reads it; the device is marked broken."""


class GuestMemoryError(GuestError):
    """An address or length outside the guest memory the front-end shared."""


class VirtQueueError(GuestError):
    """A malformed descriptor chain or ring index."""
