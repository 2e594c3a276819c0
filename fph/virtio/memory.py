"""Guest memory as the device sees it: regions mapped from the front-end's fds, GPA-indexed access.

Every access is bounds-checked against one region (a buffer may not straddle two: QEMU never hands out such
buffers, and a guest that does is treated as broken). A ``GuestMemory`` is immutable; the handler builds a new
one on every SET_MEM_TABLE and swaps it whole (vm-memory's ``GuestMemoryAtomic``), so a ring walk never sees
half of an old map. Ring addresses arrive as front-end (QEMU) virtual addresses and are converted to GPAs once
(``uva_to_gpa``); descriptors and hints carry GPAs.

The vhost dirty log (``VhostLog``) lives here too because it is indexed by GPA: bit ``page & 63`` of u64 word
``page >> 6``, set with an atomic OR because QEMU harvests the words with an atomic exchange and other vhost
back-ends may share the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NewType, cast

from fph.virtio.errors import GuestMemoryError

Gpa = NewType("Gpa", int)
Uva = NewType("Uva", int)

PAGE_SIZE = 4096
PAGE_SHIFT = 12
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
#: A single access larger than this is refused outright (no guest buffer the device copies is this big).
MAX_ACCESS = 1 << 20
#: At most this many regions in one map: QEMU's vhost-user VHOST_USER_MAX_RAM_SLOTS. Checked before any
#: region is mapped, whatever message described them.
MAX_REGIONS = 32
_U64_LIMIT = 1 << 64


@dataclass(frozen=True)
class RegionSpec:
    """One region as SET_MEM_TABLE describes it."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int

    def check(self) -> None:
        """Refuse made-up numbers before any mmap, as a GuestMemoryError: mmap itself raises OverflowError
        (outside the error tree) for a length past ssize_t, and a wrapped sum would map the wrong range."""
        fields = (self.gpa, self.size, self.uva, self.mmap_offset)
        if any(not 0 <= v < _U64_LIMIT for v in fields):
            raise GuestMemoryError(f"region {self}: a field is not a u64")
        if self.size == 0 or (self.size | self.gpa | self.mmap_offset) % PAGE_SIZE:
            raise GuestMemoryError(
                f"region gpa={self.gpa:#x} size={self.size:#x} offset={self.mmap_offset:#x} "
                "is empty or not page aligned"
            )
        for name, start in (("gpa", self.gpa), ("uva", self.uva), ("mmap offset", self.mmap_offset)):
            if start + self.size > _U64_LIMIT:
                raise GuestMemoryError(f"region {name} {start:#x} + size {self.size:#x} overflows 64 bits")


