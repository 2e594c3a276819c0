"""The stop window's page work: the final round and the switchover check, one after the other or side by side.

No guests: a source RAM file with a migration's mix (``--data-share`` of its pages hold data, the rest
zero) goes to an in-process receiver over mutual TLS on loopback, capped at ``--bandwidth``, as fph's
Precopy round 0. Then, as with the guest stopped: ``--dirty`` pages that went on the wire are rewritten and
logged (the final round sends them) and ``--unlogged`` others change with no log entry (a page walker's
Accessed bit: the check resends them). Timed: the final round plus the check with its resends, serial
(``final_round()`` then ``verify_and_resend()``) against side by side (``final_round(check_beside=True)``),
interleaved, ``--runs`` each; every destination is compared with its source. ``serial-threads``: the serial
check on ``PrecopyConfig.check_threads`` threads. ``--zero-allocated``: the zero pages are written zeros,
not holes (the pages a guest zeroed while it hinted them: round 0 reads them, the check re-reads them).

    python bench/switchover_bench.py --runs 8 --json bench/results/switchover_bench.json
    python bench/switchover_bench.py --zero-allocated --dirty 20 --variants serial,serial-threads \
        --runs 6 --json bench/results/switchover_bench-zero-allocated.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fph.dirty_bitmap import DirtyBitmap
from fph.migration.precopy import Precopy, PrecopyConfig
from fph.ram_layout import PAGE_SIZE, RamLayout
from fph.transfer.ram_file import RamFile
from fph.transfer.receiver import RamReceiver
from fph.transfer.security import DataPlaneSecurity, new_credential
from fph.transfer.sender import RamSender
from fph_lab.certs import LabPki, make_pki

MiB = 1 << 20


def make_source(
    path: Path, mem_mib: int, data_share: float, seed: int = 1, zero_allocated: bool = False
) -> npt.NDArray[np.int64]:
    """A RAM file whose pages are data (random bytes) with probability ``data_share``, else zero (holes,
    or with ``zero_allocated`` zeros written: pages a guest zeroed, which round 0 reads and the check
    re-reads); returns the data pages' file page indexes."""
    npages = mem_mib * MiB // PAGE_SIZE
    rng = np.random.default_rng(seed)
    data_pages = np.flatnonzero(rng.random(npages) < data_share)
    with open(path, "wb") as f:
        f.truncate(mem_mib * MiB)
    ram = np.memmap(path, dtype=np.uint8, mode="r+", shape=(npages, PAGE_SIZE))
    if zero_allocated:
        ram[:] = 0
    ram[data_pages] = rng.integers(1, 255, (data_pages.size, PAGE_SIZE), dtype=np.uint8)
    ram.flush()
    del ram
    return data_pages


