"""Helpers that check a write log against a real guest: RAM-file snapshots, page diffs, the classification
of misses that are known TCG blind spots, and a tiny guest program with page-straddling stores.

Why: "every page whose content changed between two snapshots has its bit set" is the property that
matters for a migration, and it can only be tested against real guest writes. A miss is explained (and
reported, not hidden) when it only flips x86 PTE Accessed/Dirty bits, which TCG's page walker sets with
an uninstrumented host cmpxchg.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE, RamLayout
from fph.writelog.base import Words
from fph.writelog.errors import PluginBuildError
from fph.writelog.tcg import plugin_cache_dir

PTE_ACCESSED_DIRTY = np.uint64(0x60)
"""x86 PTE bits 5 (Accessed) and 6 (Dirty), set by the page walker."""
GUEST_SOURCES = Path(__file__).with_name("guest")
GUEST_FLAGS = (
    "-static", "-nostdlib", "-ffreestanding", "-fno-builtin", "-Os", "-fno-pie", "-no-pie",
    "-fno-asynchronous-unwind-tables", "-fno-stack-protector", "-fcf-protection=none",
    "-Wl,--build-id=none", "-s", "-Wl,-n", "-Wall",
)  # fmt: skip


def snapshot(ram_path: Path) -> npt.NDArray[np.uint64]:
    """The RAM file as uint64 words (a copy)."""
    return np.fromfile(ram_path, dtype=np.uint64)


def changed_pages(before: npt.NDArray[np.uint64], after: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """Per RAM-file page: did any byte change?"""
    words = PAGE_SIZE // 8
    return np.asarray((before.reshape(-1, words) != after.reshape(-1, words)).any(axis=1))


def logged_file_pages(words: Words, layout: RamLayout) -> npt.NDArray[np.bool_]:
    """Per RAM-file page: is its GPA's bit set in the harvested ``words``?"""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
    out = np.zeros(layout.ram_bytes >> PAGE_SHIFT, dtype=bool)
    for r in layout:
        g, o, n = r.gpa >> PAGE_SHIFT, r.offset >> PAGE_SHIFT, r.size >> PAGE_SHIFT
        out[o : o + n] = bits[g : g + n]
    return out


def only_pte_ad_bits(before: npt.NDArray[np.uint64], after: npt.NDArray[np.uint64], page: int) -> bool:
    """True when page ``page`` differs only in bits 5/6 of words that are present PTEs (bit 0)."""
    words = PAGE_SIZE // 8
    a = before[page * words : (page + 1) * words]
    b = after[page * words : (page + 1) * words]
    diff = a ^ b
    nz = diff != 0
    if not nz.any():
        return True
    return bool(((diff[nz] & ~PTE_ACCESSED_DIRTY) == 0).all() and ((b[nz] & np.uint64(1)) == 1).all())


@dataclass
class CoverageReport:
    """Outcome of comparing snapshots with a harvest. ``unexplained`` must be empty."""

    changed: int
    logged: int
    logged_unchanged: int
    missed_pte_ad_only: list[int] = field(default_factory=list)
    unexplained: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "changed": self.changed,
            "logged": self.logged,
            "logged_unchanged": self.logged_unchanged,
            "missed_pte_ad_only": len(self.missed_pte_ad_only),
            "unexplained": self.unexplained[:20],
        }


def coverage(
    before: npt.NDArray[np.uint64], after: npt.NDArray[np.uint64], words: Words, layout: RamLayout
) -> CoverageReport:
    """Check that every changed RAM-file page is logged; classify the misses."""
    changed = changed_pages(before, after)
    logged = logged_file_pages(words, layout)
    missed = np.flatnonzero(changed & ~logged)
    rep = CoverageReport(int(changed.sum()), int(logged.sum()), int((logged & ~changed).sum()))
    for p in missed:
        (rep.missed_pte_ad_only if only_pte_ad_bits(before, after, int(p)) else rep.unexplained).append(
            int(p)
        )
    return rep


def build_guest_program(name: str, cache_dir: Path | None = None, cc: str | None = None) -> Path:
    """Build ``guest/<name>.c`` (static, no libc, ~1 KB) into the plugin cache, keyed by its sources."""
    src = (GUEST_SOURCES / f"{name}.c").read_bytes() + (GUEST_SOURCES / "nolibc.h").read_bytes()
    compiler = shutil.which(cc or os.environ.get("CC") or "cc")
    if not compiler:
        raise PluginBuildError(f"no C compiler to build the guest program {name}: install gcc")
    key = hashlib.sha256(src + b"\0".join(f.encode() for f in GUEST_FLAGS)).hexdigest()[:16]
    cache = cache_dir or plugin_cache_dir()
    out = cache / f"{name}-{key}"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=cache)
    os.close(fd)
    p = subprocess.run(
        [compiler, *GUEST_FLAGS, "-o", tmp, str(GUEST_SOURCES / f"{name}.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        os.unlink(tmp)
        raise PluginBuildError(f"building the guest program {name} failed:\n{p.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    return out


def build_straddler(cache_dir: Path | None = None, cc: str | None = None) -> Path:
    """The guest program with page-straddling stores (guest/straddle.c)."""
    return build_guest_program("straddle", cache_dir, cc)


class _Console(Protocol):
    def run(self, command: str, timeout: float = 60.0, check: bool = True) -> str: ...


def upload(console: _Console, local: Path, remote: str, chunk: int = 600) -> None:
    """Copy a small file into the guest over the serial console (base64 in chunks; busybox base64)."""
    data = base64.b64encode(local.read_bytes()).decode()
    console.run(f"rm -f {remote}.b64")
    for i in range(0, len(data), chunk):
        console.run(f"echo {data[i : i + chunk]} >> {remote}.b64")
    console.run(f"base64 -d {remote}.b64 > {remote} && chmod +x {remote} && rm {remote}.b64")
