"""fph vs QEMU-native hinting vs no hinting between two "hosts" over a shaped link, through two daemons.

Two network namespaces joined by a veth pair shaped with tbf (1 Gbit/s by default), one ``fph serve`` per
namespace with mutual TLS on the data plane (``fph_lab.twohost.TwoHostRig``). Every migration is what an
orchestrator does: PrepareIncoming on the destination daemon, Migrate on the source daemon. Modes run
interleaved per workload and run; every destination is verified (the guest's checksummed region and
heartbeat). Bytes are the report's; ``wire_bytes`` is the source veth's tx counter over the migration (RAM,
device state and protocol overhead together: the figure that met the link).

    python bench/twohost_bench.py --runs 3 --json bench/results/twohost_bench.json
    python bench/twohost_bench.py --quick --json /tmp/x.json          # 1 GiB, 1 run per mode

Workloads: ``memhog-exit`` (1 GiB guest, ~700 MiB written and freed), ``memhog-exit-4g`` (4 GiB guest,
3 GiB written and freed) and ``churn`` (memhog-exit, then ``while true; do memhog 600; sleep 0.3; done &``
from just before the migration through switchover; the guest's OOM kills are counted, ``guest_oom_kills``).
``--init-on-alloc 0`` boots every guest without zeroing on allocation.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fph.api.v1 import fph_pb2 as pb
from fph.waiting import poll_until
from fph_lab.check import check_destination
from fph_lab.netlab import LinkConfig
from fph_lab.provision import Lab, provision
from fph_lab.run_state import RunStateWatch, stop_to_resume_ms
from fph_lab.twohost import TwoHostRig
from fph_lab.vm import VM
from fph_lab.wire_rate import WireSampler
from fph_lab.workload import CHURN_CMD, HOLD_MIB, oom_kills, wait_allocation_settles

MiB = 1 << 20
TCP_COUNTERS = ("RetransSegs", "TCPTimeouts", "TCPLossProbes", "TCPLostRetransmit")
"""The source namespace's TCP counters recorded per run (deltas): a late tail is a retransmission."""
MODES = {
    "fph": pb.MODE_FPH,
    "fph-reporting": pb.MODE_FPH,
    "fph-overlap": pb.MODE_FPH,
    "native": pb.MODE_NATIVE,
    "native-prealloc": pb.MODE_NATIVE,
    "none": pb.MODE_NONE,
}
"""``fph-reporting``: fph mode with the balloon offering free page reporting (the guest's freed memory is
punched out of the RAM file before the migration; round 0 skips those holes). ``fph-overlap``: fph mode with
``first_hint_run=OVERLAP`` (round 0 sends while the guest hints, as QEMU does). ``native-prealloc``: native
with the destination QEMU started with ``prealloc=on`` (its RAM allocated before the migration, as fph's
destination daemon prepares its RAM file at PrepareIncoming; QEMU's default touches each page while it
loads, on the guest's clock once the source has stopped)."""
BRIEF = ("mode", "workload", "run", "bytes", "wire_bytes", "total_s", "resumed_wall_s", "downtime_ms",
         "stop_to_resume_ms", "goodput_bps", "max_window_rate_bps", "guest_oom_kills", "destination_ok",
         "error")  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str
    mem_mib: int
    memhog_mib: int
    churn: bool = False
    """After the memhog: allocation bursts (``CHURN_CMD``) from just before the migration through
    switchover; the guest's OOM kills are counted on both consoles."""


WORKLOADS = {
    w.name: w
    for w in (
        Workload("memhog-exit", 1024, 700),
        Workload("memhog-exit-4g", 4096, 3072),
        Workload("churn", 1024, 700, churn=True),
    )
}


