"""A read-only virtio-blk disk of random bytes, shared by a migration's two VMs.

A read from it lands in the guest's page cache by device DMA: QEMU writes the blocks into pages the guest
allocated, and with ``init_on_alloc=0`` no CPU store touches those pages first, so the TCG write log never
sees them. Both QEMUs open the image read-only (shared storage, as a migration needs). Two checks follow a
migration: every page of the source RAM that holds a block of the disk must be equal at the destination
(:meth:`ReadOnlyDisk.block_digests`, ``fph_lab.ram_compare.BlockPagesCompare``), and the guest's
``md5sum /dev/vda``, served from its page cache, must equal :attr:`ReadOnlyDisk.md5`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fph.ram_layout import PAGE_SIZE
from fph_lab.errors import GuestConsoleError
from fph_lab.serial import SerialConsole

MiB = 1 << 20
GUEST_DEVICE = "/dev/vda"


def page_digest(page: bytes) -> bytes:
    return hashlib.blake2b(page, digest_size=8).digest()


@dataclass
class ReadOnlyDisk:
    """``mib`` MiB of seeded random bytes at ``path``; :attr:`qemu_args` attaches it as ``/dev/vda``."""

    path: Path
    mib: int = 128
    seed: int = 0
    md5: str = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        digest = hashlib.md5()
        with self.path.open("wb") as f:
            for _ in range(self.mib):
                chunk = rng.integers(0, 256, MiB, dtype=np.uint8).tobytes()
                digest.update(chunk)
                f.write(chunk)
        self.md5 = digest.hexdigest()

    @property
    def qemu_args(self) -> tuple[str, ...]:
        return (
            "-drive",
            f"file={self.path},if=none,id=disk0,format=raw,readonly=on",
            "-device",
            "virtio-blk-pci,drive=disk0",
        )

    def block_digests(self) -> set[bytes]:
        """A digest of each 4 KiB block (random: no two alike), to find the guest pages that cache one."""
        data = np.fromfile(self.path, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        return {page_digest(b.tobytes()) for b in data}

    def read_into_page_cache(self, console: SerialConsole) -> None:
        """Read the whole disk through the guest's page cache, and keep the device open in the guest's
        shell (fd 3) so that the cache outlives the read (a block device's cache goes at its last close)."""
        out = console.run(f"exec 3<{GUEST_DEVICE}; dd if={GUEST_DEVICE} of=/dev/null bs=1M", timeout=300.0)
        if f"{self.mib}+0 records out" not in out:
            raise GuestConsoleError(f"reading {GUEST_DEVICE} in the guest failed: {out.strip()!r}")

    def guest_md5(self, console: SerialConsole) -> str:
        """The disk's md5 as the guest sees it (through its page cache, where the blocks are cached)."""
        out = console.run(f"md5sum {GUEST_DEVICE}", timeout=300.0)
        for line in out.splitlines():  # the guest's background programs print to the same console
            words = line.split()
            if len(words) == 2 and words[1] == GUEST_DEVICE:
                return words[0]
        raise GuestConsoleError(f"md5sum {GUEST_DEVICE} printed no digest: {out.strip()!r}")

    def cached_kb(self, console: SerialConsole) -> int:
        """The guest's ``Buffers`` (a block device's page cache), in KiB."""
        for line in console.run("grep Buffers: /proc/meminfo").splitlines():
            if line.startswith("Buffers:"):
                return int(line.split()[1])
        raise GuestConsoleError("no Buffers line in the guest's /proc/meminfo")
