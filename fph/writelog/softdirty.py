"""Soft-dirty write log for KVM hosts: ``/proc/PID/pagemap`` bit 55 + ``/proc/PID/clear_refs`` ("4").

Why the pause: reading pagemap and writing clear_refs are two steps; a guest write between them is
forgotten (docs/protocol-model.md: loses a write in 7 steps, with no hint involved). So each harvest stops the
vCPUs (QMP ``stop``), reads, clears and resumes (``cont``), and reports that pause. ``vcpus_stopped=True``
(the final harvest at switch-over) reads and clears without touching the run state.

QEMU's RAM mapping is found in ``/proc/PID/maps`` by the RAM file's path (memory-backend-file) or the
memfd's name (``/memfd:<name>``, memory-backend-memfd); its file offsets are translated to GPAs with the
guest's :class:`~fph.ram_layout.RamLayout`.

Where the kernel lacks ``CONFIG_MEM_SOFT_DIRTY`` (pagemap bit 55 never set) ``start()`` raises
:class:`SoftDirtyUnavailableError` instead of migrating with a blind log.

Caveats (not testable on the TCG development host): soft-dirty lives in page-table entries; a shared
file/shmem page whose PTE is zapped (reclaim, swap-out of shmem) loses its soft-dirty bit, so guest RAM
must not be reclaimed while tracking (lock it: QEMU ``-overcommit mem-lock=on``, or hugetlbfs). Writes by
other processes through their own mappings (vhost-user back-ends) are not seen: give them a
DeviceWriteLog or their own log. Writes by QEMU itself (device DMA) are seen, unlike with the TCG plugin.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE, RamLayout
from fph.writelog.base import Words, WriteLog, words_for
from fph.writelog.errors import (
    RamMappingNotFoundError,
    SoftDirtyUnavailableError,
    VcpuControlError,
    WriteLogError,
    WriteLogStateError,
)

PM_SOFT_DIRTY = 1 << 55
CLEAR_SOFT_DIRTY = b"4"

VcpuCall = Callable[[], Any]
"""``pause`` / ``resume``: a plain callable, or an async one (then use ``aharvest()``)."""


def probe_soft_dirty(proc: str = "/proc") -> bool:
    """True when this kernel tracks soft-dirty pages: a page of our own just written must show bit 55 in
    pagemap (nobody clears fph's own soft-dirty bits, and new mappings start soft-dirty)."""
    buf = ctypes.create_string_buffer(2 * PAGE_SIZE)
    addr = (ctypes.addressof(buf) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    ctypes.memset(addr, 0x5A, 64)
    try:
        fd = os.open(f"{proc}/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        raw = os.pread(fd, 8, (addr >> PAGE_SHIFT) * 8)
    finally:
        os.close(fd)
    return len(raw) == 8 and bool(int.from_bytes(raw, "little") & PM_SOFT_DIRTY)


def require_soft_dirty(probe: Callable[[], bool] = probe_soft_dirty) -> None:
    """Raise SoftDirtyUnavailableError unless the kernel tracks soft-dirty pages."""
    if not probe():
        raise SoftDirtyUnavailableError(
            "this kernel does not track soft-dirty pages (pagemap bit 55 stays 0 after a write: "
            "CONFIG_MEM_SOFT_DIRTY is off), so fph cannot see guest writes with the soft-dirty write log. "
            "Refusing to migrate: use a kernel with CONFIG_MEM_SOFT_DIRTY=y, or run the guest under TCG "
            "with fph's write-log plugin (TcgWriteLog)"
        )


@dataclass(frozen=True)
class Mapping:
    """One VMA of QEMU's RAM mapping: virtual ``[start, end)`` showing the file from ``offset``."""

    start: int
    end: int
    offset: int
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """The file-backed entries of a ``/proc/PID/maps`` text."""
    out = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append(Mapping(lo, hi, int(parts[2], 16), parts[5]))
    return out


def find_ram_mappings(
    maps_text: str, *, ram_path: str | None = None, memfd_name: str | None = None, ram_bytes: int
) -> list[Mapping]:
    """QEMU's VMAs of the guest RAM (by file path, or ``/memfd:<name>``), covering ``ram_bytes`` of file.

    Raises RamMappingNotFoundError when none, or when they do not cover the whole RAM file.
    """
    if (ram_path is None) == (memfd_name is None):
        raise WriteLogStateError("give exactly one of ram_path (memory-backend-file) or memfd_name (memfd)")
    if ram_path is not None:
        want = os.path.realpath(ram_path)

        def match(p: str) -> bool:
            return p == want or p == f"{want} (deleted)"

        what = f"RAM file {want}"
    else:
        prefix = f"/memfd:{memfd_name}"

        def match(p: str) -> bool:
            return p == prefix or p == f"{prefix} (deleted)"

        what = f"memfd {memfd_name!r} (QEMU names it after the backend type: memory-backend-memfd)"
    found = sorted((m for m in parse_maps(maps_text) if match(m.path)), key=lambda m: m.offset)
    if not found:
        raise RamMappingNotFoundError(
            f"no mapping of the {what} in QEMU's /proc/PID/maps: check the process id and the RAM backend "
            "(memory-backend-file mem-path=..., or memory-backend-memfd), and that QEMU has started"
        )
    covered = 0
    for m in found:
        if m.offset > covered:
            break
        covered = max(covered, m.offset + (m.end - m.start))
    if covered < ram_bytes:
        raise RamMappingNotFoundError(
            f"QEMU maps only {covered:#x} of the {ram_bytes:#x} bytes of the {what}: several mappings of "
            "the same name? give the exact RAM file path"
        )
    return found


class SoftDirtyWriteLog(WriteLog):
    """Soft-dirty write log of QEMU process ``pid``.

    ``layout``: the guest's RAM layout; ``ram_path`` or ``memfd_name``: how to find the RAM mapping;
    ``pause`` / ``resume``: stop and continue the vCPUs (e.g. QMP ``stop`` / ``cont``; sync or async);
    ``proc``: procfs root and ``probe``: soft-dirty support check (both injectable for tests).
    """

    kind = "soft-dirty"
    atomic = False

    def __init__(
        self,
        pid: int,
        layout: RamLayout,
        *,
        pause: VcpuCall,
        resume: VcpuCall,
        ram_path: str | Path | None = None,
        memfd_name: str | None = None,
        proc: str = "/proc",
        probe: Callable[[], bool] = probe_soft_dirty,
    ) -> None:
        super().__init__(layout)
        self.pid = pid
        self.pause_fn = pause
        self.resume_fn = resume
        self.ram_path = str(ram_path) if ram_path is not None else None
        self.memfd_name = memfd_name
        self.proc = proc
        self.probe = probe
        self.mappings: list[Mapping] = []
        self._pagemap_fd: int | None = None
        self._clear_fd: int | None = None

    # -- set-up

    def _start(self) -> None:
        require_soft_dirty(self.probe)
        base = f"{self.proc}/{self.pid}"
        try:
            maps = Path(f"{base}/maps").read_text()
        except OSError as e:
            raise RamMappingNotFoundError(
                f"cannot read {base}/maps ({e}): is QEMU pid {self.pid} running?"
            ) from e
        self.mappings = find_ram_mappings(
            maps, ram_path=self.ram_path, memfd_name=self.memfd_name, ram_bytes=self.layout.ram_bytes
        )
        try:
            self._pagemap_fd = os.open(f"{base}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._clear_fd = os.open(f"{base}/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            self._close()
            raise WriteLogError(
                f"cannot open {base}/pagemap and clear_refs ({e}): fph needs root or CAP_SYS_ADMIN over "
                "the QEMU process"
            ) from e
        self._clear()  # arm: every write from now on sets soft-dirty again

    # -- harvest

    def _read(self) -> Words:
        """The soft-dirty bits of the guest's RAM, as GPA-indexed words."""
        assert self._pagemap_fd is not None
        dirty = np.zeros(self.nwords * 64, dtype=np.uint8)
        for r in self.layout:
            pos = r.offset
            end = r.offset + r.size
            for m in self.mappings:
                lo = max(pos, m.offset)
                hi = min(end, m.offset + (m.end - m.start))
                if lo >= hi:
                    continue
                vaddr = m.start + (lo - m.offset)
                n = (hi - lo) >> PAGE_SHIFT
                raw = os.pread(self._pagemap_fd, n * 8, (vaddr >> PAGE_SHIFT) * 8)
                if len(raw) != n * 8:
                    raise WriteLogError(
                        f"short read of /proc/{self.pid}/pagemap: {len(raw)} of {n * 8} bytes"
                    )
                entries = np.frombuffer(raw, dtype=np.uint64)
                first = (r.gpa + (lo - r.offset)) >> PAGE_SHIFT
                dirty[first : first + n] = ((entries >> np.uint64(55)) & np.uint64(1)).astype(np.uint8)
        packed = np.packbits(dirty, bitorder="little")
        return packed.view(np.uint64)[: words_for(self.nbits)].copy()

    def _clear(self) -> None:
        assert self._clear_fd is not None
        try:
            os.pwrite(self._clear_fd, CLEAR_SOFT_DIRTY, 0)
        except OSError as e:
            raise WriteLogError(f"writing 4 to /proc/{self.pid}/clear_refs failed: {e}") from e

    def _read_and_clear(self) -> Words:
        words = self._read()
        self._clear()
        return words

    def _harvest(self, vcpus_stopped: bool) -> tuple[Words, float]:
        if vcpus_stopped:
            return self._read_and_clear(), 0.0
        t0 = time.perf_counter()
        self._call(self.pause_fn, "pause")
        try:
            words = self._read_and_clear()
        finally:
            self._call(self.resume_fn, "resume")
            pause_s = time.perf_counter() - t0
        return words, pause_s

    async def aharvest(self, *, vcpus_stopped: bool = False) -> Words:
        self._check_ready()
        t0 = time.perf_counter()
        if vcpus_stopped:
            words, pause_s = self._read_and_clear(), 0.0
        else:
            await self._acall(self.pause_fn, "pause")
            try:
                words = self._read_and_clear()
            finally:
                await self._acall(self.resume_fn, "resume")
                pause_s = time.perf_counter() - t0
        self._record(words, time.perf_counter() - t0, pause_s)
        return words

    def _call(self, fn: VcpuCall, what: str) -> None:
        try:
            result = fn()
        except Exception as e:
            raise VcpuControlError(f"{what} of the vCPUs failed: {e}" + _LEFT[what]) from e
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise VcpuControlError(f"the {what} callable is async: call aharvest() instead of harvest()")

    async def _acall(self, fn: VcpuCall, what: str) -> None:
        try:
            result = fn()
            if inspect.isawaitable(result):
                await result
        except Exception as e:
            raise VcpuControlError(f"{what} of the vCPUs failed: {e}" + _LEFT[what]) from e

    def _close(self) -> None:
        for fd in (self._pagemap_fd, self._clear_fd):
            if fd is not None:
                os.close(fd)
        self._pagemap_fd = self._clear_fd = None

    def _details(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "mappings": [(hex(m.start), hex(m.end), hex(m.offset), m.path) for m in self.mappings],
        }


_LEFT = {
    "pause": "; nothing was harvested, the guest runs on",
    "resume": "; the guest is LEFT PAUSED: send QMP cont after fixing the cause",
}


def qmp_vcpu_control(qmp_socket: str, timeout: float = 5.0) -> tuple[VcpuCall, VcpuCall]:
    """(pause, resume) callables sending QMP ``stop`` / ``cont`` over a fresh connection each."""
    from fph.qmp import qmp_call

    def pause() -> None:
        qmp_call(qmp_socket, "stop", None, timeout)

    def resume() -> None:
        qmp_call(qmp_socket, "cont", None, timeout)

    return pause, resume
