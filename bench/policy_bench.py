"""Migration-policy suite: fph against QEMU-native free page hinting and no hinting, per workload.

Modes: ``fph`` (fph moves RAM in precopy rounds; QEMU moves device state), ``native`` (QEMU's precopy with
``virtio-balloon-pci,free-page-hint=on``), ``none`` (QEMU's precopy, no balloon). Modes are interleaved:
for each run index, for each workload, the modes run one after another, so host drift hits all alike.

    python bench/policy_bench.py --quick --json bench/results/policy_bench-quick.json
    python bench/policy_bench.py --runs 3 --workloads memhog-exit,dirtier --json bench/results/x.json

Workloads (1 GiB guests unless said; every guest keeps the 32 MiB checksummed ``hold`` region with a
heartbeat, which the destination check verifies):

``memhog-exit``     ~700 MiB written then freed (the case free page hinting is for)
``memhog-exit-4g``  4 GiB guest, memhog of 75 % of RAM (3072 MiB) then freed
``poison``          memhog-exit with ``page_poison=1``: freed pages hold 0xaa (fph sends them as FILL markers)
``poison-4g``       memhog-exit-4g with ``page_poison=1``
``dirtier``         ``dirty 256 51200``: 51200 distinct pages/s (200 MiB/s) rewritten during the migration,
                    under a 128 MiB/s cap and a 300 ms downtime limit; QEMU's ``auto-converge`` is on for
                    native and none (both sides may throttle). The achieved rate is measured in the guest
                    (``dirty 256 51200 3`` in the foreground, before the migration on the source and after
                    it on the destination) and on the host during the migration (fph: the policy's dirty
                    rate per round; QEMU: ``ram.dirty-pages-rate``)
``churn``           ``while true; do memhog 600; sleep 0.3; done &`` started just before the migration and
                    running through switchover (init_on_alloc: the kernel's default, 1); OOM kills counted
``no-driver``       memhog-exit in a guest booted with ``fph_lab.no_balloon`` (no virtio_balloon driver):
                    nobody can hint; fph must say ``unavailable: ...`` and still migrate
``idle``            a fresh idle guest

``--quick``: 1 run per workload and mode, 1 GiB workloads only. Bandwidth: unlimited unless ``--bandwidth``
(the dirtier always uses its 128 MiB/s cap); the cap used is recorded per run.

Measures per run: bytes on the wire (fph: data plane + QEMU device state; native/none: QEMU's
``ram.transferred``), the lower bound (pages allocated at migration start, from the guest's buddyinfo), total
time, downtime (fph: QMP ``stop`` on the source to ``cont`` answered on the destination; QEMU: its own
``downtime``), rounds (fph: rounds; QEMU: dirty syncs), predicted downtime (fph), the max 100 ms window rate
(fph: measured at the sender's socket; native/none: an approximation from ``ram.transferred`` polled every
50 ms on the lab's second QMP monitor while the source runs, windows >= 100 ms), OOM kills on the serial
console, hinting, the destination check. A failed migration is a recorded run with its error, never a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fph.migration.first_hint_run import FirstHintRun
from fph.migration.fph_mode import FphConfig, FphMigration, FphReport
from fph.migration.native import UNLIMITED_BANDWIDTH, NativeMigration
from fph.migration_hook import MigrationReport
from fph_lab.fph_mode import FphPair
from fph_lab.pair import VMPair
from fph_lab.provision import Lab, provision
from fph_lab.vm import VM, VMConfig, count_qemu
from fph_lab.workload import (
    CHURN_CMD,
    HOLD_MIB,
    MEMHOG_MIB,
    SETTLE_S,
    oom_kills,
    wait_allocation_settles,
)

MIB = 1 << 20
MODES = ("fph", "native", "none")
EXTRA_MODES = ("fph-wait",)
"""On request: fph with ``first_hint_run=wait`` (round 0 waits for the guest's first hint run)."""
FPH_MODES = ("fph", "fph-wait")
DOWNTIME_LIMIT_MS = 300
DIRTY_MIB = 256
DIRTY_RATE = 51200  # pages/s = 200 MiB/s
DIRTY_CAP = 128 * MIB
DIRTY_PROBE_S = 3
NATIVE_TIMEOUT_S = 300.0  # fph's own time budget is 300 s too (ConvergenceConfig.time_budget_s)
VIRTIO_BALLOON = re.compile(r"FPH-VIRTIO dev=\S+ id=0x0005 driver=(\S+)")


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # memhog, dirty, churn, idle
    mem_mib: int = 1024
    append: str = ""
    memhog_mib: int = MEMHOG_MIB
    bandwidth: int | None = None  # overrides --bandwidth
    auto_converge: bool = False
    hints_possible: bool = True

    @property
    def big(self) -> bool:
        return self.mem_mib > 1024


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("memhog-exit", "memhog"),
        Workload("memhog-exit-4g", "memhog", mem_mib=4096, memhog_mib=3072),
        Workload("poison", "memhog", append="page_poison=1"),
        Workload("poison-4g", "memhog", mem_mib=4096, memhog_mib=3072, append="page_poison=1"),
        Workload("dirtier", "dirty", bandwidth=DIRTY_CAP, auto_converge=True),
        Workload("churn", "churn"),
        Workload("no-driver", "memhog", append="fph_lab.no_balloon", hints_possible=False),
        Workload("idle", "idle"),
    )
}