def boot(rig: TwoHostRig, mode: str, name: str, mem_mib: int) -> tuple[VM, VM]:
    if mode.startswith("fph"):
        src = rig.source_vm(name, mem_mib=mem_mib, reporting=mode == "fph-reporting")
        dst = rig.destination_vm(f"{name}-d", mem_mib=mem_mib)
    else:
        hint = mode.startswith("native")
        src = rig.native_vm(name, mem_mib=mem_mib, free_page_hint=hint)
        dst = rig.native_vm(
            f"{name}-d", side="dst", incoming=True, mem_mib=mem_mib, free_page_hint=hint,
            prealloc=mode == "native-prealloc",
        )  # fmt: skip
    src.wait_ready(300)
    return src, dst


def send_goodput(report: Any, mode: str) -> float | None:
    """fph: page bytes over the time spent sending them (rounds that sent for 100 ms or more); QEMU: its own
    ``mbps`` of the last iteration is not comparable, so the average over the migration's active time."""
    if mode.startswith("fph"):
        rounds = json.loads(report.json).get("rounds") or []
        sel = [r for r in rounds if float(r.get("send_ms") or 0) >= 100]
        ms = sum(float(r["send_ms"]) for r in sel)
        return sum(int(r.get("bytes_on_wire", 0)) for r in sel) / (ms / 1e3) if ms else None
    js = report.job_stats
    active_ms = js.get("time_elapsed", 0) - js.get("setup_time", 0)
    return js.get("memory_processed", 0) / (active_ms / 1e3) if active_ms > 0 else None


