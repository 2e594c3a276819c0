"""Where a registered VM is in its life on this host: the API's ``VmState``, by the names the daemon's logs
and state file use."""

from __future__ import annotations

import enum


class VmState(enum.Enum):
    REGISTERED = "registered"
    MIGRATING = "migrating"
    """An outgoing migration runs."""
    MIGRATED = "migrated"
    """Its guest now runs on the destination; the source QEMU is done."""
    INCOMING = "incoming"
    """Prepared as a migration destination (PrepareIncoming)."""
