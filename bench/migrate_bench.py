"""Migrations compared: fph, QEMU-native free page hinting, and no hinting; same guest, workload, run.

For every run: bytes on the wire (``ram.transferred``; for fph the data plane plus QEMU's device-state
stream), normal and zero pages, total time, downtime, sync count (fph: rounds), the lower bound (pages
allocated at migration start, from the guest's buddyinfo), and the destination check. Modes are
interleaved inside each run index so drift on the host hits every mode alike.

    python bench/migrate_bench.py --workload memhog-exit --modes fph,native,none --runs 3 \\
        --init-on-alloc default,0 --json bench/results/x.json [--bandwidth BYTES_PER_S]

fph's downtime is measured from QMP ``stop`` on the source to ``cont`` answered on the destination;
QEMU's is its own ``downtime`` figure (vCPUs stopped to destination resume request).

Workloads (1 GiB guest, 32 MiB checksummed ``hold`` region with a heartbeat in every workload):
``memhog-exit`` ~700 MiB written then freed; ``idle`` fresh boot; ``dirty`` 64 MiB rewritten at
4000 pages/s during the migration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fph.migration.fph_mode import FphConfig, FphMigrationError, FphReport
from fph.migration_hook import UNLIMITED_BANDWIDTH, MigrationReport
from fph.qmp import QMPError
from fph_lab.fph_mode import FphPair
from fph_lab.pair import VMPair
from fph_lab.provision import Lab, QemuInstall, provision
from fph_lab.vm import VMConfig, count_qemu
from fph_lab.workload import (
    DIRTY_MIB,
    DIRTY_RATE,
    HOLD_MIB,
    MEMHOG_MIB,
    SETTLE_S,
    WORKLOADS,
    wait_allocation_settles,
)

MIB = 1 << 20
MODES = ("fph", "native", "none")


@dataclass(frozen=True)
class Spec:
    mode: str
    workload: str
    init_on_alloc: int | None
    mem_mib: int
    bandwidth: int | None
    exit_with_parent: bool = True


def default_init_on_alloc(lab: Lab) -> int:
    """The guest kernel's built-in default (CONFIG_INIT_ON_ALLOC_DEFAULT_ON; Debian: y)."""
    config = Path(lab.kernel).with_name(f"config-{lab.kernel_version}").read_text()
    return 1 if "CONFIG_INIT_ON_ALLOC_DEFAULT_ON=y" in config else 0


def vm_config(spec: Spec) -> VMConfig:
    if spec.mode == "native":
        return VMConfig(
            mem_mib=spec.mem_mib,
            balloon="native",
            free_page_hint=True,
            init_on_alloc=spec.init_on_alloc,
            exit_with_parent=spec.exit_with_parent,
        )
    if spec.mode == "none":
        return VMConfig(
            mem_mib=spec.mem_mib,
            balloon="none",
            init_on_alloc=spec.init_on_alloc,
            exit_with_parent=spec.exit_with_parent,
        )
    raise SystemExit(f"unknown mode {spec.mode!r} (this benchmark knows {', '.join(MODES)})")


