"""Two hosts on one machine, each with its own ``fph serve``: the lab's rig for cross-host migrations.

``with TwoHostRig(lab) as rig:`` builds, in order: a :class:`~fph_lab.netlab.TwoHostLink` (two network
namespaces joined by a ``tbf``-shaped veth pair; 1 Gbit/s by default), a lab PKI (one CA, a certificate for
``src`` = the source namespace's IP and ``dst`` = the destination's) when ``tls=True``, a state directory per
host under one temporary directory (in /dev/shm: the guests' RAM files live there), and one daemon per host,
started in its namespace with ``--data-address`` = that host's IP (and the TLS files), each waited for until
its gRPC health service answers SERVING. ``rig.src`` and ``rig.dst`` are :class:`HostDaemon`: the gRPC stubs
(``vms``, ``hints``, ``migrations``, ``health``) over the daemon's Unix socket (Unix sockets and files are
shared across namespaces: the test process in the host's namespace talks to both daemons).

VMs: :meth:`TwoHostRig.source_vm` (fph balloon served by the source daemon, RAM file, TCG write log),
:meth:`TwoHostRig.destination_vm` (``-incoming defer``, no balloon, registered with a balloon socket on which
its daemon plugs a fresh balloon after switchover), :meth:`TwoHostRig.native_vm` (QEMU's own virtio-balloon,
free page hinting on unless ``free_page_hint=False``, registered without a balloon socket;
``incoming=True`` for a destination). Each is registered with the daemon of its side, its paths inside that
daemon's state directory, and its QEMU runs in that side's namespace (``VMConfig.netns``).

:meth:`TwoHostRig.close` (every exit path of the ``with`` block, and a setup step that failed half-way):
stops the VMs (each QEMU by its PID, ``VM.stop``), SIGTERMs each daemon by its PID (SIGKILL if it does not
exit), closes the link (which deletes the namespaces) and removes the temporary directory. Should the process
die without closing (SIGKILL), its QEMUs exit with it (``exit-with-parent``) and so do the daemons (started
under ``setpriv --pdeathsig TERM``; like QEMU's, tied to the thread that started them); the namespaces and
the temporary directory then stay (``fph_lab.netlab.leftover_namespaces()`` lists them). The daemons' logs
(JSON lines) are files in ``log_dir`` (default: the temporary directory); errors of the rig carry the tail
of the relevant log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fph.api.v1 import fph_pb2 as pb
from fph.api.v1 import fph_pb2_grpc as pbg
from fph_lab.certs import LabPki, make_pki
from fph_lab.errors import LabError
from fph_lab.netlab import LinkConfig, Side, TwoHostLink
from fph_lab.provision import Lab
from fph_lab.vm import VM, VMConfig
from fph_lab.workers import end_workers

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent
DAEMON_START_TIMEOUT_S = 60.0
DAEMON_STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 30
SIDES: tuple[Side, ...] = ("src", "dst")


class TwoHostError(LabError):
    """The rig could not be set up or used; the message carries the tail of the relevant daemon's log."""


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ("" if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def _run_dir(base: Path) -> Iterator[None]:
    """VMs made inside this block keep their run directories under ``base`` (VM reads $FPH_RUN_DIR)."""
    old = os.environ.get("FPH_RUN_DIR")
    os.environ["FPH_RUN_DIR"] = str(base)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FPH_RUN_DIR", None)
        else:
            os.environ["FPH_RUN_DIR"] = old


@dataclass
class HostDaemon:
    """One host's ``fph serve``: where it runs and the gRPC stubs to it."""

    side: Side
    ns: str
    ip: str
    state_dir: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes]
    channel: Any
    vms: pbg.VmServiceStub
    hints: pbg.HintingServiceStub
    migrations: pbg.MigrationServiceStub
    health: health_pb2_grpc.HealthStub
    argv: list[str] = field(default_factory=list)
    exit_status: int | None = None
    """The daemon's exit status once :meth:`TwoHostRig.close` stopped it (None while it runs)."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def vm_dir(self) -> Path:
        """Where this host's VMs keep their run directories (inside the state directory)."""
        return self.state_dir / "vms"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log, lines)

    def get_vm(self, name: str) -> Any:
        return self.vms.GetVm(pb.GetVmRequest(name=name))

    def serving(self, timeout: float = 2.0) -> bool:
        """The daemon's health service says SERVING (False if it does not answer)."""
        try:
            r = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


