"""Free page hinting through fph's vhost-user balloon with a real guest (QEMU 11.1, TCG, 1 GiB).

    .venv/bin/python bench/hint_bench.py --json bench/results/hint_bench.json

Per guest configuration (``init_on_alloc`` = kernel default (Debian: 1), and 0), one boot: the guest writes
and frees ``--fill-mib`` MiB, then three rounds -- round 1, round 2 after STOP (the guest first runs
``memhog 200``, so its shrinker takes held blocks back: some or, in some runs, all of them), round 3 after
DONE -- then a final DONE.

Per round: ``blocks``, ``hinted_bytes``, ``round_ms`` (request -> the guest's STOP, device clock),
``per_hint_p50_ms``/``per_hint_p99_ms`` (a block popped from the ring -> handed to the sink; target p99
<= 1 ms), ``max_ring_backlog`` (most buffers waiting in the ring when the device looked). Per boot:
``memfree_drop_bytes`` (round 1, guest MemFree before - after) and ``done_recovered_bytes`` (MemFree after
the final DONE - MemFree while held). The sink is a real DirtyBitmap. Raw JSON and the serial logs go to
``--raw-dir`` (default bench/results/hint_bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fph.dirty_bitmap import DirtyBitmap, warm_up
from fph.hint_receiver import BalloonControl, HintState, ThreadedHintReceiver
from fph.ram_layout import RamLayout
from fph.writelog.tcg import TcgWriteLog
from fph_lab.provision import Lab, provision
from fph_lab.sinks import BitmapSink
from fph_lab.vm import VM, VMConfig, run_base

MiB = 1 << 20
GUEST_MIB = 1024


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def memfree(vm: VM) -> int:
    return vm.guest.meminfo().memfree_kb * 1024


def hint_round(ctl: BalloonControl, sink: BitmapSink, name: str) -> dict[str, Any]:
    ctl.take_metrics()  # start this round's latency and backlog figures from zero
    cmd = ctl.request_hints(on_issue=sink.open_epoch)
    wait_for(lambda: ctl.status().state is HintState.STOP, 120, f"the guest's STOP ({name})")
    st = ctl.status()
    metrics = ctl.take_metrics()
    lat_ms = [ns / 1e6 for ns in metrics.latency_ns]
    return {
        "round": name,
        "cmd_id": cmd,
        "blocks": st.blocks,
        "hinted_bytes": st.hinted_bytes,
        "round_ms": round(st.run_seconds * 1e3, 3),
        "per_hint_p50_ms": round(statistics.median(lat_ms), 4) if lat_ms else 0.0,
        "per_hint_p99_ms": round(percentile(lat_ms, 0.99), 4),
        "per_hint_max_ms": round(max(lat_ms), 4) if lat_ms else 0.0,
        "max_ring_backlog": metrics.max_ring_backlog,
        "rejected": st.rejected,
        "sink_errors": st.sink_errors,
    }


def monotone_runs(mib: list[int], step: int = 4) -> list[list[int]]:
    """Hinted blocks' guest-physical addresses (MiB) in the order they arrived, as [first, last] runs of
    neighbouring blocks: the order in which a hint run covers memory, against the address order in which
    round 0 sends it."""
    runs: list[list[int]] = []
    for m in mib:
        if (
            runs
            and abs(m - runs[-1][1]) == step
            and (runs[-1][0] == runs[-1][1] or (m - runs[-1][1]) * (runs[-1][1] - runs[-1][0]) > 0)
        ):
            runs[-1][1] = m
        else:
            runs.append([m, m])
    return runs


def run_boot(
    lab: Lab, init_on_alloc: int | None, fill_mib: int, raw_dir: Path, *, writelog: bool = False
) -> dict[str, Any]:
    """One boot, guest RAM in a file under fph_lab.vm.run_base() (as fph migrates it). ``writelog``: QEMU
    runs with fph's TCG write-log plugin, armed as in an fph migration, so every store the guest's hint run
    makes (the driver zeroes each block it takes when ``init_on_alloc=1``) pays the plugin's callback: the
    run's time with and without it."""
    label = "default" if init_on_alloc is None else str(init_on_alloc)
    load_before = os.getloadavg()[0]
    bitmap = DirtyBitmap(RamLayout.pc(GUEST_MIB * MiB))
    bitmap.mark_all()
    rx = ThreadedHintReceiver()
    with tempfile.TemporaryDirectory(prefix="fph-hint-bench-") as tmp:
        sock = f"{tmp}/vu.sock"
        sink = BitmapSink(bitmap)
        ctl = rx.add_vm(sock, sink)
        wlog = TcgWriteLog(Path(tmp) / "wlog.bin", RamLayout.pc(GUEST_MIB * MiB)) if writelog else None
        config = VMConfig(
            mem_mib=GUEST_MIB,
            balloon="fph",
            vhost_user_socket=sock,
            init_on_alloc=init_on_alloc,
            ram_backend="file",  # as fph migrates it, with or without the plugin: only the plugin differs
            plugins=(wlog.plugin_arg,) if wlog else (),
        )
        vm = VM(lab, config, name=f"hint-bench-{label}{'-wlog' if wlog else ''}")
        try:
            vm.start()
            vm.wait_ready(180)
            if wlog is not None:
                wlog.start()  # armed, as in an fph migration (the plugin logs nothing until then)
            vm.guest.fill(fill_mib)
            before = memfree(vm)
            r1 = hint_round(ctl, sink, "first")
            first_order = [gpa >> 20 for _epoch, ranges in sink.calls for gpa, _n in ranges]
            held = memfree(vm)
            vm.guest.memhog(200)
            r2 = hint_round(ctl, sink, "after_stop")
            ctl.done()
            wait_for(lambda: memfree(vm) >= before - 16 * MiB, 60, "MemFree to recover after DONE")
            r3 = hint_round(ctl, sink, "after_done")
            held3 = memfree(vm)
            t_done = time.monotonic()
            ctl.done()
            wait_for(lambda: memfree(vm) >= before - 16 * MiB, 60, "MemFree to recover after the final DONE")
            done_ms = (time.monotonic() - t_done) * 1e3
            recovered = memfree(vm)
            status = ctl.status()
            vm.save_logs(raw_dir)
        finally:
            vm.stop()
            rx.close(timeout=2.0)
            if wlog is not None:
                wlog.close()
    return {
        "init_on_alloc": label,
        "writelog": writelog,
        "guest_mib": GUEST_MIB,
        "fill_mib": fill_mib,
        "memfree_before_bytes": before,
        "memfree_drop_bytes": before - held,
        "rounds": [r1, r2, r3],
        "first_run_order": monotone_runs(first_order),
        "blocks": r1["blocks"],
        "hinted_bytes": r1["hinted_bytes"],
        "round_ms": r1["round_ms"],
        "per_hint_p50_ms": r1["per_hint_p50_ms"],
        "per_hint_p99_ms": max(r["per_hint_p99_ms"] for r in (r1, r2, r3)),
        "max_ring_backlog": max(r["max_ring_backlog"] for r in (r1, r2, r3)),
        "done_recovered_bytes": recovered - held3,
        "done_recover_ms_upper_bound": round(done_ms, 1),
        "bitmap_hint_bits_cleared": bitmap.stats.hint_bits_cleared,
        "bitmap_hints_dropped_stale": bitmap.stats.hints_dropped_stale,
        "device_broken": status.broken,
        # 2 host cores shared with QEMU's TCG thread (and anything else running): latency tails follow load.
        "host_loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="where to write the summary JSON")
    parser.add_argument("--fill-mib", type=int, default=300)
    parser.add_argument(
        "--init-on-alloc",
        choices=["default", "0", "1"],
        action="append",
        help="guest configurations to run (default: default and 0)",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for this process (Python's default is 5 ms: the device thread can wait "
        "that long for the GIL while another thread runs)",
    )
    parser.add_argument(
        "--writelog",
        choices=["off", "on", "both"],
        default="off",
        help="boot with fph's TCG write-log plugin (on), without (off), or each in turn (both)",
    )
    parser.add_argument("--runs", type=int, default=1, help="boots per configuration, interleaved")
    parser.add_argument("--raw-dir", default=str(Path(__file__).parent / "results" / "hint_bench"))
    args = parser.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    raw_dir = Path(args.raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    lab = provision(log=lambda msg: print(msg, file=sys.stderr))
    warm_up()  # fph compiles the bitmap kernels at start; keep JIT time out of the per-hint figures
    configs = args.init_on_alloc or ["default", "0"]
    results = []
    logs = {"off": [False], "on": [True], "both": [False, True]}[args.writelog]
    for _run in range(args.runs):
        for c in configs:
            for wl in logs:
                res = run_boot(lab, None if c == "default" else int(c), args.fill_mib, raw_dir, writelog=wl)
                print(json.dumps({k: v for k, v in res.items() if k != "rounds"}), file=sys.stderr)
                results.append(res)
    out = {
        "bench": "hint_bench",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "qemu": lab.qemu.version,
        "kernel": lab.kernel_version,
        "target_per_hint_p99_ms": 1.0,
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
        "run_base": run_base(),  # where the RAM files were: on a disk filesystem first touches cost more
        "results": results,
    }
    text = json.dumps(out, indent=2)
    Path(args.json).write_text(text + "\n")
    (raw_dir / f"hint_bench-{out['when']}.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