def one(
    pki: LabPki,
    src_path: Path,
    dst_path: Path,
    layout: RamLayout,
    data_pages: npt.NDArray[np.int64],
    args: argparse.Namespace,
    variant: str,
    trial: int,
) -> dict[str, Any]:
    """One stop window: ``variant`` is ``serial`` (the check after the final round, one thread),
    ``serial-threads`` (the same on ``PrecopyConfig.check_threads`` threads) or ``beside``."""
    beside = variant == "beside"
    threads = PrecopyConfig().check_threads if variant == "serial-threads" else 1
    with open(dst_path, "wb") as f:
        f.truncate(layout.ram_bytes)
    src = RamFile(src_path, layout, writable=True)
    dst = RamFile(dst_path, layout, writable=True)
    credential = new_credential()
    receiver = RamReceiver(dst, accept_timeout=30, security=DataPlaneSecurity(credential, pki.host("dst")))
    sender = RamSender(
        receiver.start(),
        src,
        bandwidth=args.bandwidth,
        security=DataPlaneSecurity(credential, pki.host("src")),
    )
    bitmap = DirtyBitmap(layout)
    log = np.zeros(bitmap.nwords, dtype=np.uint64)

    def harvest() -> npt.NDArray[np.uint64]:
        out = log.copy()
        log[:] = 0
        return out

    try:
        sender.connect()
        cfg = PrecopyConfig(bandwidth=args.bandwidth, check_threads=threads, check_beside_min_pages=0)
        pc = Precopy(bitmap, src, sender, harvest, config=cfg)
        pc.start()
        pc.run_round()
        rng = np.random.default_rng(1000 + trial)
        picked = rng.choice(data_pages, args.dirty + args.unlogged, replace=False)
        gpas = [layout.offset_to_gpa(int(p) * PAGE_SIZE) >> 12 for p in picked]
        for i, (page, gpa) in enumerate(zip(picked.tolist(), gpas, strict=True)):
            src.buf[page * PAGE_SIZE + 64] ^= 0x5A
            if i < args.dirty:  # the guest's last stores: logged
                log[gpa >> 6] |= np.uint64(1) << np.uint64(gpa & 63)
        t0 = time.perf_counter()
        final = pc.final_round(check_beside=beside)
        t1 = time.perf_counter()
        resent = pc.verify_and_resend()
        t2 = time.perf_counter()
        ack = sender.finish({"rounds": pc.round}, timeout=60)
        rx = receiver.wait(60)
        equal = bool(np.array_equal(src.buf, dst.buf))
        return {
            "mode": variant,
            "trial": trial,
            "stop_window_pages_ms": round((t2 - t0) * 1e3, 2),
            "final_round_ms": round((t1 - t0) * 1e3, 2),
            "check_after_final_ms": round((t2 - t1) * 1e3, 2),
            "check_beside_final_ms": round(pc.result.verify_beside_final_ms, 2),
            "final_pages": final.pages_data,
            "pages_checked": pc.result.verify_pages_checked,
            "pages_resent": resent,
            "ok": bool(ack.get("ok")) and rx.ok and equal and resent == args.unlogged,
        }
    finally:
        sender.close()
        src.close()
        dst.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument("--data-share", type=float, default=0.115, help="share of pages that hold data")
    ap.add_argument("--dirty", type=int, default=210, help="pages the final round sends")
    ap.add_argument("--unlogged", type=int, default=4, help="pages changed with no log entry")
    ap.add_argument("--bandwidth", type=int, default=125_000_000, help="bytes/s (the 1 Gbit/s link's)")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--variants", default="serial,beside", help="of serial, serial-threads, beside")
    ap.add_argument("--zero-allocated", action="store_true", help="zero pages written, not holes")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    layout = RamLayout.pc(args.mem_mib * MiB)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fph-switchover-", dir="/dev/shm") as tmp:
        d = Path(tmp)
        pki = make_pki(d / "pki", {"src": "127.0.0.1", "dst": "127.0.0.1"})
        data_pages = make_source(
            d / "src.ram", args.mem_mib, args.data_share, zero_allocated=args.zero_allocated
        )
        variants = args.variants.split(",")
        for trial in range(args.runs):
            shift = trial % len(variants)  # rotate which goes first
            for variant in variants[shift:] + variants[:shift]:
                r = one(pki, d / "src.ram", d / "dst.ram", layout, data_pages, args, variant, trial)
                print(json.dumps(r), flush=True)
                runs.append(r)
    summary: dict[str, Any] = {}
    for mode in variants:
        sel = [r["stop_window_pages_ms"] for r in runs if r["mode"] == mode]
        summary[f"{mode}_median_ms"] = statistics.median(sel)
        summary[f"{mode}_min_ms"] = min(sel)
        summary[f"{mode}_max_ms"] = max(sel)
        if mode != "serial" and "serial" in variants:
            summary[f"{mode}_over_serial"] = round(
                summary[f"{mode}_median_ms"] / summary["serial_median_ms"], 3
            )
    summary["all_ok"] = all(r["ok"] for r in runs)
    print(json.dumps(summary))
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "host": platform.node(), "runs": runs,
           "summary": summary}  # fmt: skip
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
