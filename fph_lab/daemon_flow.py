"""The daemon flow a platform engineer follows, run for real and printed as a transcript.

``python -m fph_lab.daemon_flow`` (as root; it provisions the lab) starts ``fph serve``, registers a source
and a destination VM with the ``fph`` command, starts both QEMUs the way an orchestrator would (printed
without the lab's loader prefix), lets the source guest write and free 700 MiB, migrates it with
``fph migrate --mode fph``, checks the destination guest and prints the report. Every ``$ fph ...`` line is
what was run and every answer is what came back: the README's daemon session is this transcript.

The lab plays the orchestrator's part: it starts QEMU (from the lab's chroot, through its loader) with a
serial console it uses to drive the guest's workload and to verify the destination.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fph.waiting import poll_until
from fph_lab.check import check_destination
from fph_lab.provision import Lab, provision
from fph_lab.vm import VM, VMConfig
from fph_lab.workers import stop_daemon
from fph_lab.workload import run_workload

MiB = 1 << 20


class Transcript:
    """Runs ``fph`` commands as a user would and prints each with its answer."""

    def __init__(self, socket: Path, out: Any = sys.stdout) -> None:
        self.socket = socket
        self.out = out
        self.paths: list[tuple[str, str]] = []

    def show_path(self, real: Path, shown: str) -> None:
        """Print ``real`` as ``shown`` (the run's temporary directories as a host's /run/fph/...)."""
        self.paths.insert(0, (str(real), shown))

    def say(self, text: str) -> None:
        for real, shown in self.paths:
            text = text.replace(real, shown)
        print(text, file=self.out, flush=True)

    def fph(self, *args: str, check: bool = True) -> Any:
        argv = [*args, "--socket", str(self.socket)]
        self.say("$ fph " + " ".join(shlex.quote(a) for a in argv))
        r = subprocess.run(
            [sys.executable, "-m", "fph.cli", *argv], capture_output=True, text=True, timeout=600, check=False
        )
        text = (r.stdout + r.stderr).rstrip()
        if text:
            self.say(text)
        if check and r.returncode != 0:
            raise RuntimeError(f"fph {' '.join(argv)} exited {r.returncode}")
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return r.stdout

    def qemu(self, vm: VM, lab: Lab) -> None:
        """Print the VM's QEMU command line as an orchestrator would run it (no lab loader prefix)."""
        argv = vm.command()
        args = argv[len(lab.qemu.command()) :]
        self.say("$ qemu-system-x86_64 " + " ".join(shlex.quote(a) for a in args) + " &")


def _daemon(socket: Path, state: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fph.cli", "serve", "--socket", str(socket), "--state-dir", str(state)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    poll_until(lambda: socket.exists() or proc.poll() is not None, 30)
    if not socket.exists():
        raise RuntimeError(f"fph serve did not start: {log.read_text(errors='replace')}")
    return proc


def run(lab: Lab, state: Path, mem_mib: int = 1024) -> bool:
    """The whole flow; True if the destination guest checked out."""
    socket = state / "fph.sock"
    t = Transcript(socket)
    t.say("# run in a temporary state directory; its paths are shown as /run/fph, /run/fph/src, /run/fph/dst")
    t.show_path(state, "/run/fph")
    os.environ["FPH_RUN_DIR"] = str(state)  # every VM path must be inside the daemon's state directory
    t.say(f"$ fph serve --socket {socket} --state-dir {state} &")
    daemon = _daemon(socket, state, state / "fph-serve.log")
    vms: list[VM] = []
    try:
        src = VM(lab, VMConfig(mem_mib=mem_mib), name="src")
        dst = VM(lab, VMConfig(mem_mib=mem_mib), name="dst")
        vms += [src, dst]
        t.show_path(src.run_dir, "/run/fph/src")
        t.show_path(dst.run_dir, "/run/fph/dst")
        t.say("\n# 1. register the source VM (before its QEMU starts: fph listens on the balloon socket)")
        reg = t.fph(
            "vm", "register", "src",
            "--qmp-socket", str(src.qmp_socket),
            "--ram-file", str(src.run_dir / "ram"),
            "--balloon-socket", str(src.run_dir / "balloon.sock"),
            "--write-log", str(src.run_dir / "wlog.bin"),
            "--memory-mib", str(mem_mib),
        )  # fmt: skip
        src.config = VMConfig(
            mem_mib=mem_mib,
            balloon="fph",
            vhost_user_socket=reg["spec"]["balloon_socket"],
            ram_backend="file",
            plugins=(reg["plugin_arg"],),
        )
        t.say(
            "\n# 2. start the source QEMU: RAM in the registered file (share=on), the balloon as chardev 'vu'"
        )
        t.say("#    + device 'bal0', and the write-log plugin from the answer above")
        t.qemu(src, lab)
        src.start()
        t.say("\n# 3. register the destination and start its QEMU with -incoming defer and no balloon")
        t.say("#    (fph plugs a fresh balloon there on the registered socket after switchover)")
        t.fph(
            "vm", "register", "dst",
            "--qmp-socket", str(dst.qmp_socket),
            "--ram-file", str(dst.run_dir / "ram"),
            "--balloon-socket", str(dst.run_dir / "balloon.sock"),
            "--memory-mib", str(mem_mib),
        )  # fmt: skip
        dst.config = VMConfig(mem_mib=mem_mib, balloon="none", ram_backend="file", incoming=True)
        t.qemu(dst, lab)
        dst.start()
        src.wait_ready(180)
        t.say("\n# (the guest boots, writes 700 MiB and frees it: memory fph need not send)")
        heartbeat = run_workload(src.guest, "memhog-exit")
        t.say("\n# 4. what the daemon sees")
        t.fph("status")
        t.say("\n# 5. readiness, then the migration with live progress")
        t.fph("migration", "prepare", "src", "--mode", "fph")
        t.fph("migrate", "--vm", "src", "--dest-vm", "dst", "--mode", "fph")
        check = check_destination(dst, src.guest.last_heartbeat() or heartbeat, src=src)
        t.say(f"\n# destination guest check: {'ok' if check.ok else '; '.join(check.problems)}")
        t.say("\n# 6. the report (libvirt job-stat names, fph's hint figures, per-round table)")
        rep = t.fph("migration", "report", "src")
        if isinstance(rep, dict):
            js = rep.get("job_stats", {})
            t.say(
                f"\n# sent {int(js.get('memory_processed', 0)) / MiB:.1f} MiB of a {mem_mib} MiB guest, "
                f"downtime {js.get('downtime')} ms"
            )
        return check.ok
    finally:
        for vm in vms:
            vm.stop()
        stop_daemon(daemon, state, timeout=10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fph_lab.daemon_flow", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem-mib", type=int, default=1024)
    args = ap.parse_args(argv)
    lab = provision(log=lambda m: print(f"[lab] {m}", file=sys.stderr))
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # RAM files: not on disk
    state = Path(tempfile.mkdtemp(prefix="fph-flow-", dir=base))
    try:
        return 0 if run(lab, state, args.mem_mib) else 1
    finally:
        subprocess.run(["rm", "-rf", str(state)], check=False)


if __name__ == "__main__":
    sys.exit(main())
