"""First-round throughput of fph's data plane on a real 1 GiB guest, beside QEMU's own on the same guest.

    .venv/bin/python bench/throughput_bench.py --runs 2 --json bench/results/throughput.json

Per run: a 1 GiB guest writes 700 MiB and frees it (no balloon: nothing is hinted, so round 0 sends
~820 MiB of data); fph's round 0 rate = its bytes on the wire / the round's send time, with the
receiver in fph's process and in its own (``fph.transfer.receiver``, as on a destination host). Before
sending, round 0 waits for the source mapping to be populated and the destination RAM file to be
allocated (with hints both hide behind the wait for the guest's hint run; here there is none): the rate
including that wait is reported too. The same workload
migrated by QEMU without hints at unlimited bandwidth gives QEMU's rate (``ram.transferred`` /
``total-time``, and QEMU's own ``mbps``). Both run on loopback (fph: TCP on 127.0.0.1; QEMU: a unix
socket). A third figure is fph's data plane alone on a 1 GiB RAM file with no guest running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fph.dirty_bitmap import DirtyBitmap, warm_up
from fph.migration.fph_mode import FphConfig
from fph.migration.precopy import Precopy
from fph.ram_layout import RamLayout
from fph.transfer.ram_file import RamFile
from fph.transfer.receiver import RamReceiver
from fph.transfer.sender import RamSender
from fph_lab.fph_mode import FphPair
from fph_lab.pair import VMPair
from fph_lab.provision import provision
from fph_lab.vm import VMConfig

GiB = 1 << 30


def fph_guest(lab: Any, receiver_process: bool = False) -> dict[str, Any]:
    with FphPair(lab, mem_mib=1024, balloon=False) as p:
        p.src.guest.fill(700)
        p.src.guest.start_hold(32, 1)
        time.sleep(2)
        load = os.getloadavg()[0]
        rep = asyncio.run(p.migration(FphConfig(max_rounds=5), receiver_process=receiver_process).run())
        r0 = rep.rounds[0]
        ok = p.check().ok
    with_wait_s = (r0["send_ms"] + r0["ready_wait_ms"]) / 1e3
    return {
        "round0_bytes": r0["bytes_on_wire"],
        "round0_send_ms": round(r0["send_ms"], 1),
        "round0_gbps": round(r0["bytes_on_wire"] / (r0["send_ms"] / 1e3) / 1e9, 3),
        "round0_ready_wait_ms": round(r0["ready_wait_ms"], 1),
        "round0_gbps_with_ready_wait": round(r0["bytes_on_wire"] / with_wait_s / 1e9, 3),
        "pages_unread_holes": rep.fph["zero_pages_unread"],
        "total_bytes": rep.job_stats["memory_processed"],
        "downtime_ms": rep.job_stats["downtime"],
        "destination_ok": ok,
        "loadavg_1m": load,
    }


def qemu_guest(lab: Any) -> dict[str, Any]:
    with VMPair(lab, VMConfig(mem_mib=1024, balloon="none")) as p:
        p.src.guest.fill(700)
        p.src.guest.start_hold(32, 1)
        time.sleep(2)
        load = os.getloadavg()[0]
        rep = p.migrate_native()
        ok = p.check().ok
    ram = rep.raw.get("ram", {})
    return {
        "bytes": rep.bytes,
        "total_ms": rep.total_ms,
        "gbps": round(rep.bytes / (rep.total_ms / 1e3) / 1e9, 3) if rep.total_ms else None,
        "qemu_mbps": ram.get("mbps"),
        "destination_ok": ok,
        "loadavg_1m": load,
    }


def data_plane_only() -> dict[str, Any]:
    warm_up()
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path("/tmp")
    src, dst = base / f"fph-tp-src-{os.getpid()}.ram", base / f"fph-tp-dst-{os.getpid()}.ram"
    layout = RamLayout.flat(GiB)
    try:
        for p in (src, dst):
            with open(p, "wb") as f:
                f.truncate(GiB)
        ram = RamFile(src, layout, writable=True)
        ram.buf.reshape(-1, 4096)[:, 7] = 0x5A  # every page holds data
        receiver = RamReceiver(RamFile(dst, layout, writable=True))
        addr = receiver.start()
        time.sleep(0.5)
        while receiver.prepare_s == 0.0:
            time.sleep(0.05)
        channel = RamSender(addr, RamFile(src, layout, writable=False))
        channel.connect()
        bitmap = DirtyBitmap(layout)
        pc = Precopy(bitmap, channel.ram, channel, lambda: np.zeros(bitmap.nwords, dtype=np.uint64))
        pc.start()
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        rs = pc.run_round()
        channel.finish({})
        dt = time.perf_counter() - t0
        ok = receiver.wait(30).ok and bool(np.array_equal(ram.buf, receiver.ram.buf))
        channel.close()
        return {
            "bytes": rs.bytes_on_wire,
            "seconds": round(dt, 3),
            "gbps": round(rs.bytes_on_wire / dt / 1e9, 3),
            "identical": ok,
            "loadavg_1m": load,
        }
    finally:
        for p in (src, dst):
            p.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    lab = provision(log=lambda _m: None)
    runs = []
    for i in range(args.runs):
        row = {
            "run": i,
            "data_plane_only": data_plane_only(),
            "fph": fph_guest(lab),
            "fph_receiver_process": fph_guest(lab, receiver_process=True),
            "qemu_none": qemu_guest(lab),
        }
        print(json.dumps(row), flush=True)
        runs.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"qemu": lab.qemu.package_version, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
