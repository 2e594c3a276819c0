"""Pages lost to device DMA in an fph migration, with and without the switchover check of pages held as zeros.

A 1 GiB guest with a virtio-net NIC (QEMU user networking, a host UDP port forwarded to the guest) writes
and frees 500 MiB, then receives bursts of UDP packets while fph migrates it (in-process destination, as
``tests/test_dma_guest.py``). QEMU writes each packet into a receive buffer the guest zeroed and posted
earlier, unseen by the TCG write log. At the COMPLETE hook (both VMs stopped) every page of the two RAM
files is compared. Runs alternate ``check_zero_held`` on and off.

    python bench/dma_bench.py --runs 3 --json bench/results/dma-gap-virtio-net.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from fph.migration.fph_mode import FphConfig
from fph_lab.fph_mode import FphPair
from fph_lab.nic import GUEST_UP, PAYLOAD, UdpBursts, destination_nic, free_udp_port, rx_packets, source_nic
from fph_lab.provision import provision
from fph_lab.ram_compare import PageCompare


def one(check_zero_held: bool) -> dict[str, Any]:
    lab = provision(log=lambda _m: None)
    port = free_udp_port()
    with FphPair(lab, mem_mib=1024, extra_args=source_nic(port), dst_extra_args=destination_nic()) as p:
        p.src.console.run(GUEST_UP)
        p.src.guest.fill(500)
        p.src.guest.start_hold(32, 1)
        with UdpBursts(port) as bursts:
            time.sleep(3)  # buffers posted and filled for a while before the migration starts
            before = rx_packets(p.src.console.run("grep eth0 /proc/net/dev"))
            compare = PageCompare(p)
            report = asyncio.run(
                p.migration(FphConfig(check_zero_held=check_zero_held), hooks=(compare,)).run()
            )
        diff = compare.diff or []
        assert p.src.ram_path is not None
        with open(p.src.ram_path, "rb") as f:
            with_packets = 0
            for page in diff:
                f.seek(page * 4096)
                with_packets += PAYLOAD[:32] in f.read(4096)
        check = p.check()
        after = rx_packets(p.dst.console.run("grep eth0 /proc/net/dev"))
        fph = report.fph
        return {
            "check_zero_held": check_zero_held,
            "pages_differing": len(diff),
            "differing_pages_holding_packet_bytes": with_packets,
            "first_differing": diff[:10],
            "udp_packets_sent": bursts.sent,
            "rx_packets_before_after": [before, after],
            "pages_resent_by_check": fph["pages_resent_by_check"],
            "pages_checked_at_switchover": fph["pages_checked_at_switchover"],
            "switchover_check_ms": fph["switchover_check_ms"],
            "downtime_ms": report.downtime_ms,
            "downtime_breakdown_ms": fph.get("downtime_breakdown_ms"),
            "destination_ok": check.ok,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        for on in (i % 2 == 0, i % 2 == 1):
            r = one(on)
            print(json.dumps(r), flush=True)
            runs.append(r)
    args.json.write_text(json.dumps({"runs": runs}, indent=1))


if __name__ == "__main__":
    main()
