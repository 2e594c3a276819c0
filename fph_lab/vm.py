"""Lab VMs: one QEMU process with a QMP socket, shared guest RAM, a balloon of choice and serial control.

A :class:`VM` owns a run directory (under :func:`run_base`) holding its sockets, logs and (file backend)
RAM file; every path in it is a host path and also the path QEMU uses (the lab's QEMU runs on the host
through its chroot's loader). Teardown ends only the QEMU process this object started, by PID, and is
registered with ``atexit`` so a failing test or Ctrl-C leaves no QEMU behind; QEMU also runs with
``-run-with exit-with-parent=on``, so a killed test process takes its QEMUs along. Nothing is mounted on the
host (the module bind mount of fph_lab.provision lives in QEMU's private mount namespace).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fph.qmp import QMPError, qmp_call
from fph.waiting import poll_until
from fph_lab.errors import LabError, VMError
from fph_lab.guest import Guest
from fph_lab.netlab import netns_argv
from fph_lab.provision import Lab
from fph_lab.serial import SerialConsole

Balloon = Literal["native", "none", "fph"]
RamBackend = Literal["memfd", "file"]

# The generic vhost-user device posing as a virtio-balloon (virtio id 5) served by fph's back-end.
FPH_DEVICE_ARGS = "virtio-id=5,num_vqs={queues},config_size=16,vq_size=1024"
BASE_APPEND = "console=ttyS0 loglevel=4 panic=-1 no_timer_check"


@dataclass(frozen=True)
class VMConfig:
    """What to boot. ``balloon``: ``"native"`` = QEMU's virtio-balloon with an iothread
    (``free_page_hint`` on/off), ``"none"`` = no balloon, ``"fph"`` = ``vhost-user-test-device-pci`` connected
    to ``vhost_user_socket`` (a back-end must already listen there: QEMU is the client).
    ``init_on_alloc``: None = the guest kernel's default (Debian: 1)."""

    mem_mib: int = 1024
    smp: int = 1
    balloon: Balloon = "native"
    free_page_hint: bool = True
    vhost_user_socket: str | None = None
    balloon_queues: int = 4
    """``num_vqs`` of the fph balloon: 5 for a back-end that offers free page reporting (``--reporting``)."""
    ram_backend: RamBackend = "memfd"
    prealloc: bool = False
    """QEMU allocates every page of guest RAM when it starts (``prealloc=on``): a migration destination
    that then touches no new memory while it loads (see ``bench/twohost_bench.py``, mode native-prealloc)."""
    init_on_alloc: int | None = None
    append: str = ""
    plugins: tuple[str, ...] = ()
    incoming: bool = False
    machine: str = "pc"
    extra_args: tuple[str, ...] = ()
    # QEMU exits when the process that started it dies (even by SIGKILL): no orphans after a killed test.
    # Linux ties this to the starting *thread*: start VMs from a thread that outlives them.
    exit_with_parent: bool = True
    # Run QEMU in this network namespace (e.g. fph_lab.netlab's TwoHostLink.src_ns): argv prefixed by
    # fph_lab.netlab.netns_argv, which execs QEMU, so the PID start() records and stop() signals stays QEMU's.
    netns: str | None = None

    def destination(self, **changes: Any) -> VMConfig:
        """The same VM as a migration destination (``-incoming defer``), with optional changes."""
        return dataclasses.replace(self, incoming=True, **changes)

    def kernel_cmdline(self) -> str:
        parts = [BASE_APPEND]
        if self.init_on_alloc is not None:
            parts.append(f"init_on_alloc={int(self.init_on_alloc)}")
        if self.append:
            parts.append(self.append)
        return " ".join(parts)


def run_base() -> str:
    """Where VMs keep their run directories: ``$FPH_RUN_DIR``, else /dev/shm/fph-run, else /tmp/fph-run.

    Why in RAM: a guest RAM file on a disk filesystem pays block allocation and writeback on the guest's
    first touch of each page. On this host's ext4 a 1 GiB guest's first hint run (the driver zeroes 824 MiB
    it never touched) took 3.3 s against 0.7 s with the file in /dev/shm or a memfd (session 20); the hint
    bench had blamed that on the write-log plugin."""
    base = os.environ.get("FPH_RUN_DIR")
    if base:
        return base
    if os.access("/dev/shm", os.W_OK):
        return "/dev/shm/fph-run"
    return os.path.join(tempfile.gettempdir(), "fph-run")