class Region:
    """A mapped region. ``mm`` covers ``mmap_offset + size`` bytes of the fd from offset 0. ``fd`` is the
    region's own duplicate of the front-end's fd (or -1): a worker upgrade hands it to the successor."""

    def __init__(self, spec: RegionSpec, mm: mmap.mmap, fd: int = -1) -> None:
        self.spec = spec
        self.gpa = spec.gpa
        self.size = spec.size
        self.uva = spec.uva
        self.base = spec.mmap_offset
        self.gpa_end = spec.gpa + spec.size
        self.mm = mm
        self.fd = fd

    @classmethod
    def map_fd(cls, spec: RegionSpec, fd: int) -> Region:
        spec.check()
        try:
            mm = mmap.mmap(fd, spec.mmap_offset + spec.size, flags=mmap.MAP_SHARED | 0x4000)  # MAP_NORESERVE
        except (OSError, ValueError, OverflowError) as exc:  # Overflow: a length past ssize_t
            raise GuestMemoryError(f"cannot map region gpa={spec.gpa:#x} size={spec.size:#x}: {exc}") from exc
        return cls(spec, mm, os.dup(fd))

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view is still exported; unmapped when it goes
            self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestMemory:
    """Immutable set of mapped regions, addressed by GPA."""

    def __init__(self, regions: Sequence[Region] = ()) -> None:
        self.regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if a.gpa_end > b.gpa:
                raise GuestMemoryError(f"regions overlap at gpa {b.gpa:#x}")

    @classmethod
    def from_fds(cls, specs: Sequence[RegionSpec], fds: Sequence[int]) -> GuestMemory:
        """Map one fd per region; the caller keeps ownership of (and closes) the fds."""
        if len(specs) > MAX_REGIONS:
            raise GuestMemoryError(f"{len(specs)} memory regions, at most {MAX_REGIONS}")
        if len(specs) != len(fds):
            raise GuestMemoryError(f"{len(fds)} fds for {len(specs)} memory regions")
        for spec in specs:
            spec.check()
        regions: list[Region] = []
        try:
            for spec, fd in zip(specs, fds, strict=True):
                regions.append(Region.map_fd(spec, fd))
            return cls(regions)
        except Exception:
            for r in regions:
                r.close()
            raise

    def close(self) -> None:
        for r in self.regions:
            r.close()

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest GPA (the dirty log covers 0..end)."""
        return max((r.gpa_end for r in self.regions), default=0)

    def _locate(self, gpa: int, length: int) -> tuple[Region, int]:
        if length < 0 or length > (1 << 48) or gpa < 0:
            raise GuestMemoryError(f"bad access gpa={gpa:#x} len={length}")
        for r in self.regions:
            if r.gpa <= gpa < r.gpa_end:
                if gpa + length > r.gpa_end:
                    raise GuestMemoryError(
                        f"range gpa={gpa:#x} len={length:#x} runs past region end {r.gpa_end:#x}"
                    )
                return r, r.base + gpa - r.gpa
        raise GuestMemoryError(f"gpa {gpa:#x} (len {length:#x}) is outside guest memory")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def check(self, gpa: int, length: int) -> None:
        self._locate(gpa, length)

    def uva_to_gpa(self, uva: int, length: int = 1) -> Gpa:
        """Front-end virtual address -> GPA (ring addresses in SET_VRING_ADDR)."""
        for r in self.regions:
            if r.uva <= uva and uva + length <= r.uva + r.size:
                return Gpa(r.gpa + (uva - r.uva))
        raise GuestMemoryError(f"front-end address {uva:#x} (len {length:#x}) is in no region")

    def read(self, gpa: int, length: int) -> bytes:
        if length > MAX_ACCESS:
            raise GuestMemoryError(f"read of {length} bytes at {gpa:#x} exceeds {MAX_ACCESS}")
        r, off = self._locate(gpa, length)
        return r.mm[off : off + length]

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._locate(gpa, len(data))
        r.mm[off : off + len(data)] = data

    def read_u16(self, gpa: int) -> int:
        r, off = self._locate(gpa, 2)
        return int(_U16.unpack_from(r.mm, off)[0])

    def read_u32(self, gpa: int) -> int:
        r, off = self._locate(gpa, 4)
        return int(_U32.unpack_from(r.mm, off)[0])

    def read_u64(self, gpa: int) -> int:
        r, off = self._locate(gpa, 8)
        return int(_U64.unpack_from(r.mm, off)[0])

    def write_u16(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 2)
        _U16.pack_into(r.mm, off, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 4)
        _U32.pack_into(r.mm, off, value & 0xFFFF_FFFF)

    def read_struct(self, fmt: struct.Struct, gpa: int) -> tuple[int, ...]:
        r, off = self._locate(gpa, fmt.size)
        return fmt.unpack_from(r.mm, off)

    def write_struct(self, fmt: struct.Struct, gpa: int, *values: int) -> None:
        r, off = self._locate(gpa, fmt.size)
        fmt.pack_into(r.mm, off, *values)

    def discard(self, gpa: int, length: int) -> None:
        """Give the backing pages of a range back to the host (shared memfd/file: the hole is punched).

        MADV_REMOVE on a MAP_SHARED mapping frees the backing store like fallocate(PUNCH_HOLE); the guest
        reads zeros afterwards, which is what inflate and free page reporting allow.
        """
        if gpa % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise GuestMemoryError(f"discard gpa={gpa:#x} len={length:#x} is not page aligned")
        r, off = self._locate(gpa, length)
        try:
            r.mm.madvise(mmap.MADV_REMOVE, off, length)
        except OSError as exc:
            raise GuestMemoryError(f"discard gpa={gpa:#x} len={length:#x} failed: {exc}") from exc


_X86_64_LOCK_OR = bytes.fromhex("f0480937c3")
"""``lock or qword ptr [rdi], rsi; ret``: atomic_or_u64(address, value) in the System V calling convention."""


def _build_atomic_or() -> Callable[[int, int], None]:
    """A one-instruction ``lock or``: five bytes of machine code on x86-64 (a balloon worker stays small:
    llvmlite alone maps ~80 MB of LLVM), else JIT-compiled with llvmlite (a numba dependency)."""
    if platform.machine() in ("x86_64", "AMD64"):
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(_X86_64_LOCK_OR)
        _JIT_ENGINES.append(page)  # the code lives as long as its page
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        return cast(
            Callable[[int, int], None], ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(address)
        )
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    ir = (
        "define void @atomic_or_u64(ptr %p, i64 %v) {\n"
        "  %old = atomicrmw or ptr %p, i64 %v seq_cst\n"
        "  ret void\n"
        "}\n"
    )
    module = llvm.parse_assembly(ir)
    module.verify()
    machine = llvm.Target.from_default_triple().create_target_machine()
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    func = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(
        engine.get_function_address("atomic_or_u64")
    )
    _JIT_ENGINES.append(engine)  # the machine code lives as long as its engine
    return cast(Callable[[int, int], None], func)


_JIT_ENGINES: list[object] = []
_atomic_or: Callable[[int, int], None] | None = None


def atomic_or_u64(address: int, value: int) -> None:
    global _atomic_or
    if _atomic_or is None:
        _atomic_or = _build_atomic_or()
    _atomic_or(address, value)


_FENCE_WORD = ctypes.c_uint64(0)


def memory_fence() -> None:
    """A full barrier (x86 ``lock or``): orders a ring store before a later ring load (store->load is the
    one order x86-64 does not keep by itself)."""
    atomic_or_u64(ctypes.addressof(_FENCE_WORD), 0)


class VhostLog:
    """The front-end's dirty log (SET_LOG_BASE): one bit per 4 KiB guest-physical page."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        if mmap_size == 0 or mmap_size % 8:
            raise GuestMemoryError(f"log size {mmap_size} is not a positive multiple of 8")
        # An unaligned offset would make every atomic OR a split lock; a sum past 2**64 is made up.
        if mmap_offset < 0 or mmap_offset % 8 or mmap_offset + mmap_size > _U64_LIMIT:
            raise GuestMemoryError(f"log offset {mmap_offset:#x} (size {mmap_size:#x}) is invalid")
        try:
            self._mm = mmap.mmap(fd, mmap_offset + mmap_size, flags=mmap.MAP_SHARED)
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(f"cannot map dirty log ({mmap_size} bytes): {exc}") from exc
        self.fd = os.dup(fd)
        """The log's own duplicate of the front-end's fd: a worker upgrade hands it on."""
        self.mmap_size, self.mmap_offset = mmap_size, mmap_offset
        self._anchor = ctypes.c_char.from_buffer(self._mm)
        self._base = ctypes.addressof(self._anchor) + mmap_offset
        self.words = mmap_size // 8

    def mark(self, gpa: int, length: int) -> None:
        """Set the bits of every page the write [gpa, gpa+length) touched."""
        if length <= 0:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        if (last >> 6) >= self.words:
            raise GuestMemoryError(f"write at gpa {gpa:#x} is beyond the dirty log ({self.words} words)")
        for page in range(first, last + 1):
            atomic_or_u64(self._base + (page >> 6) * 8, 1 << (page & 63))

    def close(self) -> None:
        del self._anchor
        self._mm.close()
        os.close(self.fd)


def memfd_region(
    size: int, gpa: int = 0, uva: int | None = None, name: str = "guest"
) -> tuple[int, RegionSpec]:
    """A fresh memfd of ``size`` bytes and the RegionSpec a front-end would send for it (tests, fakes)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, RegionSpec(
        gpa=gpa, size=size, uva=uva if uva is not None else 0x7F00_0000_0000 + gpa, mmap_offset=0
    )
