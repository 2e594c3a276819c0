"""The destination check run after every lab migration.

Transferred bytes mean nothing if the destination guest is broken: under TCG, QEMU 7.2 lost guest writes in
some runs with and without hints (most likely the TCG dirty-tracking bug fixed in QEMU 9.0). So every
migration is followed by: the destination VM is running, the guest's ``hold`` heartbeat goes on there with the
same checksum (re-verified data) and a later uptime (no reboot), the shell still answers, and neither serial
log shows an Oops, BUG or panic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fph.qmp import QMPError
from fph.waiting import poll_until
from fph_lab.errors import GuestConsoleError, LabError
from fph_lab.guest import Heartbeat, kernel_errors
from fph_lab.vm import VM


@dataclass
class DestinationCheck:
    """Result of :func:`check_destination`; ``ok`` is True only if ``problems`` is empty."""

    status: str = "?"
    source_heartbeat: Heartbeat | None = None
    heartbeats: list[Heartbeat] = field(default_factory=list)
    kernel_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            raise GuestConsoleError("destination check failed: " + "; ".join(self.problems))


def check_destination(
    dst: VM, source_heartbeat: Heartbeat, *, src: VM | None = None, heartbeats: int = 2, timeout: float = 30.0
) -> DestinationCheck:
    """Check the migrated guest on ``dst``. ``source_heartbeat``: the last heartbeat seen on the source
    (its uptime must be exceeded); ``heartbeats``: how many later heartbeats to wait for."""
    res = DestinationCheck(source_heartbeat=source_heartbeat)
    try:
        res.status = dst.status()
    except (QMPError, OSError) as e:
        res.problems.append(f"destination QMP: {e}")
    if res.status != "running":
        res.problems.append(f"destination status {res.status!r}, expected 'running'")

    def seen_enough() -> bool:
        """Read the later heartbeats while the destination runs (the last reading stays)."""
        if not dst.alive():
            return True
        res.heartbeats = [h for h in dst.guest.heartbeats() if h.uptime > source_heartbeat.uptime]
        return len(res.heartbeats) >= heartbeats or bool(kernel_errors(dst.console.text()))

    poll_until(seen_enough, timeout, 0.1)
    later = res.heartbeats
    if not dst.alive():
        res.problems.append(f"destination QEMU exited (status {dst.proc.returncode if dst.proc else None})")
    if len(later) < heartbeats:
        res.problems.append(
            f"{len(later)} heartbeat(s) after uptime {source_heartbeat.uptime:.3f} on the "
            f"destination within {timeout:.0f} s, expected {heartbeats}"
        )
    for h in later:
        if h.csum != source_heartbeat.csum or not h.ok:
            res.problems.append(
                f"heartbeat seq={h.seq} checksum {h.csum} ok={h.ok}, source had {source_heartbeat.csum}"
            )
            break
    if res.ok:
        try:
            dst.console.run("true", timeout=15.0)
        except LabError as e:
            res.problems.append(f"destination shell does not answer: {e}")
    for vm in (dst, src):
        if vm is not None:
            errs = kernel_errors(vm.console.text())
            res.kernel_errors += [f"{vm.name}: {line}" for line in errs]
    if res.kernel_errors:
        res.problems.append(f"kernel errors on the serial console: {res.kernel_errors[:3]}")
    return res
