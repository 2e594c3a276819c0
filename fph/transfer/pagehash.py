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
    class_out: npt.NDArray[np.uint8],
    hash_out: npt.NDArray[np.uint64],
    fill_out: npt.NDArray[np.uint64] | None = None,
    *,
    copy_zero_pages: bool = True,
) -> int:
    """Copy whole pages ``src`` -> ``dst`` (a bounce buffer), classify each page (``PAGE_DATA``,
    ``PAGE_ZERO``, or ``PAGE_FILL``: one repeated 8-byte value, kept in ``fill_out``) and fingerprint it,
    in one pass over memory: classes and fingerprints describe exactly the bytes in ``dst``. Returns the
    count of zero and fill pages. ``copy_zero_pages=False``: zero pages are read, not copied (their
    ``dst`` bytes are stale; for callers that send them as markers)."""
    n = src.nbytes // PAGE_SIZE
    if src.nbytes % PAGE_SIZE or dst.nbytes < src.nbytes or class_out.shape[0] < n or hash_out.shape[0] < n:
        raise ValueError(
            f"copy_scan: {src.nbytes} bytes into {dst.nbytes}, outputs for {class_out.shape[0]} pages"
        )
    if fill_out is None:
        fill_out = np.empty(n, dtype=np.uint64)
    elif fill_out.shape[0] < n:
        raise ValueError(f"copy_scan: fill values for {fill_out.shape[0]} of {n} pages")
    kernel = kernels.copy_scan if copy_zero_pages else kernels.copy_scan_data
    return int(
        kernel(
            src.reshape(-1).view(np.uint64),
            dst[: src.nbytes].reshape(-1).view(np.uint64),
            class_out[:n],
            hash_out[:n],
            fill_out[:n],
        )
    )


def warm_up() -> None:
    """Load every page kernel (numba's on-disk cache, or a compile) now, not inside a stop window."""
    pages = np.zeros(2 * PAGE_SIZE, dtype=np.uint8)
    hashes = page_hashes(pages)
    changed_pages(pages, np.ones(2, dtype=np.uint8), hashes)
    for copy_zero_pages in (True, False):
        copy_scan(
            pages,
            np.empty_like(pages),
            np.empty(2, dtype=np.uint8),
            np.empty(2, dtype=np.uint64),
            copy_zero_pages=copy_zero_pages,
        )
