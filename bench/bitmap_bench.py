"""Bitmap engine and page kernel speed as ratios to a floor measured in the same run, on the same data.

    .venv/bin/python bench/bitmap_bench.py --reps 21 --json bench/results/bitmap_bench.json

A 64 GiB guest (2^24 pages, 2 MiB per bitmap) and a 1 GiB memfd mapping for the page kernels. Each
kernel and its floor run ``--reps`` times each, in blocks that alternate three times (kernel, floor,
kernel, ...; each block starts with an untimed call, so both run with their data as warm as a tight loop
of calls leaves it), with the same state restored (untimed) before every repetition. ``ms`` and
``floor_ms`` are the best repetitions (the host is shared: the best is the least disturbed), medians
beside them. Range clears are also timed with the caches flushed before each repetition (``*_cold``).

Floors: a streaming kernel's is a numpy pass over the same bytes (``np.bitwise_or(a, b, out=a)``, a read
``np.bitwise_or.reduce``, ``np.copyto``), target ``ms <= 1.5 x floor_ms``. Range clears and run extraction
are not streams: their floor is the ``bitarray`` reference implementation on the same data, target
``ms <= floor_ms / 10``. ``warm_start_s`` is the time a fresh process with a populated numba cache needs to
import ``fph.dirty_bitmap`` and have every bitmap kernel loaded (``warm_up()`` returned), measured inside
the process, so interpreter start-up is not in it; target <= 0.5 s.

The JSON holds one object per kernel at the top level (``ms``, ``floor_ms``, ``floor``, ``ratio`` =
ms / floor_ms, ``target``, ``met``, medians and samples), ``warm_start_s`` with ``warm_start`` (its
definition and parts: ``import numba`` alone, bare interpreter start-up, a cold compile), a few more
figures (``count_dirty_us``, ``apply_hints_batch_256x4mib*_us``) and ``machine``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import llvmlite.binding as llvm
import numba
import numpy as np
from bitarray import bitarray
from bitarray import util as bautil

from fph import dirty_bitmap
from fph.dirty_bitmap import DirtyBitmap, warm_up, zero_page_flags
from fph.ram_layout import PAGE_SIZE, RamLayout
from fph.transfer.pagehash import copy_scan, page_hashes
from fph.transfer.wire import MAX_FRAME_PAGES

PAGES = 1 << 24
RAM_BYTES = 1 << 30
STREAM_MAX_RATIO = 1.5
"""A streaming kernel's target: at most this times its numpy floor."""
REFERENCE_MIN_SPEEDUP = 10.0
"""Range clears and run extraction: at least this much faster than the bitarray reference."""
WARM_START_MAX_S = 0.5

Fn = Callable[[], Any]

