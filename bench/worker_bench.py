"""What a balloon worker costs, and whether the daemon and its workers stay flat under repetition.

``fph serve`` runs as its own process; this process registers ``--vms`` VMs (one worker each), connects a
front-end to each (tests/fake_frontend.py: QEMU's side of vhost-user plus the Linux driver's free page
hinting, over the real socket; no guest), measures RSS, open fds and CPU while idle, then runs
``--cycles`` hint runs per VM through the API (StartHinting, the guest hints, StopHinting with DONE) and
measures again every ``--every`` cycles: a leak shows as growth. At the end every VM is unregistered and
its worker must be gone.

    .venv/bin/python bench/worker_bench.py --vms 8 --cycles 200 --json bench/results/worker_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from fph.api.v1 import fph_pb2 as pb
from fph.api.v1 import fph_pb2_grpc as pbg
from fph.waiting import poll_until
from fph_lab.workers import stop_daemon, worker_pids

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the front-end fake lives in tests/
from tests.fake_frontend import (
    FakeFrontend,
    GuestRam,
    LinuxBalloonDriver,
    MiB,
    boot_and_read_done,
    guest_hints,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_figures(pid: int) -> dict[str, float]:
    status = {
        k: v.split()[0]
        for k, _, v in (line.partition(":") for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        if v.split()
    }
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {
        "rss_kib": int(status["VmRSS"]),
        "rss_anon_kib": int(status["RssAnon"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
        "cpu_s": (int(stat[11]) + int(stat[12])) / CLK_TCK,
    }


def snapshot(daemon: int, workers: list[int], label: str) -> dict[str, Any]:
    w = [proc_figures(p) for p in workers]
    return {
        "label": label,
        "daemon": proc_figures(daemon),
        "workers_rss_kib": [x["rss_kib"] for x in w],
        "workers_fds": [x["fds"] for x in w],
        "workers_cpu_s": [x["cpu_s"] for x in w],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    state = Path(tempfile.mkdtemp(prefix="fph-workerbench-", dir=base))
    sock = state / "fph.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "fph.cli", "serve", "--socket", str(sock), "--state-dir", str(state)],
        stderr=subprocess.DEVNULL,
    )
    rams: list[GuestRam] = []
    fes: list[tuple[FakeFrontend, LinuxBalloonDriver]] = []
    out: dict[str, Any] = {"vms": args.vms, "cycles": args.cycles, "snapshots": []}
    try:
        assert poll_until(lambda: _accepts(sock), 60, 0.05), "the daemon never listened"
        ch = grpc.insecure_channel(f"unix:{sock}")
        vms, hints = pbg.VmServiceStub(ch), pbg.HintingServiceStub(ch)
        register_s = []
        for i in range(args.vms):
            d = state / f"vm{i}"
            d.mkdir()
            spec = pb.VmSpec(
                name=f"vm{i}", qmp_socket=str(d / "qmp.sock"), ram_file=str(d / "ram"),
                balloon_socket=str(d / "balloon.sock"), memory_bytes=1 << 30,
            )  # fmt: skip
            t = time.monotonic()
            vms.RegisterVm(pb.RegisterVmRequest(spec=spec))
            register_s.append(time.monotonic() - t)
        out["register_s"] = register_s
        workers = worker_pids(state)
        assert len(workers) == args.vms, workers
        snaps = out["snapshots"]
        snaps.append(snapshot(daemon.pid, workers, "registered, no front-end"))
        for i in range(args.vms):
            ram = GuestRam(64 * MiB, gpa=(1 + i) << 32)
            rams.append(ram)
            fes.append(boot_and_read_done(str(state / f"vm{i}" / "balloon.sock"), ram))
        before = snapshot(daemon.pid, workers, "front-ends connected")
        snaps.append(before)
        time.sleep(args.idle_s)
        after = snapshot(daemon.pid, workers, f"after {args.idle_s:.0f} s idle")
        snaps.append(after)
        out["idle_cpu_pct"] = {
            "daemon": 100 * (after["daemon"]["cpu_s"] - before["daemon"]["cpu_s"]) / args.idle_s,
            "workers_max": max(
                100 * (a - b) / args.idle_s
                for a, b in zip(after["workers_cpu_s"], before["workers_cpu_s"], strict=True)
            ),
        }
        t0 = time.monotonic()
        for c in range(1, args.cycles + 1):
            for i, (fe, drv) in enumerate(fes):
                hints.StartHinting(pb.StartHintingRequest(vm=f"vm{i}", acknowledge_on_stop=True))
                guest_hints(fe, drv)
                hints.StopHinting(pb.StopHintingRequest(vm=f"vm{i}"))
                assert fe.wait_config_change()  # DONE
                drv.config_changed()
            if c % args.every == 0:
                snaps.append(snapshot(daemon.pid, workers, f"after {c} hint runs per VM"))
                print(json.dumps(snaps[-1]), flush=True)
        out["cycle_s"] = (time.monotonic() - t0) / args.cycles
        for i in range(args.vms):
            vms.UnregisterVm(pb.UnregisterVmRequest(name=f"vm{i}"))
        out["workers_left_after_unregister"] = worker_pids(state)
        ch.close()
    finally:
        for fe, _ in fes:
            fe.close()
        for ram in rams:
            ram.close()
        stop_daemon(daemon, state)
        shutil.rmtree(state, ignore_errors=True)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


if __name__ == "__main__":
    sys.exit(main())