def count_qemu() -> int:
    """QEMU processes on the host (other users' too): the 2-core host may be shared, so benchmarks record
    this contention beside their figures."""
    n = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                n += b"qemu-system" in (p / "cmdline").read_bytes()
            except OSError:
                continue
    return n


_LIVE: dict[int, VM] = {}


def _stop_all_at_exit() -> None:
    for vm in list(_LIVE.values()):
        vm.stop()


atexit.register(_stop_all_at_exit)


@dataclass
class VM:
    """A lab VM. ``with VM(lab, cfg, name="src") as vm: vm.wait_ready(); vm.guest.fill(100)``."""

    lab: Lab
    config: VMConfig = field(default_factory=VMConfig)
    name: str = "vm"
    run_dir: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    console: SerialConsole = field(init=False)
    guest: Guest = field(init=False)
    keep_run_dir: bool = False

    def __post_init__(self) -> None:
        base = run_base()
        Path(base).mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"fph-{self.name}-", dir=base))
        self.console = SerialConsole(str(self.serial_socket), str(self.serial_log))
        self.guest = Guest(self.console)

    # -- paths (all host paths; QEMU sees the same ones) ---------------------------------------------------

    @property
    def qmp_socket(self) -> Path:
        """The QMP monitor for callers (migration_hook, fph's back-end); the lab keeps its own second one."""
        return self.run_dir / "qmp.sock"

    @property
    def lab_qmp_socket(self) -> Path:
        return self.run_dir / "lab-qmp.sock"

    @property
    def serial_socket(self) -> Path:
        return self.run_dir / "serial.sock"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout/stderr."""
        return self.run_dir / "qemu.log"

    @property
    def ram_path(self) -> Path | None:
        """Host path of the guest RAM file (``ram_backend="file"``), else None (memfd: fds via vhost-user)."""
        return self.run_dir / "ram" if self.config.ram_backend == "file" else None

    @property
    def vhost_user_socket(self) -> str | None:
        return self.config.vhost_user_socket

    @property
    def migration_socket(self) -> Path:
        """Where a destination listens for the migration stream (``unix:`` + this)."""
        return self.run_dir / "mig.sock"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- command line

    def command(self) -> list[str]:
        """QEMU's argv for this VM."""
        c = self.config
        mem = f"{c.mem_mib}M"
        if c.ram_backend == "memfd":
            backend = f"memory-backend-memfd,id=mem,size={mem},share=on"
        else:
            backend = f"memory-backend-file,id=mem,size={mem},mem-path={self.ram_path},share=on"
        if c.prealloc:
            backend += ",prealloc=on"
        args = [
            "-name",
            self.name,
            "-accel",
            "tcg",
            "-machine",
            f"{c.machine},memory-backend=mem",
            "-m",
            mem,
            "-smp",
            str(c.smp),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-object",
            backend,
            "-kernel",
            self.lab.kernel,
            "-initrd",
            self.lab.initramfs,
            "-append",
            c.kernel_cmdline(),
            "-chardev",
            f"socket,id=ser0,path={self.serial_socket},server=on,wait=off,logfile={self.serial_log}",
            "-serial",
            "chardev:ser0",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp",
            f"unix:{self.lab_qmp_socket},server=on,wait=off",
        ]
        if c.balloon == "native":
            hint = "on" if c.free_page_hint else "off"
            args += [
                "-object",
                "iothread,id=io1",
                "-device",
                f"virtio-balloon-pci,id=balloon0,iothread=io1,free-page-hint={hint}",
            ]
        elif c.balloon == "fph":
            if not c.vhost_user_socket:
                raise VMError("balloon='fph' needs vhost_user_socket (the back-end's listening socket)")
            bus = ",bus=pci.0,addr=0x5" if c.machine == "pc" else ""
            args += [
                "-chardev",
                f"socket,id=vu,path={c.vhost_user_socket}",
                "-device",
                f"vhost-user-test-device-pci,id=bal0,chardev=vu,{FPH_DEVICE_ARGS.format(queues=c.balloon_queues)}{bus}",
            ]
        elif c.balloon != "none":
            raise VMError(f"unknown balloon {c.balloon!r}: native, none or fph")
        for p in c.plugins:
            args += ["-plugin", p]
        if c.exit_with_parent:
            args += ["-run-with", "exit-with-parent=on"]
        if c.incoming:
            args += ["-incoming", "defer"]
        args += list(c.extra_args)
        argv = self.lab.qemu.command(*args)
        return netns_argv(c.netns, argv) if c.netns else argv

    # -- life cycle

    def start(self, timeout: float = 30.0) -> VM:
        """Start QEMU; return once its QMP socket answers (not once the guest booted: see wait_ready)."""
        if self.proc is not None:
            raise VMError(f"{self.name}: already started")
        with open(self.qemu_log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.lab.qemu.environ(),
                start_new_session=True,
            )
        _LIVE[self.proc.pid] = self
        deadline = time.monotonic() + timeout
        proc = self.proc

        def socket_appeared() -> bool:
            if self.lab_qmp_socket.exists():
                return True
            if proc.poll() is not None:
                err = self.qemu_log.read_text(errors="replace").strip()
                self.stop()
                raise VMError(f"{self.name}: QEMU exited at start (status {proc.returncode}): {err}")
            return False

        if not poll_until(socket_appeared, timeout, 0.02):
            self.stop()
            raise VMError(f"{self.name}: no QMP socket after {timeout} s")
        try:
            self.console.connect()
            while True:  # QMP answers only once init (plugins too) is done
                try:
                    self.qmp("query-status", timeout=1.0)
                    break
                except QMPError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
        except (LabError, QMPError):
            # QEMU opens its monitors before it loads plugins: a plugin that refuses to start makes QEMU
            # exit after the QMP socket appeared. Say what QEMU said, not that the serial is unreachable.
            if self.proc.poll() is not None:
                err = self.qemu_log.read_text(errors="replace").strip()
                self.stop()
                status = self.proc.returncode
                raise VMError(f"{self.name}: QEMU exited at start (status {status}): {err}") from None
            raise
        return self

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Wait for /init's ready line; return the guest uptime at that moment."""
        m = self.console.wait_for(r"FPH-READY uptime=([\d.]+)", timeout)
        return float(m.group(1))

    def boot(self, timeout: float = 120.0) -> VM:
        """start() + wait_ready()."""
        self.start()
        self.wait_ready(timeout)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """One synchronous QMP command on the lab's own monitor (errors: fph.qmp.QMPError tree)."""
        return qmp_call(str(self.lab_qmp_socket), command, arguments, timeout)

    def status(self) -> str:
        """``query-status``'s status: running, paused, inmigrate, postmigrate, ..."""
        return str(self.qmp("query-status")["status"])

    def stop(self, timeout: float = 5.0) -> int | None:
        """End QEMU (QMP quit, then SIGTERM, then SIGKILL, only this PID) and remove the run directory."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(QMPError, OSError):
                    self.qmp("quit", timeout=2.0)
                rc = self._wait(timeout)
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    if rc is not None:
                        break
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.proc.pid, sig)
                    rc = self._wait(timeout)
            else:
                rc = self.proc.returncode
            _LIVE.pop(self.proc.pid, None)
        self.console.close()
        if not self.keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return rc

    def _wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def save_logs(self, dest: Path) -> None:
        """Copy serial and QEMU logs elsewhere (before stop() removes the run directory)."""
        dest.mkdir(parents=True, exist_ok=True)
        for p in (self.serial_log, self.qemu_log):
            if p.exists():
                shutil.copy2(p, dest / f"{self.name}.{p.name}")

    def __enter__(self) -> VM:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