def fph_revision() -> dict[str, Any]:
    """The fph code this process imported: HEAD and what differs from it under fph/ and fph_lab/ (the tree
    may be shared with someone committing while a suite runs: modules are imported at start)."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()
        except OSError as e:
            return f"git: {e}"

    return {
        "head": git("rev-parse", "HEAD"),
        "modified": git("status", "--porcelain", "--", "fph", "fph_lab"),
    }


class RateSampler:
    """Polls ``query-migrate`` on a VM's lab monitor (not the one the migration uses) every ``period_s``:
    ``ram.transferred`` over time (max rate over windows >= 100 ms), QEMU's dirty-page rate and
    auto-converge's throttle. An approximation: sample times are when the reply arrived; only samples
    taken while the source VM runs count (QEMU lifts the cap for the stop-and-copy phase)."""

    def __init__(self, vm: VM, period_s: float = 0.05) -> None:
        self.vm = vm
        self.period_s = period_s
        self.samples: list[tuple[float, int]] = []
        self.dirty_pages_rate_max = 0
        self.throttle_max_pct = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rate-sampler", daemon=True)

    def __enter__(self) -> RateSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                before = self.vm.status()
                t0 = time.monotonic()
                info = self.vm.qmp("query-migrate", timeout=2.0)
                t = (t0 + time.monotonic()) / 2  # the counter was read somewhere in the call
                running = before == "running" and self.vm.status() == "running"
            except Exception:
                info, running, t = {}, False, time.monotonic()
            ram = info.get("ram") or {}
            if "transferred" in ram and running:  # the source still runs: not the stop-and-copy window
                self.samples.append((t, int(ram["transferred"])))
                self.dirty_pages_rate_max = max(
                    self.dirty_pages_rate_max, int(ram.get("dirty-pages-rate", 0))
                )
            self.throttle_max_pct = max(self.throttle_max_pct, int(info.get("cpu-throttle-percentage", 0)))
            self._stop.wait(self.period_s)

    def max_window_rate(self, window_s: float = 0.1) -> float | None:
        best: float | None = None
        j = 0
        for i, (t, b) in enumerate(self.samples):
            while j + 1 < i and t - self.samples[j + 1][0] >= window_s:
                j += 1
            tj, bj = self.samples[j]
            if i > j and t - tj >= window_s:
                rate = (b - bj) / (t - tj)
                best = rate if best is None else max(best, rate)
        return best


def dirty_probe(vm: VM) -> float | None:
    """Run ``dirty 256 51200 3`` in the foreground; the pages/s it achieved."""
    out = vm.console.run(f"dirty {DIRTY_MIB} {DIRTY_RATE} {DIRTY_PROBE_S}", timeout=120.0)
    m = re.search(r"FPH-DIRTY done pages=(\d+)", out)
    return round(int(m.group(1)) / DIRTY_PROBE_S) if m else None


def native_hinting(vm: VM, free_page_hint: bool) -> str:
    if not free_page_hint:
        return "unavailable: no balloon"
    m = VIRTIO_BALLOON.search(vm.console.text())
    if m is None:
        return "unavailable: no virtio-balloon device seen by the guest"
    if m.group(1) != "virtio_balloon":
        return f"unavailable: guest driver not bound (driver={m.group(1)})"
    return "used"


def prepare(w: Workload, pair: VMPair | FphPair, extra: dict[str, Any]) -> None:
    """The workload up to the moment the migration starts."""
    src = pair.src
    guest = src.guest
    guest.start_hold(HOLD_MIB, 1)
    if w.kind == "memhog":
        guest.memhog(w.memhog_mib, 0, timeout=600.0)
        time.sleep(SETTLE_S)
        wait_allocation_settles(guest, limit_s=60.0)
    elif w.kind == "idle":
        time.sleep(SETTLE_S)
        wait_allocation_settles(guest)
    elif w.kind == "dirty":
        extra["dirty"] = {"mib": DIRTY_MIB, "target_pages_per_s": DIRTY_RATE,
                          "target_bps": DIRTY_RATE * 4096, "probe_s": DIRTY_PROBE_S}  # fmt: skip
        extra["dirty"]["achieved_pages_per_s_before"] = dirty_probe(src)
        since = src.console.offset()
        out = src.console.run(f"dirty {DIRTY_MIB} {DIRTY_RATE} 0 & echo FPH-BENCH-PID=$!")
        m = re.search(r"FPH-BENCH-PID=(\d+)", out)
        extra["dirty"]["pid"] = int(m.group(1)) if m else None
        src.console.wait_for("FPH-DIRTY start", 60.0, since)
        time.sleep(SETTLE_S)  # first pass over the region faults it in
    elif w.kind == "churn":
        time.sleep(SETTLE_S)
        wait_allocation_settles(guest)
        extra["churn"] = {"command": CHURN_CMD, "console_offset": src.console.offset()}
        src.console.run(CHURN_CMD)
        time.sleep(0.5)
    else:
        raise ValueError(f"unknown workload kind {w.kind!r}")


def after(w: Workload, pair: VMPair | FphPair, extra: dict[str, Any], migrated_ok: bool) -> None:
    """Workload figures after the migration (on the destination if it runs, else on the source)."""
    vm = pair.dst if migrated_ok else pair.src
    if w.kind == "dirty" and extra.get("dirty", {}).get("pid"):
        try:
            vm.console.run(f"kill {extra['dirty']['pid']}", timeout=30.0, check=False)
            extra["dirty"]["achieved_pages_per_s_after"] = dirty_probe(vm)
            extra["dirty"]["after_on"] = vm.name
        except Exception as e:
            extra["dirty"]["after_error"] = f"{type(e).__name__}: {e}"
    if w.kind == "churn":
        since = extra["churn"].pop("console_offset")
        text = pair.src.console.text(since) + (pair.dst.console.text() if migrated_ok else "")
        extra["churn"]["memhog_iterations_completed"] = len(re.findall(r"FPH-MEMHOG mib=", text))


def run_one(
    lab: Lab, w: Workload, mode: str, index: int, bandwidth: int | None, logs: Path | None
) -> dict[str, Any]:
    """Boot, workload, lower bound, migrate, destination check; every failure becomes the run's error."""
    t0 = time.monotonic()
    cap = w.bandwidth if w.bandwidth is not None else bandwidth
    out: dict[str, Any] = {
        "mode": mode, "workload": w.name, "mem_mib": w.mem_mib, "run": index,
        "bytes": None, "lower_bound_bytes": None, "total_s": None, "downtime_ms": None,
        "downtime_limit_ms": DOWNTIME_LIMIT_MS, "predicted_downtime_ms": None, "rounds": None,
        "bandwidth_cap_bps": cap or 0, "max_window_rate_bps": None, "max_window_rate_source": None,
        "guest_oom_kills": None, "hinting": None, "destination_ok": False, "error": None,
        "kernel_append": w.append, "auto_converge": mode not in FPH_MODES and w.auto_converge,
    }  # fmt: skip
    extra: dict[str, Any] = {}
    pair: VMPair | FphPair | None = None
    phase = "boot"
    try:
        if mode in FPH_MODES:
            pair = FphPair(lab, mem_mib=w.mem_mib, append=w.append, keep_logs=logs)
        else:
            cfg = VMConfig(
                mem_mib=w.mem_mib,
                balloon="native" if mode == "native" else "none",
                free_page_hint=mode == "native",
                append=w.append,
            )
            pair = VMPair(lab, cfg, keep_logs=logs)
        with pair:
            out["boot_s"] = round(time.monotonic() - t0, 1)
            if isinstance(pair, FphPair):  # as the daemon does at AcceptIncoming, before any migration
                phase = "prepare incoming"
                pair.prepare_incoming()
            phase = "workload"
            prepare(w, pair, extra)
            phase = "lower bound"
            mem = pair.src.guest.meminfo()
            out["lower_bound_bytes"] = mem.allocated_bytes
            out["guest_meminfo_at_start"] = vars(mem)
            hb = pair.last_source_heartbeat()
            out["host_load_at_start"] = {"loadavg_1m": os.getloadavg()[0], "qemu_processes": count_qemu() - 2}
            phase = "migration"
            report: FphReport | MigrationReport | None = None
            tm = time.monotonic()
            fmig: FphMigration | None = None
            try:
                if isinstance(pair, FphPair):
                    first = FirstHintRun.WAIT if mode == "fph-wait" else FphConfig.first_hint_run  # default
                    fcfg = FphConfig(bandwidth=cap, downtime_limit_ms=DOWNTIME_LIMIT_MS, first_hint_run=first)
                    fmig = pair.migration(fcfg, receiver_process=True)
                    report = asyncio.run(fmig.run())
                else:
                    caps = {"auto-converge": True} if w.auto_converge else {}
                    mig = NativeMigration(
                        str(pair.src.qmp_socket), str(pair.dst.qmp_socket), pair.uri,
                        max_bandwidth=cap, downtime_limit_ms=DOWNTIME_LIMIT_MS, capabilities=caps,
                    )  # fmt: skip
                    with RateSampler(pair.src) as sampler:
                        report = asyncio.run(mig.run(NATIVE_TIMEOUT_S))
                    out["max_window_rate_bps"] = _round(sampler.max_window_rate())
                    out["max_window_rate_1s_bps"] = _round(sampler.max_window_rate(1.0))
                    out["max_window_rate_source"] = (
                        "approx: query-migrate ram.transferred polled every 50 ms while the source runs"
                    )
                    out["throttle_max_pct"] = sampler.throttle_max_pct
                    out["qemu_dirty_pages_rate_max"] = sampler.dirty_pages_rate_max
            except Exception as e:
                out["error"] = f"{type(e).__name__}: {e}"
                cause = getattr(e, "cause", None)
                if cause is not None:
                    out["error_cause"] = f"{type(cause).__name__}: {cause!r}"
                out["error_cleanup"] = getattr(e, "cleanup", None)
                _failed_fph_evidence(out, fmig)
            out["migration_wall_s"] = round(time.monotonic() - tm, 2)
            if report is not None:
                _fill_report(out, report, mode, w, pair)
                phase = "destination check"
                check = pair.check(hb)
                out["destination_ok"] = check.ok
                out["destination_problems"] = check.problems
                if not check.ok and out["error"] is None:
                    out["error"] = "destination check: " + "; ".join(check.problems)
            phase = "after"
            after(w, pair, extra, report is not None)
            n_src, lines_src = oom_kills(pair.src.console.text())
            n_dst, lines_dst = oom_kills(pair.dst.console.text()) if report is not None else (0, [])
            out["guest_oom_kills"] = n_src + n_dst
            out["guest_oom_lines"] = (lines_src + lines_dst)[:12]
            if mode not in FPH_MODES and out["hinting"] is None:
                out["hinting"] = native_hinting(pair.src, mode == "native")
    except Exception as e:
        if out["error"] is None:
            out["error"] = f"{phase}: {type(e).__name__}: {e}"
        else:
            out["error_after"] = f"{phase}: {type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-3000:]
        out["destination_ok"] = False
    for k, v in extra.items():  # _fill_report may have put host-side figures under the same keys
        out[k] = {**v, **out[k]} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    out["run_wall_s"] = round(time.monotonic() - t0, 1)
    return out


