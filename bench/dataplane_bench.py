"""What mutual TLS costs fph's data plane, across a real (veth, tbf-shaped) link between two namespaces.

No guests: a 1 GiB RAM file whose every page holds data goes from a sender in the source namespace
(fph's Precopy round over a RamSender, as in a migration) to ``python -m fph.transfer.receiver`` in the
destination namespace, with the one-time credential, TLS on and off, interleaved, ``--runs`` each, over
each link rate (1 Gbit/s and unshaped by default). Goodput is page bytes over the sender's time from
connect to the destination's ACK; the wire rate is the source veth's tx counter over the same time (the
cap counts only when measured there). CPU seconds of both ends show where encryption goes.

    python bench/dataplane_bench.py --json bench/results/dataplane_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30
MiB = 1 << 20


def send(address: str, ram_path: Path, mem_mib: int, credential: str, tls: list[str]) -> dict[str, Any]:
    """The source end (runs in the source namespace): one full round, FINISH, the destination's ACK."""
    import numpy as np

    from fph.dirty_bitmap import DirtyBitmap
    from fph.migration.precopy import Precopy
    from fph.ram_layout import RamLayout
    from fph.transfer.ram_file import RamFile
    from fph.transfer.security import DataPlaneSecurity, TlsFiles
    from fph.transfer.sender import RamSender

    layout = RamLayout.pc(mem_mib * MiB)
    host, _, port = address.rpartition(":")
    files = TlsFiles(Path(tls[0]), Path(tls[1]), Path(tls[2])) if tls else None
    ram = RamFile(ram_path, layout, writable=False)
    sender = RamSender((host, int(port)), ram, security=DataPlaneSecurity(credential, files), timeout=120)
    bitmap = DirtyBitmap(layout)
    zeros = np.zeros(bitmap.nwords, dtype=np.uint64)
    t0 = time.perf_counter()
    sender.connect()
    pc = Precopy(bitmap, ram, sender, lambda: zeros)
    pc.start()
    pc.run_round()
    pc.final_round()
    ack = sender.finish({"rounds": pc.round}, timeout=120)
    dt = time.perf_counter() - t0
    sender.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "ok": bool(ack.get("ok")),
        "page_bytes": int(ack["counters"]["bytes"]),
        "wire_bytes_sent": sender.counters.bytes_on_wire,
        "seconds": dt,
        "sender_cpu_s": ru.ru_utime + ru.ru_stime,
    }


def one_run(link: Any, pki: Any, work: Path, mem_mib: int, tls: bool) -> dict[str, Any]:
    from fph.transfer.security import new_credential

    cred = work / "credential"
    cred.write_text(new_credential())
    dst_tls = pki.host("dst") if tls else None
    src_tls = pki.host("src") if tls else None
    rx_argv = [sys.executable, "-m", "fph.transfer.receiver", "--ram", str(work / "dst.ram"),
               "--mem-mib", str(mem_mib), "--listen", f"{link.dst_ip}:0", "--timeout", "300",
               "--credential-file", str(cred)]  # fmt: skip
    if dst_tls is not None:
        rx_argv += [
            "--tls-cert",
            str(dst_tls.cert),
            "--tls-key",
            str(dst_tls.key),
            "--tls-ca",
            str(dst_tls.ca),
        ]
    (work / "dst.ram").unlink(missing_ok=True)
    with open(work / "dst.ram", "wb") as f:
        f.truncate(mem_mib * MiB)
    rx = link.popen(link.dst_ns, rx_argv, stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    line = rx.stdout.readline().split()
    if len(line) != 3 or line[0] != "FPH-RECEIVER":
        raise RuntimeError(f"receiver did not start: {line}")
    tls_args = [] if src_tls is None else [str(src_tls.cert), str(src_tls.key), str(src_tls.ca)]
    tx_argv = [sys.executable, str(Path(__file__).resolve()), "--send", f"{line[1]}:{line[2]}",
               str(work / "src.ram"), str(mem_mib), cred.read_text(), *tls_args]  # fmt: skip
    wire0 = link.wire_bytes("src")
    tx = link.popen(link.src_ns, tx_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = tx.communicate(timeout=600)
    if tx.returncode != 0:
        raise RuntimeError(f"sender failed ({tx.returncode}): {err.strip()[-2000:]}")
    wire = link.wire_bytes("src") - wire0
    result = json.loads(out.strip().splitlines()[-1])
    rx_out, _ = rx.communicate(timeout=60)
    rx_result = json.loads(rx_out.strip().splitlines()[-1])
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        **result,
        "tls": tls,
        "receiver_ok": rx_result["ok"],
        "wire_bytes_measured": wire,
        "goodput_bps": round(result["page_bytes"] / result["seconds"]),
        "wire_bps": round(wire / result["seconds"]),
        "children_cpu_s_cumulative": round(ru.ru_utime + ru.ru_stime, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--send", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument("--rates", default="1000000000,0", help="link rates in bit/s, 0 = unshaped")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.send:
        address, ram, mem, cred, *tls = args.send
        print(json.dumps(send(address, Path(ram), int(mem), cred, tls)), flush=True)
        return 0
    if args.json is None:
        ap.error("--json PATH is required")
    from fph_lab.certs import make_pki
    from fph_lab.netlab import LinkConfig, TwoHostLink

    runs: list[dict[str, Any]] = []
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="fph-dpb-", dir=base) as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki", {"src": "10.9.0.1", "dst": "10.9.0.2"})
        src = work / "src.ram"
        with open(src, "wb") as f:  # every page holds data (a different word per page): nothing is a marker
            for i in range(args.mem_mib):
                block = bytearray(MiB)
                for p in range(0, MiB, 4096):
                    block[p : p + 8] = (i * 256 + p // 4096 + 1).to_bytes(8, "little")
                f.write(block)
        for rate in (int(r) for r in args.rates.split(",")):
            cfg = LinkConfig(rate_bits_per_s=rate or None)
            with TwoHostLink(cfg) as link:
                for i in range(args.runs):
                    for tls in (False, True) if i % 2 == 0 else (True, False):
                        row = one_run(link, pki, work, args.mem_mib, tls)
                        row.update(run=i, link_rate_bps=rate, loadavg_1m=os.getloadavg()[0])
                        runs.append(row)
                        print(json.dumps(row), flush=True)
    summary = []
    for rate in sorted({r["link_rate_bps"] for r in runs}):
        for tls in (False, True):
            sel = sorted(r["goodput_bps"] for r in runs if r["link_rate_bps"] == rate and r["tls"] == tls)
            cpu = sorted(r["sender_cpu_s"] for r in runs if r["link_rate_bps"] == rate and r["tls"] == tls)
            summary.append({"link_rate_bps": rate, "tls": tls, "goodput_bps_median": sel[len(sel) // 2],
                            "sender_cpu_s_median": round(cpu[len(cpu) // 2], 2),
                            "runs": len(sel)})  # fmt: skip
    args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    for s in summary:
        print(json.dumps(s))
    return 0 if all(r["ok"] and r["receiver_ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
