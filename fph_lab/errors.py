"""Errors of the lab (provisioning, VMs, guest control): one base class so callers can catch the lab."""


class LabError(Exception):
    """Something in the lab failed; the message says what and, where known, how to fix it."""


class GuestConsoleError(LabError):
    """The guest misbehaved on its serial console: no ready line, a command timed out, a kernel Oops, ..."""


class VMError(LabError):
    """QEMU could not be started, exited early, or did not shut down."""
