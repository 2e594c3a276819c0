"""How long the ``fph`` client commands take, as ratios to ``python3 -c 'import grpc'`` in the same run.

A client command pays for an interpreter, gRPC and the generated stubs; everything beyond that (numba,
numpy, the lab) is waste on the path of every operator and orchestrator call. Runs a real daemon
(``fph serve``) with one registered VM, then times each command as a fresh process, interleaved, ``--runs``
times, and reads each child's peak RSS from ``wait4``. Targets: median wall time <= 2x the gRPC import,
peak RSS <= 80 MB.

    python bench/cli_bench.py --runs 15 --json bench/results/cli_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RATIO_TARGET = 2.0
RSS_TARGET_MB = 80.0


def timed(argv: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit status of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def start_daemon(state: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = state / "fph.sock"
    fph = shutil.which("fph", path=str(Path(sys.executable).parent)) or "fph"
    proc = subprocess.Popen(
        [fph, "serve", "--socket", str(sock), "--state-dir", str(state), "--log-format", "text"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("fph serve did not start")
        time.sleep(0.05)
    vm = state / "vm1"
    vm.mkdir()
    reg = [fph, "vm", "register", "vm1", "--socket", str(sock), "--qmp-socket", str(vm / "qmp.sock")]
    reg += ["--ram-file", str(vm / "ram"), "--memory-mib", "1024"]
    subprocess.run(reg, check=True, capture_output=True, timeout=30)
    return proc, sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    fph = shutil.which("fph", path=str(Path(sys.executable).parent)) or "fph"
    state = Path(tempfile.mkdtemp(prefix="fph-cli-bench-"))
    daemon, sock = start_daemon(state)
    commands = {
        "import grpc": [sys.executable, "-c", "import grpc"],
        "fph --help": [fph, "--help"],
        "fph vm list": [fph, "vm", "list", "--socket", str(sock)],
        "fph status": [fph, "status", "--socket", str(sock)],
    }
    samples: dict[str, list[tuple[float, float, int]]] = {k: [] for k in commands}
    try:
        for cmd in commands.values():  # warm the page cache once, unmeasured
            timed(cmd)
        for _ in range(args.runs):
            for name, cmd in commands.items():
                samples[name].append(timed(cmd))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(10)
        shutil.rmtree(state, ignore_errors=True)
    base = statistics.median(s[0] for s in samples["import grpc"])
    out: dict[str, Any] = {"runs": args.runs, "python": sys.version.split()[0], "commands": {}}
    ok = True
    print(f"{'command':14s} {'median s':>9s} {'ratio':>6s} {'max RSS MB':>10s}  exit  target")
    for name, ss in samples.items():
        med = statistics.median(s[0] for s in ss)
        rss = max(s[1] for s in ss)
        codes = sorted({s[2] for s in ss})
        ratio = med / base
        met = name == "import grpc" or (ratio <= RATIO_TARGET and rss <= RSS_TARGET_MB and codes == [0])
        ok &= met
        out["commands"][name] = {
            "median_s": round(med, 4),
            "min_s": round(min(s[0] for s in ss), 4),
            "ratio_to_import_grpc": round(ratio, 2),
            "max_rss_mb": round(rss, 1),
            "exit_codes": codes,
        }
        verdict = "" if name == "import grpc" else ("met" if met else "MISSED")
        print(f"{name:14s} {med:9.3f} {ratio:6.2f} {rss:10.1f}  {codes}  {verdict}")
    out["targets"] = {"ratio": RATIO_TARGET, "rss_mb": RSS_TARGET_MB, "met": ok}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
