"""Page-by-page comparison of a source and a destination RAM file: the strongest check a migration test has.

At the COMPLETE hook both VMs are stopped and the destination not yet resumed, so the two files must be
equal page for page wherever the guest relies on the content.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fph.migration_hook import HookEvent, HookPoint
from fph.ram_layout import PAGE_SIZE
from fph_lab.disk import page_digest
from fph_lab.fph_mode import FphPair

MiB = 1 << 20


def differing_pages(a: Path, b: Path, size: int) -> list[int]:
    """Page indexes (file offsets / 4 KiB) where two RAM files differ."""
    fa = np.memmap(a, dtype=np.uint8, mode="r", shape=(size,))
    fb = np.memmap(b, dtype=np.uint8, mode="r", shape=(size,))
    out: list[int] = []
    step = 64 * MiB
    for off in range(0, size, step):
        x = fa[off : off + step].reshape(-1, PAGE_SIZE)
        y = fb[off : off + step].reshape(-1, PAGE_SIZE)
        out += [off // PAGE_SIZE + int(i) for i in np.flatnonzero((x != y).any(axis=1))]
    return out


class PageCompare:
    """COMPLETE hook: both guests stopped, destination not yet resumed -> compare the RAM files."""

    def __init__(self, pair: FphPair) -> None:
        self.pair = pair
        self.diff: list[int] | None = None

    def __call__(self, event: HookEvent) -> None:
        if event.point is HookPoint.COMPLETE:
            p = self.pair
            assert p.src.ram_path is not None and p.dst.ram_path is not None
            self.diff = differing_pages(p.src.ram_path, p.dst.ram_path, p.layout.ram_bytes)


class BlockPagesCompare:
    """COMPLETE hook: the pages of the source RAM that hold one of ``digests`` (blocks a device wrote
    there, e.g. ``fph_lab.disk.ReadOnlyDisk.block_digests``), and those of them that differ at the
    destination. A difference there is a lost write whatever the guest does with the rest of its memory."""

    def __init__(self, pair: FphPair, digests: set[bytes]) -> None:
        self.pair = pair
        self.digests = digests
        self.holding: list[int] | None = None
        self.differing: list[int] | None = None

    def __call__(self, event: HookEvent) -> None:
        if event.point is not HookPoint.COMPLETE:
            return
        p = self.pair
        assert p.src.ram_path is not None and p.dst.ram_path is not None
        size = p.layout.ram_bytes
        src = np.memmap(p.src.ram_path, dtype=np.uint8, mode="r", shape=(size,)).reshape(-1, PAGE_SIZE)
        dst = np.memmap(p.dst.ram_path, dtype=np.uint8, mode="r", shape=(size,)).reshape(-1, PAGE_SIZE)
        self.holding = [i for i in range(src.shape[0]) if page_digest(src[i].tobytes()) in self.digests]
        self.differing = [i for i in self.holding if not np.array_equal(src[i], dst[i])]
