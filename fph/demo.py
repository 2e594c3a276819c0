"""The main job's demo. Until the migration engine lands it shows the bitmap engine on a 64 GiB guest:
one precopy round with a free page hint epoch, a write log merge, and what is left to send."""

from __future__ import annotations

import time

import numpy as np

from fph.dirty_bitmap import DirtyBitmap, warm_up
from fph.ram_layout import PAGE_SIZE, GiB, RamLayout

MiB = 1 << 20


def main() -> None:
    t0 = time.perf_counter()
    warm_up()
    print(f"numba kernels ready in {time.perf_counter() - t0:.2f} s")
    layout = RamLayout.pc(64 * GiB)
    print(f"guest: {layout!r}")
    bm = DirtyBitmap(layout)
    bm.mark_all()
    print(f"round 0: {bm.count_dirty() * PAGE_SIZE / GiB:.1f} GiB dirty")
    rng = np.random.default_rng(1)
    bm.open_epoch(0x8000_0000)
    blocks = rng.choice(3 * GiB // (4 * MiB), size=600, replace=False).astype(np.uint64) * np.uint64(4 * MiB)
    hints = np.stack([blocks, np.full_like(blocks, 4 * MiB)], axis=1)
    t = time.perf_counter()
    cleared = bm.apply_hints(0x8000_0000, hints)
    print(
        f"epoch {bm.epoch:#x}: 600 hints of 4 MiB cleared {cleared * PAGE_SIZE / MiB:.0f} MiB "
        f"in {(time.perf_counter() - t) * 1e3:.2f} ms"
    )
    bm.close_epoch()
    stale = bm.apply_hints(0x8000_0000, hints[:10])
    print(f"a late hint of the closed epoch clears {stale} pages (dropped: {bm.stats.hints_dropped_stale})")
    log = np.zeros(bm.nwords, dtype=np.uint64)
    log[: 256 * MiB // PAGE_SIZE // 64] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # the guest rewrote 256 MiB
    bm.merge_write_log(log)
    sent = 0
    while (runs := bm.take_dirty_runs(1 * GiB)).size:
        sent += int(runs[:, 1].sum())
    print(f"sent {sent * PAGE_SIZE / GiB:.2f} GiB; stats: {bm.stats.as_dict()}")


if __name__ == "__main__":
    main()
