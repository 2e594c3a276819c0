"""One lab migration end to end, in any mode: boot, workload, lower bound, migrate, destination check.

``python -m fph_lab.migrate --mode fph|native|none`` (as root: it provisions the lab), the demo and the
migration benchmark all go through :func:`lab_migration`, so a figure from any of them means the same thing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fph.migration.fph_mode import FphConfig, FphReport
from fph.migration.precopy import RoundStats
from fph.migration.tables import rounds_table, side_by_side
from fph.migration_hook import HookEvent, HookPoint, MigrationReport
from fph_lab.check import DestinationCheck
from fph_lab.fph_mode import FphPair
from fph_lab.pair import VMPair
from fph_lab.provision import Lab, provision
from fph_lab.vm import VMConfig
from fph_lab.workload import WORKLOADS, run_workload

MODES = ("fph", "native", "none")
Progress = Callable[[str], None]


@dataclass
class LabMigration:
    mode: str
    workload: str
    init_on_alloc: int | None
    report: FphReport | MigrationReport
    check: DestinationCheck
    lower_bound_bytes: int
    boot_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "workload": self.workload,
            "init_on_alloc": self.init_on_alloc,
            "report": self.report.to_dict(),
            "destination_ok": self.check.ok,
            "destination_problems": self.check.problems,
            "lower_bound_bytes": self.lower_bound_bytes,
            "boot_s": round(self.boot_s, 1),
        }


def describe_round(r: RoundStats) -> str:
    return (
        f"round {r.round}: {r.pages_data} data pages, {r.pages_zero_skipped} zero pages skipped, "
        f"{r.bytes_on_wire / (1 << 20):.1f} MiB, {r.hinted_pages >> 8} MiB hinted, {r.ms:.0f} ms"
    )


def lab_migration(
    lab: Lab,
    mode: str,
    workload: str = "memhog-exit",
    *,
    mem_mib: int = 1024,
    init_on_alloc: int | None = None,
    bandwidth: int | None = None,
    progress: Progress = lambda _line: None,
    keep_logs: Path | None = None,
    fph_config: FphConfig | None = None,
) -> LabMigration:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    t0 = time.monotonic()
    if mode == "fph":
        pair: FphPair | VMPair = FphPair(
            lab, mem_mib=mem_mib, init_on_alloc=init_on_alloc, keep_logs=keep_logs
        )
    else:
        cfg = VMConfig(
            mem_mib=mem_mib,
            balloon="native" if mode == "native" else "none",
            free_page_hint=mode == "native",
            init_on_alloc=init_on_alloc,
        )
        pair = VMPair(lab, cfg, keep_logs=keep_logs)
    with pair:
        boot_s = time.monotonic() - t0
        progress(f"[{mode}] source booted in {boot_s:.1f} s; workload {workload}")
        run_workload(pair.src.guest, workload)
        lower = pair.src.guest.meminfo().allocated_bytes
        progress(f"[{mode}] lower bound (allocated at start): {lower / (1 << 20):.1f} MiB; migrating")
        report: FphReport | MigrationReport
        if isinstance(pair, FphPair):
            config = fph_config or FphConfig(bandwidth=bandwidth)
            mig = pair.migration(config)

            def show(event: HookEvent) -> None:
                pc = mig.precopy
                if event.point is HookPoint.AFTER_SYNC and pc is not None:
                    r = pc.result.final or (pc.result.rounds[-1] if pc.result.rounds else None)
                    if r is not None:
                        progress(f"[fph] {describe_round(r)}")
                elif event.point in (HookPoint.SETUP, HookPoint.COMPLETE, HookPoint.CLEANUP):
                    progress(f"[fph] {event.point.value}")

            mig.dispatcher.register(show)
            report = asyncio.run(mig.run())
        else:

            def show_native(event: HookEvent) -> None:
                if event.point is HookPoint.AFTER_SYNC:
                    progress(f"[{mode}] dirty sync {event.sync}")

            report = pair.migrate_native(max_bandwidth=bandwidth, hooks=(show_native,))
        check = pair.check()
        progress(f"[{mode}] destination check: {'ok' if check.ok else '; '.join(check.problems)}")
        return LabMigration(mode, workload, init_on_alloc, report, check, lower, boot_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fph_lab.migrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=MODES, default="fph")
    ap.add_argument("--workload", choices=WORKLOADS, default="memhog-exit")
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument("--init-on-alloc", type=int, choices=(0, 1), default=None, help="default: the kernel's")
    ap.add_argument("--bandwidth", type=int, default=None, help="bytes/s (default unlimited)")
    ap.add_argument("--json", type=Path, help="write the full report here")
    args = ap.parse_args(argv)
    lab = provision(log=lambda m: print(f"[lab] {m}", file=sys.stderr))
    result = lab_migration(
        lab,
        args.mode,
        args.workload,
        mem_mib=args.mem_mib,
        init_on_alloc=args.init_on_alloc,
        bandwidth=args.bandwidth,
        progress=lambda line: print(line, flush=True),
    )
    print()
    lower = {"lower bound (MiB)": {args.mode: f"{result.lower_bound_bytes / (1 << 20):.1f}"}}
    print(side_by_side({args.mode: result.report}, lower))
    rounds = getattr(result.report, "rounds", None)
    if rounds:
        print()
        print(rounds_table(rounds))
    if args.json:
        args.json.write_text(json.dumps(result.as_dict(), indent=1, default=str) + "\n")
    return 0 if result.check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
