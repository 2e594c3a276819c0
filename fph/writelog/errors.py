"""Errors of the write logs: one tree under :class:`WriteLogError` so the migration engine can refuse to
migrate on any of them (a write log that cannot be trusted means a destination that may lose writes)."""

from __future__ import annotations


class WriteLogError(RuntimeError):
    """A write log cannot be built, opened, armed or harvested; the message says what to do."""


class WriteLogFormatError(WriteLogError):
    """A log file whose header or size does not match what fph expects (another guest, another version)."""


class PluginBuildError(WriteLogError):
    """The TCG plugin could not be compiled (no C compiler, or the compiler rejected the source)."""


class PluginNotAttachedError(WriteLogError):
    """The log file was never attached by a QEMU plugin: QEMU was started without the ``-plugin`` argument."""


class WriteLogArmTimeoutError(WriteLogError):
    """The plugin did not arm in time: no vCPU ran guest code since fph asked (a paused guest), or its
    QEMU is gone. Nothing was migrated with a blind log."""


class WriteLogStateError(WriteLogError):
    """A call in the wrong state: harvest before ``start()``, after ``close()``, or mismatched sizes."""


class SoftDirtyUnavailableError(WriteLogError):
    """The kernel does not track soft-dirty pages (no ``CONFIG_MEM_SOFT_DIRTY``): fph cannot see guest
    writes on this host without another write log, and must not migrate with this one."""


class RamMappingNotFoundError(WriteLogError):
    """QEMU's mapping of the guest RAM file or memfd was not found in ``/proc/PID/maps``."""


class VcpuControlError(WriteLogError):
    """Pausing or resuming the vCPUs around a non-atomic harvest failed (the VM may be left paused)."""
