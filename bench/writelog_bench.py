"""What fph's TCG write-log plugin costs a guest's stores, armed and disarmed, and how long arming takes.

    .venv/bin/python bench/writelog_bench.py --runs 3 --json bench/results/writelog_bench.json

Per run, two boots of a 1 GiB guest (RAM in a file, as fph migrates it), interleaved: one without the
plugin, one with it. Each times ``memhog 300`` three times in a row (the first touches fresh memory; the
next ones mostly measure the guest kernel zeroing the pages it faults in, `rep stosq`, and memhog's own
stores, which is what a hint run does): without the plugin; with it disarmed (as between migrations);
armed (``TcgWriteLog.start()``, as an fph migration does), and disarmed again (``close()``). Per boot it
also records how long arming and disarming took on the idle guest (the plugin acts at the next block a
vCPU runs), the stores the plugin counted while armed, and whether any bit was set while disarmed.

The figures that count are the ratios of the medians of memhog runs 2-3 to the run without the plugin of
the same round (absolute times move by 2x between hosts).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fph.ram_layout import RamLayout
from fph.writelog.tcg import HEADER_SIZE, TcgWriteLog
from fph_lab.provision import Lab, provision
from fph_lab.vm import VM, VMConfig, run_base

MiB = 1 << 20
GUEST_MIB = 1024
MEMHOG_MIB = 300


def memhogs(vm: VM, n: int = 3) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        vm.guest.memhog(MEMHOG_MIB)
        out.append(round(time.monotonic() - t0, 3))
    return out


def warm(times: list[float]) -> float:
    """The median of the runs after the first (which also touches fresh memory)."""
    return statistics.median(times[1:])


def bitmap(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint64, offset=HEADER_SIZE)


def boot(lab: Lab, plugins: tuple[str, ...], name: str) -> VM:
    vm = VM(lab, VMConfig(mem_mib=GUEST_MIB, ram_backend="file", plugins=plugins), name=name)
    vm.start()
    vm.wait_ready(240)
    return vm


def run_without(lab: Lab) -> dict[str, Any]:
    vm = boot(lab, (), "wlog-bench-none")
    try:
        return {"plugin": False, "memhog_s": memhogs(vm)}
    finally:
        vm.stop()


def run_with(lab: Lab, idle_s: float) -> dict[str, Any]:
    layout = RamLayout.pc(GUEST_MIB * MiB)
    with tempfile.TemporaryDirectory(prefix="fph-wlog-bench-") as tmp:
        log = TcgWriteLog(Path(tmp) / "wlog.bin", layout)
        vm = boot(lab, (log.plugin_arg,), "wlog-bench-plugin")
        rearmed: TcgWriteLog | None = None
        try:
            stores0, bits0 = log.header().stores, bitmap(log.path)
            disarmed = memhogs(vm)
            untouched = log.header().stores == stores0 and np.array_equal(bitmap(log.path), bits0)
            time.sleep(idle_s)  # let the guest go idle: arming then waits for its next interrupt
            log.start()
            arm_ms = log.arm_ms
            stores1 = log.header().stores
            armed = memhogs(vm)
            stores_armed = log.header().stores - stores1
            time.sleep(idle_s)
            log.close()  # disarms
            rearmed = TcgWriteLog(log.path, layout, create=False)
            t0 = time.monotonic()
            while rearmed.header().armed:
                if time.monotonic() - t0 > 30:
                    raise TimeoutError("the plugin did not disarm within 30 s")
                time.sleep(0.0005)
            disarm_ms = (time.monotonic() - t0) * 1e3
            stores2, bits2 = rearmed.header().stores, bitmap(rearmed.path)
            disarmed_again = memhogs(vm)
            untouched = untouched and rearmed.header().stores == stores2
            untouched = untouched and np.array_equal(bitmap(rearmed.path), bits2)
        finally:
            vm.stop()
            log.close()
            if rearmed is not None:
                rearmed.close()
    return {
        "plugin": True,
        "memhog_disarmed_s": disarmed,
        "arm_ms": None if arm_ms is None else round(arm_ms, 1),
        "memhog_armed_s": armed,
        "stores_counted_armed": stores_armed,
        "disarm_ms": round(disarm_ms, 1),
        "memhog_disarmed_again_s": disarmed_again,
        "nothing_logged_while_disarmed": untouched,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--runs", type=int, default=3, help="rounds of (without, with) boots")
    parser.add_argument("--idle-s", type=float, default=2.0, help="idle time before arming and disarming")
    args = parser.parse_args(argv)
    lab = provision(log=lambda msg: print(msg, file=sys.stderr))
    rounds = []
    for i in range(args.runs):
        without = run_without(lab)
        with_plugin = run_with(lab, args.idle_s)
        base = warm(without["memhog_s"])
        ratios = {
            "disarmed": round(warm(with_plugin["memhog_disarmed_s"]) / base, 2),
            "armed": round(warm(with_plugin["memhog_armed_s"]) / base, 2),
            "disarmed_again": round(warm(with_plugin["memhog_disarmed_again_s"]) / base, 2),
        }
        r = {"round": i, "without": without, "with": with_plugin, "warm_ratio_to_without": ratios}
        print(json.dumps(r), file=sys.stderr)
        rounds.append(r)
    out = {
        "bench": "writelog_bench",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "qemu": lab.qemu.version,
        "kernel": lab.kernel_version,
        "guest_mib": GUEST_MIB,
        "memhog_mib": MEMHOG_MIB,
        "run_base": run_base(),
        "rounds": rounds,
    }
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
