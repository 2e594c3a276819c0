"""How the daemon migrates a VM: the three modes of the API's ``Mode``, by the names its CLI, logs, metrics
and state file use."""

from __future__ import annotations

import enum


class MigrationMode(enum.Enum):
    FPH = "fph"
    """fph moves guest RAM itself (a shared memory backend, QEMU with ``x-ignore-shared``), skipping what
    the guest hinted free; QEMU moves device state."""
    NATIVE = "native"
    """QEMU's precopy with QEMU's own free page hinting."""
    NONE = "none"
    """QEMU's precopy without hinting."""
