"""Throttling a guest's vCPUs with a CPU quota, as libvirt and QEMU's auto-converge do, from outside QEMU.

The vCPU threads (QMP ``query-cpus-fast`` gives their thread ids) move into a cgroup v1 ``cpu`` group of
their own whose ``cpu.cfs_quota_us`` is set to the share of CPU time they may use; a throttle of T percent
leaves each vCPU (100 - T)% of one CPU. ``release()`` moves every thread back to the group it came from and
removes the group, on every path (a migration that fails must not leave its guest slowed).

Only cgroup v1's ``cpu`` controller is supported (per-thread placement needs no threaded-mode set-up there);
on a host without it :class:`ThrottleUnavailableError` says so before anything is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CPU_V1 = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


class ThrottleError(RuntimeError):
    """The vCPUs could not be throttled (or released) as asked."""


class ThrottleUnavailableError(ThrottleError):
    """This host offers no cgroup v1 ``cpu`` controller to throttle with."""


def _cpu_cgroup_of(tid: int, pid: int) -> str:
    """The thread's current group under the ``cpu`` controller (relative path, "/" for the root)."""
    text = Path(f"/proc/{pid}/task/{tid}/cgroup").read_text()
    for line in text.splitlines():
        _h, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return "/"


@dataclass
class VcpuThrottle:
    """A CPU quota on one QEMU's vCPU threads. ``set(pct)`` any number of times, then ``release()``."""

    pid: int
    vcpu_tids: list[int]
    name: str
    root: Path = CPU_V1
    pct: int = 0
    _group: Path | None = None
    _origin: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.root / "cpu.cfs_quota_us").exists():
            raise ThrottleUnavailableError(
                f"no cgroup v1 cpu controller at {self.root} (cpu.cfs_quota_us missing): "
                "cannot throttle vCPUs"
            )
        if not self.vcpu_tids:
            raise ThrottleError("no vCPU thread ids to throttle")

    def set(self, pct: int) -> None:
        """Take ``pct`` percent of CPU time from each vCPU (0 releases nothing but lifts the cap)."""
        if not 0 <= pct <= 99:
            raise ThrottleError(f"throttle {pct}% out of range 0..99")
        try:
            if self._group is None:
                self._group = self.root / f"fph-throttle-{self.name}-{self.pid}"
                self._group.mkdir(exist_ok=True)
                (self._group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                for tid in self.vcpu_tids:
                    self._origin[tid] = _cpu_cgroup_of(tid, self.pid)
                    (self._group / "tasks").write_text(str(tid))
            quota = -1 if pct == 0 else max(1000, len(self.vcpu_tids) * PERIOD_US * (100 - pct) // 100)
            (self._group / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError as exc:
            raise ThrottleError(f"throttling vCPUs of QEMU {self.pid} to {100 - pct}%: {exc}") from exc
        self.pct = pct
        log.info("vCPUs of QEMU %d throttled: %d%% of their CPU time taken", self.pid, pct)

    def release(self) -> list[str]:
        """Threads back where they were, the group removed; returns what could not be undone."""
        problems: list[str] = []
        if self._group is None:
            return problems
        for tid, origin in self._origin.items():
            if not os.path.exists(f"/proc/{self.pid}/task/{tid}"):
                continue  # the thread (or QEMU) is gone
            try:
                (self.root / origin.lstrip("/") / "tasks").write_text(str(tid))
            except OSError as exc:
                problems.append(f"vCPU thread {tid} not moved back to {origin}: {exc}")
        with contextlib.suppress(OSError):
            (self._group / "cpu.cfs_quota_us").write_text("-1")
        try:
            self._group.rmdir()
        except OSError as exc:
            problems.append(f"cgroup {self._group} not removed: {exc}")
        self._group = None
        self.pct = 0
        return problems


def vcpu_threads(cpus: list[dict[str, object]]) -> tuple[int, list[int]]:
    """QEMU's pid and its vCPU thread ids from a ``query-cpus-fast`` answer (the pid is the threads'
    thread-group id, from /proc)."""
    tids = [int(str(c["thread-id"])) for c in cpus if "thread-id" in c]
    if not tids:
        raise ThrottleError("query-cpus-fast named no vCPU thread ids")
    try:
        status = Path(f"/proc/{tids[0]}/status").read_text()
    except OSError as exc:
        raise ThrottleError(f"vCPU thread {tids[0]} is not visible here (/proc): {exc}") from exc
    tgid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("Tgid:")), 0)
    if not tgid:
        raise ThrottleError(f"no Tgid for vCPU thread {tids[0]}")
    return tgid, tids


def release_stale_groups(pid: int, root: Path = CPU_V1) -> list[str]:
    """After a crash of the process that throttled QEMU ``pid``: every thread of its ``fph-throttle-*-pid``
    groups goes back to the root group (where QEMU's threads start) and the groups are removed. Returns
    what was done, one line each."""
    done: list[str] = []
    if not root.is_dir():
        return done
    for group in sorted(root.glob(f"fph-throttle-*-{pid}")):
        tasks = [t for t in (group / "tasks").read_text().split() if t]
        for tid in tasks:
            with contextlib.suppress(OSError):  # a thread that exited meanwhile
                (root / "tasks").write_text(tid)
        try:
            group.rmdir()
            done.append(f"vCPU throttle group {group.name} removed ({len(tasks)} thread(s) released)")
        except OSError as exc:
            done.append(f"vCPU throttle group {group} NOT removed: {exc}")
    return done