ROUNDS = 3
"""Each kernel and its floor alternate in this many blocks."""
FLUSH = np.ones((128 << 20) // 8)
"""Walked between a cold repetition's set-up and its timing: 128 MiB, 4x this host's L3."""


def flush_caches() -> None:
    FLUSH[::8] += 1.0  # one store per 64-byte line


def pair(
    kernel: Fn,
    floor: Fn,
    reps: int,
    setup: Fn | None = None,
    floor_setup: Fn | None = None,
    cold: bool = False,
) -> dict[str, Any]:
    """Time ``kernel`` and ``floor``, ``reps`` times each in ``ROUNDS`` alternating blocks, ``setup``
    untimed before each call (then the caches flushed, with ``cold``)."""
    ks: list[float] = []
    fs: list[float] = []
    per_block = -(-reps // ROUNDS)
    for _ in range(ROUNDS):
        for fn, prep, out in ((kernel, setup, ks), (floor, floor_setup or setup, fs)):
            for i in range(per_block + 1):
                if prep is not None:
                    prep()
                if cold:
                    flush_caches()
                t0 = time.perf_counter()
                fn()
                if i:  # the block's first call only warms up
                    out.append(time.perf_counter() - t0)
    return {
        "ms": round(min(ks) * 1e3, 6),
        "floor_ms": round(min(fs) * 1e3, 6),
        "ms_median": round(statistics.median(ks) * 1e3, 4),
        "floor_ms_median": round(statistics.median(fs) * 1e3, 4),
        "samples_ms": [round(x * 1e3, 4) for x in ks],
        "floor_samples_ms": [round(x * 1e3, 4) for x in fs],
    }


def best_ms(fn: Fn, reps: int, setup: Fn | None = None, cold: bool = False) -> float:
    samples = []
    for _ in range(reps):
        if setup is not None:
            setup()
        if cold:
            flush_caches()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return round(min(samples) * 1e3, 6)


def streaming(row: dict[str, Any], floor: str) -> dict[str, Any]:
    ratio = row["ms"] / row["floor_ms"]
    return {
        "floor": floor,
        **row,
        "ratio": round(ratio, 3),
        "target": f"ms <= {STREAM_MAX_RATIO} x floor_ms",
        "met": ratio <= STREAM_MAX_RATIO,
    }


def against_reference(row: dict[str, Any], floor: str) -> dict[str, Any]:
    speedup = row["floor_ms"] / row["ms"]
    return {
        "floor": floor,
        **row,
        "ratio": round(row["ms"] / row["floor_ms"], 4),
        "speedup": round(speedup, 2),
        "target": f"ms <= floor_ms / {REFERENCE_MIN_SPEEDUP:g}",
        "met": speedup >= REFERENCE_MIN_SPEEDUP,
    }


def fresh_epoch(bm: DirtyBitmap, epoch: int) -> None:
    """Every page dirty again and hint epoch ``epoch`` open: the state each apply run starts from."""
    bm.close_epoch()
    bm.mark_all()
    bm.open_epoch(epoch)


def hint_ranges(rng: np.random.Generator, n: int) -> np.ndarray:
    """n ranges of 1-1024 pages at random page offsets (a spread of hint batch sizes)."""
    npages = rng.integers(1, 1025, n, dtype=np.uint64)
    start = rng.integers(0, PAGES - 1024, n, dtype=np.uint64)
    return np.stack([start * np.uint64(PAGE_SIZE), npages * np.uint64(PAGE_SIZE)], axis=1)


def bitmap_kernels(rng: np.random.Generator, reps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    bm = DirtyBitmap(RamLayout.flat(PAGES * PAGE_SIZE))
    rows: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    # -- apply 100,000 hint ranges (the API: validation, locks and counts included) vs bitarray slices
    ranges = hint_ranges(rng, 100_000)
    ba = bitarray(PAGES, endian="little")
    page_ranges = [(int(a) // PAGE_SIZE, int(a + b) // PAGE_SIZE) for a, b in ranges]

    def ba_hints() -> None:
        for lo, hi in page_ranges:
            ba[lo:hi] = 0

    def apply() -> None:
        bm.apply_hints(2, ranges)

    def fresh() -> None:
        fresh_epoch(bm, 2)

    def fresh_ba() -> None:
        ba.setall(1)

    floor = "bitarray: ba[lo:hi] = 0 per range, in a Python loop"
    rows["apply_hints_100k"] = against_reference(pair(apply, ba_hints, reps, fresh, fresh_ba), floor)
    cold_row = against_reference(
        pair(apply, ba_hints, reps, fresh, fresh_ba, cold=True), floor + "; caches flushed before each call"
    )
    # Information beside the target (the target compares both on the same warm data, as above).
    cold_row["target"] = "none (information: both sides with flushed caches)"
    cold_row["met"] = None
    rows["apply_hints_100k_cold"] = cold_row
    saved_ratio = dirty_bitmap.SWEEP_RATIO
    dirty_bitmap.SWEEP_RATIO = 0  # force range by range, the only way before the sweep
    try:
        rows["apply_hints_100k"]["range_by_range_ms"] = best_ms(apply, reps, fresh)
        rows["apply_hints_100k_cold"]["range_by_range_ms"] = best_ms(apply, reps, fresh, cold=True)
    finally:
        dirty_bitmap.SWEEP_RATIO = saved_ratio
    bm.close_epoch()

    # -- merge a full write log (random 50 % of the bits, every word non-zero) into the hinted bitmap
    fresh_epoch(bm, 2)
    bm.apply_hints(2, ranges)
    bm.close_epoch()
    log = rng.integers(0, 2**63, bm.nwords, dtype=np.uint64) | np.uint64(1)
    saved = bm.dirty.copy()
    saved_count = bm.count_dirty()
    plain = saved.copy()

    def restore() -> None:  # rewinds the words behind the API; the counter is put back too
        np.copyto(bm.dirty, saved)
        bm._dirty_count = saved_count

    def restore_plain() -> None:
        np.copyto(plain, saved)

    def or_and_read_hinted() -> None:  # the same bytes: the counts of re-dirtied pages read the hinted map
        np.bitwise_or(plain, log, out=plain)
        np.bitwise_or.reduce(bm.hinted)

    row = pair(lambda: bm.merge_write_log(log), or_and_read_hinted, reps, restore, restore_plain)
    rows["merge_write_log"] = streaming(
        row,
        "numpy: np.bitwise_or(dirty, log, out=dirty) plus one read of the hinted map: the bytes the merge "
        "must touch (its count of pages re-dirtied after a hint reads that map)",
    )
    rows["merge_write_log"]["bare_or_ms"] = best_ms(
        lambda: np.bitwise_or(plain, log, out=plain), reps, restore_plain
    )
    rows["merge_write_log"]["ratio_to_bare_or"] = round(
        rows["merge_write_log"]["ms"] / rows["merge_write_log"]["bare_or_ms"], 3
    )

    # -- count dirty pages: a popcount over the whole bitmap vs one read of it
    restore()
    assert bm.count_dirty() == bm.recount_dirty()
    row = pair(bm.recount_dirty, lambda: np.bitwise_or.reduce(bm.dirty), reps)
    rows["recount_dirty"] = streaming(row, "numpy: np.bitwise_or.reduce(dirty), one read of the same words")
    extra["count_dirty_us"] = round(best_ms(bm.count_dirty, reps) * 1e3, 3)  # the counter the sender reads

    # -- mark every page dirty (round 0), from the merged state
    row = pair(
        bm.mark_all, lambda: np.bitwise_or(plain, bm.ram_mask, out=plain), reps, restore, restore_plain
    )
    rows["mark_all"] = streaming(row, "numpy: np.bitwise_or(dirty, ram_mask, out=dirty), same words")

    # -- extract 5,000 dirty runs (bitmap fragmented by 10,000 hint ranges: ~9,000 runs) vs bitarray
    fresh_epoch(bm, 2)
    bm.apply_hints(2, ranges[:10_000])
    bm.close_epoch()
    fragmented = bm.dirty.copy()
    sent_saved = bm.sent.copy()
    hinted_saved = bm.hinted.copy()
    frag_count = bm.count_dirty()

    def restore_runs() -> None:
        np.copyto(bm.dirty, fragmented)
        np.copyto(bm.sent, sent_saved)
        np.copyto(bm.hinted, hinted_saved)
        bm._cursor = 0
        bm._dirty_count = frag_count

    frag_ba = bitarray(endian="little")
    frag_ba.frombytes(fragmented.tobytes())
    runs_out: list[int] = []

    def ba_runs() -> None:
        got = list(islice((iv for iv in bautil.intervals(frag_ba) if iv[0] == 1), 5000))
        for _, lo, hi in got:
            frag_ba[lo:hi] = 0
        runs_out.append(len(got))

    def ba_restore() -> None:
        frag_ba[:] = bitarray(fragmented.tobytes(), endian="little")

    def take() -> None:
        runs_out.append(len(bm.take_dirty_runs(PAGES * PAGE_SIZE, 5000)))

    row = pair(take, ba_runs, reps, restore_runs, ba_restore)
    assert set(runs_out) == {5000}, set(runs_out)
    rows["take_runs_5k"] = against_reference(
        row, "bitarray: util.intervals() for 5,000 runs, ba[lo:hi] = 0 per run, in a Python loop"
    )

    # -- what a guest really sends: 4 MiB blocks, a virtqueue's worth (256) per call, through the API
    blocks = rng.integers(0, PAGES // 1024, (reps, 256)).astype(np.uint64) * np.uint64(1024 * PAGE_SIZE)
    batches = iter([np.stack([b, np.full(256, 1024 * PAGE_SIZE, np.uint64)], axis=1) for b in blocks])
    fresh_epoch(bm, 3)
    extra["apply_hints_batch_256x4mib_us"] = round(
        best_ms(lambda: bm.apply_hints(3, next(batches)), reps) * 1e3, 1
    )
    blocks = rng.integers(0, PAGES // 1024, (reps, 256)).astype(np.uint64) * np.uint64(1024 * PAGE_SIZE)
    batches = iter([np.stack([b, np.full(256, 1024 * PAGE_SIZE, np.uint64)], axis=1) for b in blocks])
    extra["apply_hints_batch_256x4mib_cold_us"] = round(
        best_ms(lambda: bm.apply_hints(3, next(batches)), reps, cold=True) * 1e3, 1
    )
    bm.close_epoch()
    return rows, extra


def page_kernels(reps: int) -> dict[str, Any]:
    """Zero-page flags, fingerprints and the sender's copy/scan over a 1 GiB memfd mapping."""
    rows: dict[str, Any] = {}
    fd = os.memfd_create("fph-bench-ram")
    try:
        os.ftruncate(fd, RAM_BYTES)
        mm = mmap.mmap(fd, RAM_BYTES, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    ram = np.frombuffer(mm, dtype=np.uint8)
    ram[:] = 0  # populate every page: the kernels must measure memory, not page faults
    words = ram.view(np.uint64)
    npages = RAM_BYTES // PAGE_SIZE
    flags = np.empty(npages, dtype=np.uint8)

    def read() -> None:
        np.bitwise_or.reduce(words)

    read_floor = "numpy: np.bitwise_or.reduce over the same GiB (one read)"
    row = pair(lambda: zero_page_flags(ram, flags), read, reps)
    assert int(flags.sum()) == npages
    rows["zero_page_flags"] = streaming(row, read_floor + "; all pages zero, every byte read")
    ram.reshape(-1, PAGE_SIZE)[::2, 100] = 0x5A  # every other page holds data
    row = pair(lambda: zero_page_flags(ram, flags), read, reps)
    assert int(flags.sum()) == npages // 2
    rows["zero_page_flags_mixed"] = streaming(row, read_floor + "; every other page holds data")

    hashes = np.empty(npages, dtype=np.uint64)
    row = pair(lambda: page_hashes(ram, hashes), read, reps)
    rows["page_hashes"] = streaming(row, read_floor)

    chunk = MAX_FRAME_PAGES * PAGE_SIZE
    chunks = [ram[o : o + chunk] for o in range(0, RAM_BYTES, chunk)]
    bounce = np.empty(chunk, dtype=np.uint8)
    zero = np.empty(MAX_FRAME_PAGES, dtype=np.uint8)
    fingerprints = np.empty(MAX_FRAME_PAGES, dtype=np.uint64)

    def scan_all() -> None:
        for c in chunks:
            copy_scan(c, bounce, zero, fingerprints)

    def copy_all() -> None:
        for c in chunks:
            np.copyto(bounce, c)

    row = pair(scan_all, copy_all, reps)
    rows["copy_scan"] = streaming(
        row,
        f"numpy: np.copyto into the same {chunk >> 20} MiB bounce buffer, same {MAX_FRAME_PAGES}-page chunks",
    )
    for key in rows:
        rows[key]["gbps"] = round(RAM_BYTES / rows[key]["ms"] / 1e6, 2)
        rows[key]["floor_gbps"] = round(RAM_BYTES / rows[key]["floor_ms"] / 1e6, 2)
    return rows


def subprocess_seconds(code: str, env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


BITMAP_READY = (
    "import time; t = time.perf_counter(); import fph.dirty_bitmap as d; d.warm_up(); "
    "print(time.perf_counter() - t)"
)
ALL_READY = (
    "import time; t = time.perf_counter(); import fph.dirty_bitmap as d; d.warm_up(); "
    "import numpy as np; from fph.transfer import pagehash as ph; z = np.zeros(4096, np.uint8); "
    "ph.copy_scan(z, z.copy(), np.zeros(1, np.uint8), np.zeros(1, np.uint64)); h = ph.page_hashes(z); "
    "ph.changed_pages(z, np.ones(1, np.uint8), h); print(time.perf_counter() - t)"
)
IMPORT_NUMBA = "import time; t = time.perf_counter(); import numba; print(time.perf_counter() - t)"


def interpreter_start_s(env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - t0


def warm_start(reps: int) -> dict[str, Any]:
    """Fresh interpreters on a private numba cache: the first compiles it, the rest load from it."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="fph-numba-cache-") as cache:
        env["NUMBA_CACHE_DIR"] = cache
        cold = subprocess_seconds(ALL_READY, env)  # empty cache: compiles every kernel
        bitmap = [subprocess_seconds(BITMAP_READY, env) for _ in range(reps)]
        every = [subprocess_seconds(ALL_READY, env) for _ in range(reps)]
    numba_import = [subprocess_seconds(IMPORT_NUMBA, env) for _ in range(reps)]
    bare = [interpreter_start_s(env) for _ in range(reps)]
    return {
        "warm_start_s": round(min(bitmap), 3),
        "warm_start": {
            "definition": (
                "a fresh interpreter with a populated numba cache: seconds from before 'import "
                "fph.dirty_bitmap' to 'fph.dirty_bitmap.warm_up()' returned (every bitmap kernel loaded), "
                "timed inside the process, so interpreter start-up is excluded; best of the samples"
            ),
            "target_s": WARM_START_MAX_S,
            "met": min(bitmap) <= WARM_START_MAX_S,
            "median_s": round(statistics.median(bitmap), 3),
            "samples_s": [round(x, 3) for x in bitmap],
            "all_kernels_s": round(min(every), 3),
            "all_kernels_definition": (
                "the same plus fph.transfer.pagehash's kernels (copy_scan, page_hashes, changed_pages)"
            ),
            "import_numba_s": round(min(numba_import), 3),
            "interpreter_start_s": round(min(bare), 3),
            "cold_compile_s": round(cold, 3),
        },
    }


def machine() -> dict[str, Any]:
    cpu = "?"
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ln.startswith("model name"):
            cpu = ln.split(":", 1)[1].strip()
            break
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "llvm_cpu": llvm.get_host_cpu_name(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def kernels_of(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in res.items() if isinstance(v, dict) and "floor_ms" in v}


def report(res: dict[str, Any]) -> str:
    lines = [
        f"{'kernel':<22}{'ms':>10}{'floor_ms':>10}{'ratio':>8}  {'target':<24}{'':<5}floor",
    ]
    for name, r in kernels_of(res).items():
        target = f"<= {STREAM_MAX_RATIO}x" if "speedup" not in r else f">= {REFERENCE_MIN_SPEEDUP:g}x faster"
        if r["met"] is None:
            target = "(information)"
        got = f"{r['ratio']:.3f}" if "speedup" not in r else f"1/{r['speedup']:.1f}"
        lines.append(
            f"{name:<22}{r['ms']:>10.4f}{r['floor_ms']:>10.4f}{got:>8}  {target:<24}"
            f"{'info' if r['met'] is None else 'pass' if r['met'] else 'MISS':<5}{r['floor']}"
        )
    ws = res["warm_start"]
    lines.append(
        f"{'warm_start_s':<22}{res['warm_start_s']:>10.3f}{'':>10}{'':>8}  {'<= 0.5 s':<24}"
        f"{'pass' if ws['met'] else 'MISS':<5}(import numba alone {ws['import_numba_s']} s)"
    )
    lines.append("")
    lines.append("medians (ms / floor_ms):")
    for name, r in kernels_of(res).items():
        lines.append(f"  {name:<20}{r['ms_median']:>10.4f}{r['floor_ms_median']:>10.4f}")
    lines.append("page kernels, GB/s (kernel / floor):")
    for name, r in kernels_of(res).items():
        if "gbps" in r:
            lines.append(f"  {name:<20}{r['gbps']:>10}{r['floor_gbps']:>10}")
    lines.append("more:")
    for key in ("apply_hints_100k", "apply_hints_100k_cold"):
        by_range = res[key]["range_by_range_ms"]
        lines.append(f"  {key} range by range (SWEEP_RATIO 0): {by_range} ms")
    merge = res["merge_write_log"]
    lines.append(
        f"  merge_write_log against a bare OR (no hinted map): {merge['bare_or_ms']} ms, "
        f"ratio {merge['ratio_to_bare_or']}"
    )
    for key in ("count_dirty_us", "apply_hints_batch_256x4mib_us", "apply_hints_batch_256x4mib_cold_us"):
        lines.append(f"  {key}: {res[key]}")
    for key in ("all_kernels_s", "import_numba_s", "interpreter_start_s", "cold_compile_s"):
        lines.append(f"  warm_start {key}: {ws[key]}")
    lines.append(f"  machine: {json.dumps(res['machine'])}")
    lines.append(f"  pages {res['pages']}, RAM mapping {res['ram_bytes']} bytes, reps {res['reps']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    reps = args.reps
    warm_up()
    rows, extra = bitmap_kernels(np.random.default_rng(42), reps)
    rows.update(page_kernels(reps))
    res: dict[str, Any] = {**rows, **extra, "pages": PAGES, "ram_bytes": RAM_BYTES, "reps": reps}
    res.update(warm_start(max(5, reps // 3)))
    res["machine"] = machine()
    print(report(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
