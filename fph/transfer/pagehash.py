"""64-bit fingerprints of 4 KiB pages at memory speed, to find pages that changed after they were sent.

A page that differs from its sent copy in a single word (a PTE's Accessed/Dirty bit, the case the TCG
write log misses) always gets a different fingerprint; wider differences collide with probability ~2^-64.
The fingerprint and the page scan behind every function here are in ``fph.kernels`` (the bitmap engine's
zero-page flags are the same scan); this module checks the buffers and shapes them as word arrays.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fph import kernels
from fph.ram_layout import PAGE_SIZE


def page_hashes(
    pages: npt.NDArray[np.uint8], out: npt.NDArray[np.uint64] | None = None
) -> npt.NDArray[np.uint64]:
    """One fingerprint per whole page of ``pages`` (a byte buffer of page multiples)."""
    if pages.nbytes % PAGE_SIZE:
        raise ValueError(f"buffer of {pages.nbytes} bytes is not a whole number of pages")
    n = pages.nbytes // PAGE_SIZE
    if out is None:
        out = np.empty(n, dtype=np.uint64)
    kernels.page_hashes(pages.reshape(-1).view(np.uint64), out)
    return out


def changed_pages(
    pages: npt.NDArray[np.uint8], selected: npt.NDArray[np.uint8], expected: npt.NDArray[np.uint64]
) -> npt.NDArray[np.int64]:
    """Indexes of the selected pages whose fingerprint is no longer ``expected`` (only those are read)."""
    n = pages.nbytes // PAGE_SIZE
    if pages.nbytes % PAGE_SIZE or selected.shape != (n,) or expected.shape != (n,):
        raise ValueError(
            f"{pages.nbytes} bytes vs {selected.shape} selected / {expected.shape} expected pages"
        )
    out = np.empty(n, dtype=np.int64)
    k = kernels.changed_pages(pages.reshape(-1).view(np.uint64), selected, expected, out)
    return out[:k]


def copy_scan(
    src: npt.NDArray[np.uint8],
    dst: npt.NDArray[np.uint8],
    zero_out: npt.NDArray[np.uint8],
    hash_out: npt.NDArray[np.uint64],
) -> int:
    """Copy whole pages ``src`` -> ``dst`` (a bounce buffer), flag zero pages and fingerprint each page,
    in one pass over memory: the flags and fingerprints describe exactly the bytes in ``dst``."""
    n = src.nbytes // PAGE_SIZE
    if src.nbytes % PAGE_SIZE or dst.nbytes < src.nbytes or zero_out.shape[0] < n or hash_out.shape[0] < n:
        raise ValueError(
            f"copy_scan: {src.nbytes} bytes into {dst.nbytes}, outputs for {zero_out.shape[0]} pages"
        )
    return int(
        kernels.copy_scan(
            src.reshape(-1).view(np.uint64),
            dst[: src.nbytes].reshape(-1).view(np.uint64),
            zero_out[:n],
            hash_out[:n],
        )
    )
