"""Where guest RAM sits in guest-physical space and in the RAM file.

QEMU maps one RAM backend (one file or memfd) onto several guest-physical ranges: on ``pc`` the first
part below the PCI hole, the rest from 4 GiB up. Hints, write logs and the vhost-user memory table all
speak guest-physical addresses (GPAs); the sender reads and writes file offsets. ``RamLayout`` is the
only place that converts between the two, and it rejects anything that is not RAM.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
GiB = 1 << 30
FOUR_GIB = 4 * GiB
MAX_GPA = 1 << 52
"""x86-64 physical addresses have at most 52 bits; anything beyond is an overflow, not RAM."""


class LayoutError(ValueError):
    """An address or range that is not guest RAM, or a layout that cannot exist."""


@dataclass(frozen=True, slots=True)
class RamRange:
    """``size`` bytes of RAM at guest-physical ``gpa``, stored at ``offset`` in the RAM file."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def __post_init__(self) -> None:
        for name in ("gpa", "size", "offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise LayoutError(f"RAM range {name} must be a non-negative int, got {value!r}")
            if value % PAGE_SIZE:
                raise LayoutError(f"RAM range {name}={value:#x} is not {PAGE_SIZE}-byte aligned")
        if self.size == 0:
            raise LayoutError("RAM range of size 0")
        if self.gpa + self.size > MAX_GPA:
            raise LayoutError(f"RAM range [{self.gpa:#x}, +{self.size:#x}) goes beyond {MAX_GPA:#x}")


class RamLayout:
    """Guest RAM as sorted, non-overlapping guest-physical ranges over one RAM file."""

    def __init__(self, ranges: Iterable[RamRange]) -> None:
        self.ranges: tuple[RamRange, ...] = tuple(sorted(ranges, key=lambda r: r.gpa))
        if not self.ranges:
            raise LayoutError("a RAM layout needs at least one range")
        for a, b in itertools.pairwise(self.ranges):
            if b.gpa < a.end:
                raise LayoutError(f"RAM ranges overlap in guest-physical space: {a} and {b}")
        by_offset = sorted(self.ranges, key=lambda r: r.offset)
        for a, b in itertools.pairwise(by_offset):
            if b.offset < a.offset + a.size:
                raise LayoutError(f"RAM ranges overlap in the RAM file: {a} and {b}")

    @classmethod
    def flat(cls, size: int) -> RamLayout:
        """One range at GPA 0 (a guest smaller than the PCI hole, or a test)."""
        return cls([RamRange(0, size, 0)])

    @classmethod
    def pc(cls, ram_size: int) -> RamLayout:
        """QEMU ``pc`` (i440fx): RAM of 3.5 GiB or more splits at 3 GiB, the rest starts at 4 GiB."""
        lowmem = 3 * GiB if ram_size >= 0xE000_0000 else ram_size
        return cls._split(ram_size, lowmem)

    @classmethod
    def q35(cls, ram_size: int) -> RamLayout:
        """QEMU ``q35``: RAM of 2.75 GiB or more splits at 2 GiB, the rest starts at 4 GiB."""
        lowmem = 2 * GiB if ram_size >= 0xB000_0000 else ram_size
        return cls._split(ram_size, lowmem)

    @classmethod
    def _split(cls, ram_size: int, lowmem: int) -> RamLayout:
        ranges = [RamRange(0, lowmem, 0)]
        if ram_size > lowmem:
            ranges.append(RamRange(FOUR_GIB, ram_size - lowmem, lowmem))
        return cls(ranges)

    def __iter__(self) -> Iterator[RamRange]:
        return iter(self.ranges)

    def __repr__(self) -> str:
        parts = ", ".join(f"{r.gpa:#x}+{r.size:#x}@{r.offset:#x}" for r in self.ranges)
        return f"RamLayout({parts})"

    @property
    def ram_bytes(self) -> int:
        return sum(r.size for r in self.ranges)

    @property
    def span_pages(self) -> int:
        """Pages from GPA 0 to the end of the highest range: the size of a GPA-indexed bitmap."""
        return self.ranges[-1].end >> PAGE_SHIFT

    def range_of(self, gpa: int, length: int = 1) -> RamRange:
        """The RAM range holding all of ``[gpa, gpa + length)``; LayoutError otherwise."""
        if length <= 0:
            raise LayoutError(f"empty or negative length {length} at GPA {gpa:#x}")
        if gpa < 0 or gpa + length > MAX_GPA:
            raise LayoutError(f"GPA range [{gpa:#x}, +{length:#x}) overflows the physical address space")
        for r in self.ranges:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r
        raise LayoutError(f"GPA range [{gpa:#x}, +{length:#x}) is not inside guest RAM ({self!r})")

    def gpa_to_offset(self, gpa: int, length: int = 1) -> int:
        r = self.range_of(gpa, length)
        return gpa - r.gpa + r.offset

    def offset_to_gpa(self, offset: int, length: int = 1) -> int:
        if length <= 0:
            raise LayoutError(f"empty or negative length {length} at offset {offset:#x}")
        for r in self.ranges:
            if r.offset <= offset and offset + length <= r.offset + r.size:
                return offset - r.offset + r.gpa
        raise LayoutError(f"RAM file range [{offset:#x}, +{length:#x}) is not inside guest RAM ({self!r})")