def run_one(rig: TwoHostRig, w: Workload, mode: str, index: int, bandwidth: int) -> dict[str, Any]:
    assert rig.link is not None
    out: dict[str, Any] = {
        "mode": mode, "workload": w.name, "mem_mib": w.mem_mib, "run": index,
        "init_on_alloc": rig.init_on_alloc,
        "link_rate_bps": rig.link.config.rate_bits_per_s or 0, "tls": rig.tls, "bandwidth_cap_bps": bandwidth,
        "bytes": None, "lower_bound_bytes": None, "wire_bytes": None, "total_s": None, "downtime_ms": None,
        "goodput_bps": None, "destination_ok": False, "error": None, "max_window_rate_bps": None,
        "predicted_downtime_ms": None, "guest_oom_kills": None,
    }  # fmt: skip
    name = f"{mode}-{w.name}-{index}".replace("memhog-exit", "mh")
    phase = "boot"
    vms: list[VM] = []
    sampler: WireSampler | None = None
    watches: tuple[RunStateWatch, ...] = ()
    try:
        src, dst = boot(rig, mode, name, w.mem_mib)
        vms += [src, dst]
        phase = "workload"
        src.guest.start_hold(HOLD_MIB, 1)
        src.guest.memhog(w.memhog_mib, 0, timeout=600)
        time.sleep(2.0)
        out["lower_bound_bytes"] = wait_allocation_settles(src.guest, limit_s=60)
        hb = src.guest.last_heartbeat()
        churn_from = src.console.offset()
        if w.churn:
            src.console.run(CHURN_CMD)
            time.sleep(0.5)
        phase = "prepare incoming"
        target = rig.dst.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm=dst.name, mode=MODES[mode]))
        out["loadavg_1m"] = os.getloadavg()[0]
        phase = "migration"
        watches = (RunStateWatch(src), RunStateWatch(dst))
        wire0 = rig.link.wire_bytes("src")
        tcp0 = rig.link.tcp_counters("src")
        sampler = WireSampler(rig.link, "src").start()
        t0, t_wall = time.monotonic(), time.time()
        first_run = pb.FIRST_HINT_RUN_OVERLAP if mode == "fph-overlap" else pb.FIRST_HINT_RUN_UNSPECIFIED
        req = pb.MigrateRequest(
            vm=src.name, mode=MODES[mode], destination=target, progress_interval_ms=500,
            bandwidth_bytes_per_second=bandwidth, first_hint_run=first_run,
        )  # fmt: skip
        events = list(rig.src.migrations.Migrate(req, timeout=1800))
        out["migrate_wall_s"] = round(time.monotonic() - t0, 2)
        # The source says SUCCEEDED once its side is done (in native/none mode before the destination has
        # read the whole stream): the move is done when the destination daemon says its QEMU runs.
        incoming = poll_until(
            lambda: rig.dst.get_vm(dst.name).incoming, 120, 0.02, until=lambda s: not s.startswith("prepared")
        )
        out["resumed_wall_s"] = round(time.monotonic() - t0, 2)
        for watch in watches:
            watch.close()
        stopped = stop_to_resume_ms(watches[0].events(), watches[1].events())
        out["stop_to_resume_ms"] = None if stopped is None else round(stopped, 1)
        out["run_state_events"] = {
            side: [(e.name, e.status, round(e.t - t_wall, 4)) for e in watch.events()]
            for side, watch in zip(("src", "dst"), watches, strict=True)
        }
        series = sampler.stop()
        out["destination_incoming"] = incoming
        out["wire_bytes"] = rig.link.wire_bytes("src") - wire0
        tcp1 = rig.link.tcp_counters("src")
        out["src_tcp"] = {k: tcp1.get(k, 0) - tcp0.get(k, 0) for k in TCP_COUNTERS}
        out["wire_samples"] = series.relative(t0)
        out["max_window_rate_bps"] = series.max_window_rate_bps()
        out["max_window_rate_source"] = "source veth tx counter, 100 ms windows"
        out["windows_over_cap"] = series.windows_over(bandwidth) if bandwidth else None
        rep = rig.src.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm=src.name))
        js = dict(rep.job_stats)
        out.update(
            bytes=js.get("memory_processed"),
            total_s=round(js.get("time_elapsed", 0) / 1e3, 3),
            downtime_ms=js.get("downtime"),
            rounds=js.get("memory_iteration"),
            phase=pb.Phase.Name(events[-1].phase) if events else None,
            job_stats=js,
        )
        out["goodput_bps"] = send_goodput(rep, mode)
        if mode.startswith("fph"):
            full = json.loads(rep.json)
            f = full.get("fph") or {}
            out["hinting"] = f.get("hinting")
            out["data_plane_tls"] = f.get("data_plane_tls")
            out["destination_daemon"] = f.get("destination_daemon")
            out["downtime_breakdown_ms"] = f.get("downtime_breakdown_ms")
            out["predicted_downtime_ms"] = f.get("predicted_downtime_ms")
            out["fph"] = {k: v for k, v in f.items() if k != "decisions"}
            out["fph_rounds"] = full.get("rounds")
        phase = "destination check"
        assert hb is not None
        check = check_destination(dst, src.guest.last_heartbeat() or hb, src=src)
        out["destination_ok"] = check.ok
        out["destination_problems"] = check.problems
        if w.churn:
            text = src.console.text(churn_from) + dst.console.text()
            out["guest_oom_kills"], out["oom_lines"] = oom_kills(text)
            out["churn_iterations"] = text.count("FPH-MEMHOG mib=")
    except (grpc.RpcError, Exception) as e:
        detail = e.details() if isinstance(e, grpc.RpcError) else str(e)
        out["error"] = f"{phase}: {type(e).__name__}: {detail}"
    finally:
        if sampler is not None:
            sampler.close()
        for watch in watches:
            watch.close()
        for vm in vms:
            vm.stop()
        for host, vm_name in ((rig.src, name), (rig.dst, f"{name}-d")):
            with contextlib.suppress(grpc.RpcError):  # a VM that never registered
                host.vms.UnregisterVm(pb.UnregisterVmRequest(name=vm_name))
    return out


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _median(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for w in sorted({r["workload"] for r in runs}):
        by = {
            m: [r for r in runs if r["workload"] == w and r["mode"] == m and r["destination_ok"]]
            for m in MODES
        }
        row: dict[str, Any] = {"workload": w}
        for m, rs in by.items():
            for k in ("bytes", "wire_bytes", "total_s", "resumed_wall_s", "downtime_ms", "stop_to_resume_ms",
                      "goodput_bps", "lower_bound_bytes"):  # fmt: skip
                row[f"{m}_{k}_median"] = _median([r[k] for r in rs])
            row[f"{m}_ok_runs"] = len(rs)
            rates = [r["max_window_rate_bps"] for r in rs if r.get("max_window_rate_bps") is not None]
            row[f"{m}_max_window_rate_bps"] = max(rates) if rates else None
            over = [r["windows_over_cap"] for r in rs if r.get("windows_over_cap") is not None]
            row[f"{m}_windows_over_cap"] = sum(over) if over else None
        for fm in ("fph", "fph-reporting", "fph-overlap"):
            for k in ("bytes", "total_s", "resumed_wall_s", "stop_to_resume_ms"):
                for nm in ("native", "native-prealloc"):
                    f, n = row.get(f"{fm}_{k}_median"), row.get(f"{nm}_{k}_median")
                    row[f"{fm}_over_{nm}_{k}"] = round(f / n, 3) if f and n else None
        good, rate = row.get("fph_goodput_bps_median"), runs[0]["link_rate_bps"] / 8
        row["fph_goodput_over_link"] = round(good / rate, 3) if good and rate else None
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workloads", default="memhog-exit,memhog-exit-4g")
    ap.add_argument("--modes", default="fph,native,none")
    ap.add_argument("--rate-bits", type=int, default=1_000_000_000, help="link rate (0: unshaped)")
    ap.add_argument("--no-tls", action="store_true", help="the data plane in the clear")
    ap.add_argument(
        "--bandwidth",
        type=int,
        default=-1,
        help="bytes/s given to Migrate, for every mode (default: the link's rate, as an operator who knows "
        "the link sets QEMU's max-bandwidth; 0: unlimited)",
    )
    ap.add_argument(
        "--init-on-alloc",
        choices=("default", "0", "1"),
        default="default",
        help="the guests' init_on_alloc= (default: the guest kernel's, Debian: 1); recorded in every run",
    )
    ap.add_argument("--quick", action="store_true", help="1 GiB guests, 1 run per mode")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument(
        "--plot",
        action="store_true",
        help="at the end, PNG plots beside the --json file (bench/plots.py: bytes, wire rate against the cap "
        "over time, each fph run's rounds and stop window; needs matplotlib: '.[bench]')",
    )
    args = ap.parse_args()
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # now, not after the suite
        ap.error("--plot needs matplotlib: pip install -e '.[bench]'")
    workloads = ["memhog-exit"] if args.quick else args.workloads.split(",")
    runs_n = 1 if args.quick else args.runs
    modes = args.modes.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS] + [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown workloads or modes: {unknown}")
    lab: Lab = provision(log=lambda _m: None)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # the rig's teardown runs (namespaces, QEMUs, daemons)
    runs: list[dict[str, Any]] = []
    link = LinkConfig(rate_bits_per_s=args.rate_bits or None)
    bandwidth = args.bandwidth if args.bandwidth >= 0 else args.rate_bits // 8
    init_on_alloc = None if args.init_on_alloc == "default" else int(args.init_on_alloc)
    with TwoHostRig(
        lab,
        link,
        tls=not args.no_tls,
        log_dir=args.json.parent / (args.json.stem + "-logs"),
        init_on_alloc=init_on_alloc,
    ) as rig:
        for wname in workloads:
            for i in range(runs_n):
                order = modes[i % len(modes) :] + modes[: i % len(modes)]  # rotate: no mode always first
                for mode in order:
                    row = run_one(rig, WORKLOADS[wname], mode, i, bandwidth)
                    runs.append(row)
                    brief = {k: row.get(k) for k in BRIEF}  # a failed run lacks some
                    print(json.dumps(brief), flush=True)
                    args.json.write_text(json.dumps({"runs": runs}, indent=1, default=str))
    summary = summarize(runs)
    args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1, default=str))
    for s in summary:
        print(json.dumps(s))
    ok = all(r["destination_ok"] for r in runs)
    if args.plot:  # its own process: this script's directory is on sys.path, not the package bench
        plots = Path(__file__).resolve().with_name("plots.py")
        drawn = subprocess.run([sys.executable, str(plots), str(args.json)], check=False).returncode
        return 0 if ok and drawn == 0 else 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