def one_run(lab: Lab, spec: Spec, logs: Path | None) -> dict[str, Any]:
    """Boot, run the workload, measure the lower bound, migrate, check the destination."""
    t0 = time.monotonic()
    pair: VMPair | FphPair
    if spec.mode == "fph":
        pair = FphPair(lab, mem_mib=spec.mem_mib, init_on_alloc=spec.init_on_alloc, keep_logs=logs)
    else:
        pair = VMPair(lab, vm_config(spec), keep_logs=logs)
    with pair:
        guest = pair.src.guest
        guest.start_hold(HOLD_MIB, 1)
        if spec.workload == "memhog-exit":
            guest.memhog(MEMHOG_MIB, 0)
        elif spec.workload == "dirty":
            guest.start_dirty(DIRTY_MIB, DIRTY_RATE)
        elif spec.workload != "idle":
            raise SystemExit(f"unknown workload {spec.workload!r}")
        time.sleep(SETTLE_S)
        if spec.workload != "dirty":  # an exiting memhog frees slowly under TCG (slower with the plugin)
            wait_allocation_settles(guest)
        mem = guest.meminfo()
        hb = pair.last_source_heartbeat()
        load = {"loadavg_1m": os.getloadavg()[0], "qemu_processes": count_qemu() - 2}
        error = None
        report: MigrationReport | FphReport | None
        try:
            if isinstance(pair, FphPair):
                report = pair.migrate(FphConfig(bandwidth=spec.bandwidth))
            else:
                report = pair.migrate_native(max_bandwidth=spec.bandwidth)
        except (QMPError, FphMigrationError) as e:
            error = str(e)
            report = None
        check = pair.check(hb) if report is not None else None
        out: dict[str, Any] = {
            "mode": spec.mode,
            "workload": spec.workload,
            "init_on_alloc": spec.init_on_alloc
            if spec.init_on_alloc is not None
            else default_init_on_alloc(lab),
            "init_on_alloc_on_cmdline": spec.init_on_alloc is not None,
            "bytes": report.bytes if report else None,
            "normal_pages": report.normal_pages if report else None,
            "zero_pages": report.zero_pages if report else None,
            "total_ms": report.total_ms if report else None,
            "downtime_ms": report.downtime_ms if report else None,
            "syncs": report.syncs if report else None,
            "lower_bound_bytes": mem.allocated_bytes,
            "destination_ok": bool(check and check.ok),
            "destination_problems": check.problems if check else [error],
            "mem_mib": spec.mem_mib,
            "max_bandwidth": spec.bandwidth if spec.bandwidth is not None else UNLIMITED_BANDWIDTH,
            "guest_meminfo": vars(mem),
            "job_stats": report.job_stats if report else None,
            "qemu_query_migrate": getattr(report, "raw", None) or getattr(report, "qemu_device_state", None),
            "fph": getattr(report, "fph", None),
            "rounds": getattr(report, "rounds", None),
            "hooks": report.to_dict()["hooks"] if report else None,
            "run_wall_s": round(time.monotonic() - t0, 2),
            "host_load_at_start": load,
        }
    return out


def contention(runs: list[dict[str, Any]]) -> str:
    """One sentence on host contention during the runs (the 2-core host is shared with other QEMUs)."""
    loads = [r["host_load_at_start"] for r in runs if "host_load_at_start" in r]
    if not loads:
        return ""
    q = [x["qemu_processes"] for x in loads]
    la = [x["loadavg_1m"] for x in loads]
    return (
        f"Other QEMU processes on the host at migration start: {min(q)}–{max(q)}; "
        f"1-min load average {min(la):.1f}–{max(la):.1f}."
    )