class TwoHostRig:
    """Two namespaces, a shaped link, an ``fph serve`` per namespace, and the VMs registered with them.

    ``lab``: the provisioned lab; ``link_config``: the link (default 1 Gbit/s both ways); ``tls``: mutual
    TLS on the data plane with a lab PKI (else ``--data-tls off``); ``mem_mib``: the VMs' default RAM;
    ``log_dir``: where the daemons' logs go (and, at close, each VM's serial and QEMU logs), default the
    temporary directory (removed at close); ``daemon_args``: extra ``fph serve`` flags for both daemons;
    ``init_on_alloc``: the guests' ``init_on_alloc=`` (None: the guest kernel's default, Debian: 1).
    """

    def __init__(
        self,
        lab: Lab,
        link_config: LinkConfig | None = None,
        *,
        tls: bool = True,
        mem_mib: int = 1024,
        log_dir: Path | None = None,
        daemon_args: tuple[str, ...] = (),
        init_on_alloc: int | None = None,
    ) -> None:
        self.lab = lab
        self.tls = tls
        self.mem_mib = mem_mib
        self.init_on_alloc = init_on_alloc
        self.daemon_args = daemon_args
        self.link: TwoHostLink | None = None
        self.pki: LabPki | None = None
        self.vms: list[VM] = []
        self._hosts: dict[Side, HostDaemon] = {}
        self._closed = False
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # RAM files: in RAM, not on disk
        self.dir = Path(tempfile.mkdtemp(prefix="fph-2h-", dir=base))
        self.log_dir = log_dir if log_dir is not None else self.dir
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.link = TwoHostLink(link_config or LinkConfig())
            if tls:
                self.pki = make_pki(self.dir / "pki", {"src": self.link.src_ip, "dst": self.link.dst_ip})
            for side in SIDES:
                self._hosts[side] = self._start_daemon(side)
            for side in SIDES:
                self._wait_serving(self._hosts[side])
        except BaseException:
            self.close(raise_errors=False)
            raise

    # ------------------------------------------------------------------------------------------ daemons

    @property
    def src(self) -> HostDaemon:
        return self._hosts["src"]

    @property
    def dst(self) -> HostDaemon:
        return self._hosts["dst"]

    def host(self, side: Side) -> HostDaemon:
        return self._hosts[side]

    def kill_daemon(self, side: Side) -> int | None:
        """``kill -9`` of ``side``'s daemon (by its PID), as a crash would end it; its exit status."""
        host = self._hosts[side]
        with contextlib.suppress(ProcessLookupError):
            os.kill(host.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            host.channel.close()
        try:
            return host.proc.wait(5.0)
        except subprocess.TimeoutExpired as e:
            raise TwoHostError(f"fph serve ({side}, pid {host.pid}) still runs 5 s after SIGKILL") from e

    def restart_daemon(self, side: Side) -> HostDaemon:
        """Start ``side``'s daemon again on the same state directory, socket and flags (after
        :meth:`kill_daemon`, or after it died) and wait until it serves; its log goes on in the same file."""
        old = self._hosts[side]
        if old.alive():
            raise TwoHostError(f"fph serve ({side}, pid {old.pid}) still runs: kill it first")
        host = self._start_daemon(side, restart=True)
        self._hosts[side] = host
        self._wait_serving(host)
        return host

    def _start_daemon(self, side: Side, *, restart: bool = False) -> HostDaemon:
        assert self.link is not None
        state = self.dir / side
        if not restart:
            state.mkdir(mode=0o700)
            (state / "vms").mkdir(mode=0o700)
        sock = state / "fph.sock"
        ip = self.link.src_ip if side == "src" else self.link.dst_ip
        argv = [
            sys.executable, "-m", "fph.cli", "serve",
            "--socket", str(sock),
            "--state-dir", str(state),
            "--data-address", ip,
        ]  # fmt: skip
        if self.pki is not None:
            files = self.pki.host(side)
            argv += [
                "--tls-cert",
                str(files.cert),
                "--tls-key",
                str(files.key),
                "--tls-client-ca",
                str(files.ca),
            ]
        else:
            argv += ["--data-tls", "off"]
        argv += list(self.daemon_args)
        setpriv = shutil.which("setpriv")
        if setpriv:  # SIGTERM when the starting thread dies, even by SIGKILL (setpriv execs: same PID)
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        log = self.log_dir / f"fph-serve-{side}.log"
        ns = self.link.ns(side)
        with open(log, "ab" if restart else "wb") as f:
            proc = self.link.popen(
                ns, argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                start_new_session=True,
            )  # fmt: skip
        channel = grpc.insecure_channel(f"unix:{sock}")
        host = HostDaemon(
            side=side, ns=ns, ip=ip, state_dir=state, socket=sock, log=log, proc=proc, channel=channel,
            vms=pbg.VmServiceStub(channel), hints=pbg.HintingServiceStub(channel),
            migrations=pbg.MigrationServiceStub(channel), health=health_pb2_grpc.HealthStub(channel),
            argv=argv,
        )  # fmt: skip
        return host

    def _wait_serving(self, host: HostDaemon, timeout: float = DAEMON_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not host.alive():
                raise TwoHostError(
                    f"fph serve ({host.side}, namespace {host.ns}) exited at start with status "
                    f"{host.proc.returncode}; {host.log}:\n{host.tail()}"
                )
            if host.socket.exists() and host.serving():
                return
            if time.monotonic() > deadline:
                raise TwoHostError(
                    f"fph serve ({host.side}) not SERVING on {host.socket} after {timeout:.0f} s; "
                    f"{host.log}:\n{host.tail()}"
                )
            time.sleep(0.1)

    def tails(self, lines: int = LOG_TAIL_LINES) -> str:
        """Both daemons' log tails, for a failure message."""
        return "\n".join(f"--- fph serve {h.side} ({h.log}):\n{h.tail(lines)}" for h in self._hosts.values())

    # ---------------------------------------------------------------------------------------------- VMs

    def _new_vm(self, side: Side, name: str, config: VMConfig) -> VM:
        host = self.host(side)
        with _run_dir(host.vm_dir()):
            vm = VM(self.lab, config, name=name)
        self.vms.append(vm)
        return vm

    def _register(
        self, side: Side, vm: VM, *, balloon: bool, write_log: bool, mem_mib: int, reporting: bool = False
    ) -> Any:
        host = self.host(side)
        spec = pb.VmSpec(
            name=vm.name,
            qmp_socket=str(vm.qmp_socket),
            ram_file=str(vm.run_dir / "ram"),
            balloon_socket=str(vm.run_dir / "balloon.sock") if balloon else "",
            memory_bytes=mem_mib * MiB,
            write_log=str(vm.run_dir / "wlog.bin") if write_log else "",
            free_page_reporting=reporting,
        )
        try:
            return host.vms.RegisterVm(pb.RegisterVmRequest(spec=spec))
        except grpc.RpcError as e:
            raise TwoHostError(
                f"RegisterVm({vm.name}) on the {side} daemon: {e.code().name}: {e.details()}; "
                f"{host.log}:\n{host.tail()}"
            ) from None

    def _start(self, side: Side, vm: VM) -> VM:
        try:
            vm.start()
        except LabError as e:
            raise TwoHostError(
                f"{vm.name} ({side}): {e}\n{self.host(side).log}:\n{self.host(side).tail()}"
            ) from e
        return vm

    def source_vm(
        self, name: str, *, side: Side = "src", mem_mib: int | None = None, reporting: bool = False
    ) -> VM:
        """An fph-mode source on ``side``: registered (balloon socket, RAM file, write log), then its QEMU
        started with fph's balloon, the RAM file and the write-log plugin. Returns once QMP answers (the
        guest still boots: ``vm.wait_ready()``). ``reporting``: fph's balloon offers free page reporting
        (QEMU's device gets the 5th queue)."""
        mem = mem_mib or self.mem_mib
        vm = self._new_vm(side, name, VMConfig(mem_mib=mem, init_on_alloc=self.init_on_alloc))
        reg = self._register(side, vm, balloon=True, write_log=True, mem_mib=mem, reporting=reporting)
        if not reg.plugin_arg:
            raise TwoHostError(f"RegisterVm({name}) gave no plugin_arg for the write log: {reg}")
        vm.config = VMConfig(
            mem_mib=mem,
            init_on_alloc=self.init_on_alloc,
            balloon="fph",
            vhost_user_socket=reg.spec.balloon_socket,
            balloon_queues=5 if reporting else 4,
            ram_backend="file",
            plugins=(reg.plugin_arg,),
            netns=self.host(side).ns,
        )
        return self._start(side, vm)

    def destination_vm(self, name: str, *, side: Side = "dst", mem_mib: int | None = None) -> VM:
        """An fph-mode destination on ``side``: ``-incoming defer``, no balloon device, RAM file; registered
        with a balloon socket (where its daemon plugs a fresh balloon once the guest runs there)."""
        mem = mem_mib or self.mem_mib
        cfg = VMConfig(
            mem_mib=mem,
            init_on_alloc=self.init_on_alloc,
            balloon="none",
            ram_backend="file",
            incoming=True,
            netns=self.host(side).ns,
        )
        vm = self._new_vm(side, name, cfg)
        self._register(side, vm, balloon=True, write_log=False, mem_mib=mem)
        return self._start(side, vm)

    def native_vm(
        self,
        name: str,
        *,
        side: Side = "src",
        incoming: bool = False,
        mem_mib: int | None = None,
        free_page_hint: bool = True,
        prealloc: bool = False,
    ) -> VM:
        """A VM for QEMU's own migrations (modes native and none) on ``side``: QEMU's virtio-balloon
        (``free_page_hint`` on by default; off for mode none's baseline), RAM file, registered without a
        balloon socket or write log; ``incoming=True``: a destination (``-incoming defer``). Give source and
        destination the same ``free_page_hint`` (one device configuration on both ends); ``prealloc``: QEMU
        allocates the RAM file's pages at start (``VMConfig.prealloc``)."""
        mem = mem_mib or self.mem_mib
        cfg = VMConfig(
            mem_mib=mem,
            init_on_alloc=self.init_on_alloc,
            balloon="native",
            free_page_hint=free_page_hint,
            ram_backend="file",
            incoming=incoming,
            netns=self.host(side).ns,
            prealloc=prealloc,
        )
        vm = self._new_vm(side, name, cfg)
        self._register(side, vm, balloon=False, write_log=False, mem_mib=mem)
        return self._start(side, vm)

    # ---------------------------------------------------------------------------------------- teardown

    def close(self, *, raise_errors: bool = True) -> None:
        """Stop the VMs, then the daemons (SIGTERM by PID, SIGKILL after a timeout), close the link and
        remove the temporary directory. Every step is tried; the first error is raised at the end (unless
        ``raise_errors`` is False). Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for vm in self.vms:
            try:
                if self.log_dir != self.dir:
                    vm.save_logs(self.log_dir)
                vm.stop()
            except Exception as e:
                errors.append(f"stopping VM {vm.name}: {type(e).__name__}: {e}")
        for host in self._hosts.values():
            with contextlib.suppress(Exception):
                host.channel.close()
            host.exit_status = self._stop_daemon(host, errors)
            end_workers(host.state_dir)  # they outlive the daemon by design
        if self.link is not None:
            try:
                self.link.close()
            except LabError as e:
                errors.append(f"closing the link: {e}")
        shutil.rmtree(self.dir, ignore_errors=True)  # state, PKI, RAM files (and the logs, if kept here)
        if errors and raise_errors:
            raise TwoHostError("; ".join(errors))

    @staticmethod
    def _stop_daemon(host: HostDaemon, errors: list[str]) -> int | None:
        proc = host.proc
        if proc.poll() is not None:
            return proc.returncode
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(DAEMON_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            errors.append(
                f"fph serve ({host.side}, pid {proc.pid}) ignored SIGTERM for {DAEMON_STOP_TIMEOUT_S:.0f} s: "
                f"killed; {host.log}:\n{host.tail()}"
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(5.0)
        return None

    def __enter__(self) -> TwoHostRig:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # an exception already on its way out is the one to see; teardown errors then only lose out
        self.close(raise_errors=exc_type is None)