def _failed_fph_evidence(out: dict[str, Any], mig: FphMigration | None) -> None:
    """What a failed fph migration got through: its policy's decisions and its rounds (no report exists)."""
    pc = mig.precopy if mig is not None else None
    if pc is None:
        return
    res = pc.result
    out["phase_at_failure"] = mig.phase.value if mig is not None else None
    out["hinting"] = res.hinting
    out["rounds"] = len(res.rounds)
    out["decisions"] = [{**dataclasses.asdict(d), "verdict": d.verdict.value} for d in res.decisions]
    out["fph_rounds"] = [dataclasses.asdict(r) for r in res.rounds]
    out["throttle_max_pct"] = max((d.throttle_pct for d in res.decisions), default=0)
    if res.decisions:
        out["predicted_downtime_ms"] = round(res.decisions[-1].predicted_downtime_ms, 1)
        if "dirty" in out or any(d.dirty_rate_bps for d in res.decisions):
            out["dirty_rate_bps_max_fph"] = round(max(d.dirty_rate_bps for d in res.decisions))


def _round(x: float | None) -> int | None:
    return None if x is None else round(x)


def _fill_report(
    out: dict[str, Any], report: FphReport | MigrationReport, mode: str, w: Workload, pair: VMPair | FphPair
) -> None:
    out["bytes"] = report.bytes
    out["total_s"] = round(report.total_ms / 1e3, 3)
    out["downtime_ms"] = report.downtime_ms
    out["rounds"] = report.syncs
    out["normal_pages"] = report.normal_pages
    out["zero_pages"] = report.zero_pages
    out["job_stats"] = report.job_stats
    if isinstance(report, FphReport):
        f = report.fph
        out["hinting"] = f.get("hinting")
        out["predicted_downtime_ms"] = f.get("predicted_downtime_ms")
        out["downtime_limit_ms"] = f.get("downtime_limit_ms", DOWNTIME_LIMIT_MS)
        out["bandwidth_cap_bps"] = f.get("bandwidth_cap_bps", out["bandwidth_cap_bps"])
        out["max_window_rate_bps"] = f.get("max_window_rate_bps")
        out["max_window_rate_source"] = "fph sender socket, sliding 100 ms windows"
        out["throttle_max_pct"] = f.get("throttle_max_pct")
        out["downtime_breakdown_ms"] = f.get("downtime_breakdown_ms")
        out["fph_errors"] = f.get("errors")
        out["converged"] = f.get("converged")
        out["fill_pages"] = sum(int(r.get("pages_fill", 0)) for r in report.rounds)
        out["decisions"] = f.get("decisions")
        out["fph"] = {k: v for k, v in f.items() if k != "decisions"}
        out["fph_rounds"] = report.rounds
        if w.kind == "dirty":
            rates = [d.get("dirty_rate_bps", 0) for d in f.get("decisions") or []]
            out.setdefault("dirty", {})["host_measured_max_bps"] = max(rates, default=None)
    else:
        out["qemu_query_migrate"] = report.raw
        out["qemu_parameters"] = report.parameters
        ram = report.raw.get("ram") or {}
        if w.kind == "dirty":
            out.setdefault("dirty", {})["host_measured_max_bps"] = (
                out.get("qemu_dirty_pages_rate_max", 0) * int(ram.get("page-size", 4096)) or None
            )