def summarize(runs: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per (workload, init_on_alloc, mode), ranges over runs."""

    def rng(values: list[Any], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        vals = [v / scale for v in values if v is not None]
        if not vals:
            return "–"
        lo, hi = min(vals), max(vals)
        return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"

    lines = [
        "| workload | init_on_alloc | mode | runs | MiB sent | median MiB | normal pages (k) "
        "| zero pages (k) | total ms | downtime ms | syncs | lower bound MiB | destination ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys: list[tuple[str, str, str]] = []
    for r in runs:
        k = (r["workload"], str(r["init_on_alloc"]), r["mode"])
        if k not in keys:
            keys.append(k)
    for w, ioa, mode in keys:
        rs = [r for r in runs if (r["workload"], str(r["init_on_alloc"]), r["mode"]) == (w, ioa, mode)]
        sent = [r["bytes"] for r in rs if r["bytes"] is not None]
        med = f"{statistics.median(sent) / MIB:.1f}" if sent else "–"
        ok = sum(1 for r in rs if r["destination_ok"])

        def col(key: str, scale: float = 1.0, fmt: str = "{:.1f}", rs: list[dict[str, Any]] = rs) -> str:
            return rng([r[key] for r in rs], scale, fmt)

        lines.append(
            f"| {w} | {ioa} | {mode} | {len(rs)} | {col('bytes', MIB)} | {med} "
            f"| {col('normal_pages', 1000)} | {col('zero_pages', 1000)} "
            f"| {col('total_ms', fmt='{:.0f}')} | {col('downtime_ms', fmt='{:.0f}')} "
            f"| {col('syncs', fmt='{:.0f}')} | {col('lower_bound_bytes', MIB)} "
            f"| {ok}/{len(rs)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="memhog-exit", help=f"comma-separated: {', '.join(WORKLOADS)}")
    ap.add_argument("--modes", default="native,none", help=f"comma-separated: {', '.join(MODES)}")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, required=True, help="raw output (one entry per run)")
    ap.add_argument("--markdown", type=Path, default=None, help="table (default: --json with .md)")
    ap.add_argument(
        "--bandwidth", type=int, default=None, help="max-bandwidth in bytes/s (default unlimited)"
    )
    ap.add_argument(
        "--init-on-alloc", default="default", help="comma-separated: default (guest kernel's), 0, 1"
    )
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument(
        "--qemu-binary", default=None, help="compare against another QEMU (not the lab's); recorded in meta"
    )
    ap.add_argument("--logs", type=Path, default=None, help="keep every run's serial and QEMU logs here")
    args = ap.parse_args(argv)

    workloads = args.workload.split(",")
    modes = args.modes.split(",")
    ioas: list[int | None] = [None if x == "default" else int(x) for x in args.init_on_alloc.split(",")]
    lab = provision(log=lambda s: print(s, file=sys.stderr))
    exit_with_parent = True
    if args.qemu_binary:
        # Comparison runs only (e.g. Debian 12's QEMU 7.2): fph itself always uses the lab's one QEMU.
        out = subprocess.run(
            [args.qemu_binary, "--version"], capture_output=True, text=True, check=True
        ).stdout
        version = out.split("version ", 1)[1].split()[0]
        package = out.split("(", 1)[1].split(")", 1)[0] if "(" in out else version
        lab = dataclasses.replace(
            lab,
            qemu=QemuInstall(
                kind="override", version=version, package_version=package, binary=args.qemu_binary,
                argv_prefix=(), data_dirs=(),
            ),
        )  # fmt: skip
        exit_with_parent = int(version.split(".")[0]) >= 10  # -run-with exit-with-parent is newer than 7.2
    runs: list[dict[str, Any]] = []
    meta = {
        "qemu": lab.qemu.package_version,
        "kernel": lab.kernel_version,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv,
        "memhog_mib": MEMHOG_MIB,
        "hold_mib": HOLD_MIB,
        "dirty": {"mib": DIRTY_MIB, "pages_per_s": DIRTY_RATE},
        "settle_s": SETTLE_S,
        "downtime_limit_ms": 300,
    }

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
        md = args.markdown or args.json.with_suffix(".md")
        md.write_text(
            f"QEMU {meta['qemu']}, guest kernel {meta['kernel']}, TCG 1 vCPU, {args.mem_mib} MiB, "
            f"max-bandwidth {args.bandwidth or 'unlimited'}, raw: {args.json.name}. {contention(runs)}\n\n"
            f"{summarize(runs)}\n"
        )

    for w in workloads:
        for ioa in ioas:
            for i in range(args.runs):
                for mode in modes:
                    spec = Spec(mode, w, ioa, args.mem_mib, args.bandwidth, exit_with_parent)
                    logs = args.logs / f"{w}-ioa{ioa}-{mode}-{i}" if args.logs else None
                    r = one_run(lab, spec, logs)
                    runs.append(r)
                    save()
                    mb = f"{r['bytes'] / MIB:.1f}" if r["bytes"] is not None else "–"
                    print(
                        f"{w} ioa={r['init_on_alloc']} {mode} #{i}: {mb} MiB, {r['total_ms']} ms, "
                        f"downtime {r['downtime_ms']} ms, syncs {r['syncs']}, "
                        f"lower bound {r['lower_bound_bytes'] / MIB:.1f} MiB, dst ok {r['destination_ok']} "
                        f"({r['run_wall_s']} s)",
                        flush=True,
                    )
    print(summarize(runs))
    return 0 if all(r["destination_ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
