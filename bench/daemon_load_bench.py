"""Does serving 100 concurrent status streams slow a migration the daemon runs? (the daemon's load check)

``fph serve`` runs as its own process (as in production); this process boots lab VMs, registers them, and
runs fph-mode migrations through the API, alternately without and with 100 concurrent
``WatchHintingStatus`` streams (every ``--interval-ms``, on the migrating VM) held open for the whole
migration. Each run boots a fresh source (fph's balloon + TCG write log, 1 GiB, 700 MiB written and freed,
32 MiB hold region) and checks the destination. Figures per run: the migration's ``time_elapsed`` (engine,
ms), the Migrate RPC's wall time, downtime, bytes, stream messages received; host load is recorded
because other engineers' TCG guests share the 2 cores.

    .venv/bin/python bench/daemon_load_bench.py --pairs 4 --json bench/results/daemon_load_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from fph.api.v1 import fph_pb2 as pb
from fph.api.v1 import fph_pb2_grpc as pbg
from fph_lab.check import check_destination
from fph_lab.provision import Lab, provision
from fph_lab.vm import VM, VMConfig
from fph_lab.workers import stop_daemon

MiB = 1 << 20
MEM_MIB = 1024


def count_qemu() -> int:
    n = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                n += b"qemu-system" in (p / "cmdline").read_bytes()
    return n


class Streams:
    """N concurrent WatchHintingStatus streams on their own loop thread; counts what arrives."""

    def __init__(self, socket: str, vm: str, n: int, interval_ms: int) -> None:
        self.socket, self.vm, self.n, self.interval_ms = socket, vm, n, interval_ms
        self.received = 0
        self.errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: list[Any] = []

    async def _one(self, stub: Any) -> None:
        req = pb.WatchHintingStatusRequest(vm=self.vm, interval_ms=self.interval_ms)
        try:
            async for _ in stub.WatchHintingStatus(req):
                self.received += 1
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(f"{e.code().name}: {e.details()}")
        except asyncio.CancelledError:
            pass

    async def _start(self) -> None:
        # 10 channels (HTTP/2 connections), 10 streams each: several clients, not one multiplexed one
        for i in range(self.n):
            if i % 10 == 0:
                self._channels.append(grpc.aio.insecure_channel(f"unix:{self.socket}"))
            stub = pbg.HintingServiceStub(self._channels[-1])
            self._tasks.append(asyncio.get_running_loop().create_task(self._one(stub)))

    async def _stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self._channels:
            await c.close()

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def one_run(lab: Lab, sock: str, state: Path, idx: int, streams: int, interval_ms: int) -> dict[str, Any]:
    ch = grpc.insecure_channel(f"unix:{sock}")
    vms_api = pbg.VmServiceStub(ch)
    mig_api = pbg.MigrationServiceStub(ch)
    os.environ["FPH_RUN_DIR"] = str(state / "vms")
    src = VM(lab, VMConfig(mem_mib=MEM_MIB), name=f"src{idx}")
    dst = VM(
        lab, VMConfig(mem_mib=MEM_MIB, balloon="none", ram_backend="file", incoming=True), name=f"dst{idx}"
    )
    out: dict[str, Any] = {"run": idx, "streams": streams, "interval_ms": interval_ms}
    try:
        for vm, balloon, wlog in ((src, True, True), (dst, True, False)):
            spec = pb.VmSpec(
                name=vm.name,
                qmp_socket=str(vm.qmp_socket),
                ram_file=str(vm.run_dir / "ram"),
                balloon_socket=str(vm.run_dir / "balloon.sock") if balloon else "",
                memory_bytes=MEM_MIB * MiB,
                write_log=str(vm.run_dir / "wlog.bin") if wlog else "",
            )
            reg = vms_api.RegisterVm(pb.RegisterVmRequest(spec=spec))
            if vm is src:
                src.config = VMConfig(
                    mem_mib=MEM_MIB,
                    balloon="fph",
                    vhost_user_socket=spec.balloon_socket,
                    ram_backend="file",
                    plugins=(reg.plugin_arg,),
                )
        src.start()
        dst.start()
        src.wait_ready(180)
        src.guest.fill(700)
        src.guest.start_hold(32, 1)
        time.sleep(2)
        target = mig_api.PrepareIncoming(pb.PrepareIncomingRequest(vm=dst.name, mode=pb.MODE_FPH))
        load = Streams(sock, src.name, streams, interval_ms) if streams else None
        if load is not None:
            load.start()
            time.sleep(1.0)  # every stream open and flowing before the migration starts
        out["loadavg_1m"] = os.getloadavg()[0]
        out["qemu_processes_other"] = count_qemu() - 2
        t0 = time.monotonic()
        received0 = load.received if load is not None else 0
        events = list(mig_api.Migrate(pb.MigrateRequest(vm=src.name, mode=pb.MODE_FPH, destination=target)))
        out["migrate_rpc_s"] = round(time.monotonic() - t0, 3)
        if load is not None:
            during = load.received - received0
            load.stop()
            out["stream_messages"] = load.received
            out["stream_messages_during_migration"] = during
            out["stream_errors"] = load.errors[:5]
        rep = mig_api.GetMigrationReport(pb.GetMigrationReportRequest(vm=src.name))
        out["progress_events"] = len(events)
        out["status"] = rep.status
        out["job_stats"] = dict(rep.job_stats)
        out["hinted_mib"] = round(rep.fph.get("hinted_bytes", 0) / MiB, 1)
        hb = src.guest.last_heartbeat()
        out["destination_ok"] = bool(hb and check_destination(dst, hb, src=src).ok)
    finally:
        for vm in (src, dst):
            vm.stop()
            with contextlib.suppress(grpc.RpcError):
                vms_api.UnregisterVm(pb.UnregisterVmRequest(name=vm.name))
        ch.close()
    return out


def summarize(runs: list[dict[str, Any]]) -> str:
    """All runs, then only the runs with no other QEMU on the host (other engineers' guests skew both)."""
    quiet = [r for r in runs if r["qemu_processes_other"] == 0]
    return (
        f"All runs:\n\n{_table(runs)}\n\nRuns with no other QEMU on the host "
        f"({len(quiet)} of {len(runs)}):\n\n{_table(quiet)}"
    )


def _table(runs: list[dict[str, Any]]) -> str:
    def med(rs: list[dict[str, Any]], f: Any) -> float:
        return statistics.median(f(r) for r in rs)

    base = [r for r in runs if not r["streams"] and r["status"] == "completed"]
    loaded = [r for r in runs if r["streams"] and r["status"] == "completed"]
    lines = [
        "| load | runs | time_elapsed ms (each) | median ms | Migrate RPC s (median) | downtime ms (median) |"
        " stream msgs/s | load avg | other QEMUs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in (("none", base), ("100 streams", loaded)):
        if not rs:
            continue
        te = [r["job_stats"]["time_elapsed"] for r in rs]
        rate = "-"
        if rs[0]["streams"]:
            rate = f"{med(rs, lambda r: r['stream_messages_during_migration'] / r['migrate_rpc_s']):.0f}"
        lines.append(
            f"| {name} | {len(rs)} | {', '.join(map(str, te))} | {statistics.median(te):.0f} | "
            f"{med(rs, lambda r: r['migrate_rpc_s']):.2f} | "
            f"{med(rs, lambda r: r['job_stats']['downtime']):.0f} | {rate} | "
            f"{med(rs, lambda r: r['loadavg_1m']):.2f} | {med(rs, lambda r: r['qemu_processes_other']):.0f} |"
        )
    if base and loaded:
        b = statistics.median(r["job_stats"]["time_elapsed"] for r in base)
        loaded_med = statistics.median(r["job_stats"]["time_elapsed"] for r in loaded)
        rb = statistics.median(r["migrate_rpc_s"] for r in base)
        rl = statistics.median(r["migrate_rpc_s"] for r in loaded)
        lines.append("")
        lines.append(
            f"slowdown (median time_elapsed, loaded vs none): {100 * (loaded_med / b - 1):+.1f}%; "
            f"Migrate RPC wall time: {100 * (rl / rb - 1):+.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3, help="(no load, load) run pairs, alternating")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--interval-ms", type=int, default=100)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument(
        "--summarize", type=Path, nargs="+", help="only summarize these result files into --json's .md"
    )
    args = ap.parse_args(argv)
    if args.summarize:
        combined = [r for f in args.summarize for r in json.loads(f.read_text())["runs"]]
        text = f"Combined from {', '.join(f.name for f in args.summarize)}\n\n{summarize(combined)}"
        print(text)
        args.json.with_suffix(".md").write_text(text + "\n")
        return 0
    lab = provision(log=lambda _m: None)
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    state = Path(tempfile.mkdtemp(prefix="fph-loadbench-", dir=base))
    sock = str(state / "fph.sock")
    log_path = args.json.with_suffix(".daemon.log")
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fph.cli",
                "serve",
                "--socket",
                sock,
                "--state-dir",
                str(state),
                "--log-format",
                "json",
            ],
            stderr=log,
        )
    runs: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not start; see {log_path}")
            time.sleep(0.05)
        for i in range(2 * args.pairs):
            streams = args.streams if i % 2 else 0
            r = one_run(lab, sock, state, i, streams, args.interval_ms)
            runs.append(r)
            print(json.dumps(r), flush=True)
            args.json.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    finally:
        stop_daemon(daemon, state)
        shutil.rmtree(state, ignore_errors=True)
    summary = summarize(runs)
    print(summary)
    args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