# --------------------------------------------------------------------------------------------- summary


def _median(vals: list[Any]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload: medians per mode, fph/native ratios, the targets and whether they hold."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["workload"] for r in runs):
        rs = [r for r in runs if r["workload"] == name]
        w = WORKLOADS[name]
        per_mode: dict[str, Any] = {}
        for mode in (*MODES, *EXTRA_MODES):
            mr = [r for r in rs if r["mode"] == mode]
            if not mr:
                continue
            ok = [r for r in mr if r["destination_ok"]]
            per_mode[mode] = {
                "runs": len(mr),
                "destination_ok": len(ok),
                "bytes_median": _median([r["bytes"] for r in ok]),
                "total_s_median": _median([r["total_s"] for r in ok]),
                "downtime_ms_median": _median([r["downtime_ms"] for r in ok]),
                "lower_bound_bytes_median": _median([r["lower_bound_bytes"] for r in mr]),
                "guest_oom_kills": sum(r["guest_oom_kills"] or 0 for r in mr),
                "max_window_rate_bps": max(
                    (r["max_window_rate_bps"] for r in mr if r["max_window_rate_bps"] is not None),
                    default=None,
                ),
                "errors": [r["error"] for r in mr if r["error"]],
            }
        fph, nat = per_mode.get("fph"), per_mode.get("native")
        entry: dict[str, Any] = {"modes": per_mode}
        if fph and nat:
            fb, nb = fph["bytes_median"], nat["bytes_median"]
            ft, nt = fph["total_s_median"], nat["total_s_median"]
            fd, nd = fph["downtime_ms_median"], nat["downtime_ms_median"]
            entry["bytes_ratio"] = round(fb / nb, 3) if fb and nb else None
            entry["total_s_ratio"] = round(ft / nt, 3) if ft and nt else None
            entry["downtime_diff_ms"] = round(fd - nd, 1) if fd is not None and nd is not None else None
        wait = per_mode.get("fph-wait")
        if wait and nat:  # for comparison only: the targets are fph's (its default, overlap)
            pairs = (("fph_wait_bytes_ratio", "bytes_median"), ("fph_wait_total_s_ratio", "total_s_median"))
            for key, col in pairs:
                a, b = wait[col], nat[col]
                entry[key] = round(a / b, 3) if a and b else None
        fph_runs = [r for r in rs if r["mode"] == "fph"]
        bytes_target = 1.0 if w.hints_possible else 1.05
        targets: dict[str, Any] = {}
        if "bytes_ratio" in entry:
            targets["bytes_ratio"] = _target(entry["bytes_ratio"], bytes_target, "<=")
            targets["total_s_ratio"] = _target(entry["total_s_ratio"], 1.2, "<=")
            targets["downtime_vs_native_ms"] = _target(
                entry["downtime_diff_ms"], 10.0, "<=", note="fph - native, both converged (medians)"
            )
        over = [
            (r["run"], r["downtime_ms"], r["downtime_limit_ms"])
            for r in fph_runs
            if r["downtime_ms"] is not None and r["downtime_ms"] > r["downtime_limit_ms"]
        ]
        worst_dt = max((r["downtime_ms"] for r in fph_runs if r["downtime_ms"] is not None), default=None)
        targets["fph_downtime_within_limit"] = {
            "value": worst_dt, "target": f"<= {DOWNTIME_LIMIT_MS}", "ok": not over,
            "over": [{"run": i, "downtime_ms": d, "limit_ms": lim} for i, d, lim in over],
        }  # fmt: skip
        if over:
            targets["fph_downtime_within_limit"]["missed_by"] = max(d - lim for _, d, lim in over)
        targets["fph_oom_kills"] = _target(sum(r["guest_oom_kills"] or 0 for r in fph_runs), 0, "<=")
        targets["fph_destination_failures"] = _target(
            sum(1 for r in fph_runs if not r["destination_ok"]), 0, "<="
        )
        capped = [r for r in fph_runs if r["bandwidth_cap_bps"] and r["max_window_rate_bps"] is not None]
        if capped:
            worst = max(r["max_window_rate_bps"] / r["bandwidth_cap_bps"] for r in capped)
            targets["fph_cap_held"] = _target(round(worst, 3), 1.05, "<=", note="max window / cap")
        if name == "no-driver":
            targets["fph_hinting_unavailable"] = {
                "ok": all(str(r["hinting"] or "").startswith("unavailable: ") for r in fph_runs),
                "value": [r["hinting"] for r in fph_runs],
            }
        entry["targets"] = targets
        entry["missed"] = [k for k, v in targets.items() if not v.get("ok")]
        out[name] = entry
    return out


def _target(value: float | None, limit: float, op: str, note: str = "") -> dict[str, Any]:
    ok = value is not None and value <= limit
    d: dict[str, Any] = {"value": value, "target": f"{op} {limit}", "ok": ok}
    if value is not None and not ok:
        d["missed_by"] = round(value - limit, 3)
    if note:
        d["note"] = note
    return d


def table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    def f(v: Any, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        return "–" if v is None else fmt.format(v / scale)

    lines = [
        "| workload | mode | run | MiB sent | lower bound MiB | total s | downtime ms | predicted ms "
        "| rounds | cap MiB/s | max window MiB/s | throttle % | OOM | hinting | dst ok | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        err = (r["error"] or "")[:90].replace("|", "/")
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['run']} | {f(r['bytes'], MIB)} "
            f"| {f(r['lower_bound_bytes'], MIB)} | {f(r['total_s'], fmt='{:.2f}')} "
            f"| {f(r['downtime_ms'], fmt='{:.0f}')} | {f(r['predicted_downtime_ms'])} "
            f"| {f(r['rounds'], fmt='{:.0f}')} | {f(r['bandwidth_cap_bps'] or None, MIB, '{:.0f}')} "
            f"| {f(r['max_window_rate_bps'], MIB)} | {f(r.get('throttle_max_pct'), fmt='{:.0f}')} "
            f"| {f(r['guest_oom_kills'], fmt='{:.0f}')} | {r['hinting']} | {r['destination_ok']} | {err} |"
        )
    lines += [
        "",
        "| workload | bytes fph/native | total s fph/native | downtime fph−native ms | missed targets |",
        "|---|---|---|---|---|",
    ]
    for name, e in summary.items():
        missed = (
            ", ".join(
                f"{k} ({e['targets'][k].get('value')} vs {e['targets'][k].get('target')})"
                for k in e["missed"]
            )
            or "none"
        )
        lines.append(
            f"| {name} | {e.get('bytes_ratio', '–')} | {e.get('total_s_ratio', '–')} "
            f"| {e.get('downtime_diff_ms', '–')} | {missed} |"
        )
    return "\n".join(lines)


def describe(r: dict[str, Any]) -> str:
    mb = f"{r['bytes'] / MIB:.1f} MiB" if r["bytes"] is not None else "– MiB"
    extra = ""
    if "dirty" in r:
        d = r["dirty"]
        extra = (
            f", dirty achieved {d.get('achieved_pages_per_s_before')}→{d.get('achieved_pages_per_s_after')} "
            f"pages/s (target {DIRTY_RATE}), host-measured max {f_mib(d.get('host_measured_max_bps'))} MiB/s"
        )
    if "churn" in r:
        extra = f", memhog iterations {r['churn'].get('memhog_iterations_completed')}"
    return (
        f"{r['workload']} {r['mode']} #{r['run']}: {mb}, total {r['total_s']} s, "
        f"downtime {r['downtime_ms']} ms (predicted {r['predicted_downtime_ms']}), rounds {r['rounds']}, "
        f"lower bound {f_mib(r['lower_bound_bytes'])} MiB, "
        f"max window {f_mib(r['max_window_rate_bps'])} MiB/s, "
        f"OOM {r['guest_oom_kills']}, hinting {r['hinting']}, dst ok {r['destination_ok']}{extra}"
        f"{', error: ' + r['error'] if r['error'] else ''} ({r['run_wall_s']} s)"
    )


def f_mib(v: Any) -> str:
    return "–" if v is None else f"{v / MIB:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workloads", default=None, help=f"comma-separated (default all): {', '.join(WORKLOADS)}"
    )
    ap.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated (default fph,native,none; also fph-wait: round 0 waits for the first hint run)",
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 run per workload and mode, 1 GiB workloads only")
    ap.add_argument(
        "--bandwidth", type=int, default=None, help="bytes/s cap (default unlimited; dirtier: 128 MiB/s)"
    )
    ap.add_argument("--json", type=Path, default=None, help="raw results, rewritten after every run")
    ap.add_argument("--logs", type=Path, default=None, help="keep every run's serial and QEMU logs here")
    ap.add_argument(
        "--plot",
        action="store_true",
        help="at the end, PNG plots beside the --json file (bench/plots.py; needs matplotlib: '.[bench]')",
    )
    args = ap.parse_args(argv)
    if args.plot and args.json is None:
        ap.error("--plot needs --json (the plots are drawn from it, beside it)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # now, not after the suite
        ap.error("--plot needs matplotlib: pip install -e '.[bench]'")

    names = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(unknown)}: {', '.join(WORKLOADS)}")
    modes = args.modes.split(",")
    if any(m not in (*MODES, *EXTRA_MODES) for m in modes):
        ap.error(f"modes: {', '.join((*MODES, *EXTRA_MODES))}")
    runs_n = args.runs
    if args.quick:
        runs_n = 1
        names = [n for n in names if not WORKLOADS[n].big]
    lab = provision(log=lambda s: print(s, file=sys.stderr))
    host: dict[str, Any] = {
        "node": platform.node(),
        "cpus": os.cpu_count(),
        "qemu": lab.qemu.package_version,
        "guest_kernel": lab.kernel_version,
        "accel": "tcg, 1 vCPU",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fph_revision": fph_revision(),
        "argv": sys.argv,
        "quick": args.quick,
        "runs_per_mode": runs_n,
        "workloads": names,
        "modes": modes,
        "bandwidth_default_bps": args.bandwidth or 0,
        "downtime_limit_ms": DOWNTIME_LIMIT_MS,
        "unlimited_bandwidth_qemu": UNLIMITED_BANDWIDTH,
        "dirtier": {"mib": DIRTY_MIB, "pages_per_s": DIRTY_RATE, "cap_bps": DIRTY_CAP,
                    "auto_converge": "native and none (QEMU capability); fph throttles by its own policy"},
        "churn": CHURN_CMD,
        "native_timeout_s": NATIVE_TIMEOUT_S,
        "loadavg_at_start": os.getloadavg(),
    }  # fmt: skip
    runs: list[dict[str, Any]] = []

    def save(final: bool = False) -> None:
        if args.json is None:
            return
        if final:
            host["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"runs": runs, "summary": summarize(runs), "host": host}
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")

    print(f"policy_bench: {runs_n} run(s) x {names} x {modes}", flush=True)
    for i in range(runs_n):
        for name in names:
            for mode in modes:
                logs = args.logs / f"{name}-{mode}-{i}" if args.logs else None
                r = run_one(lab, WORKLOADS[name], mode, i, args.bandwidth, logs)
                runs.append(r)
                save()
                print(describe(r), flush=True)
    save(final=True)
    summary = summarize(runs)
    print()
    print(table(runs, summary))
    print()
    print(
        json.dumps(
            {k: {"missed": v["missed"], "targets": v["targets"]} for k, v in summary.items()}, indent=1
        )
    )
    if args.plot:  # its own process: this script's directory is on sys.path, not the package bench
        plots = Path(__file__).resolve().with_name("plots.py")
        return subprocess.run([sys.executable, str(plots), str(args.json)], check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
