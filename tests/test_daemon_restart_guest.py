"""``kill -9`` of a real ``fph serve`` in the middle of an fph migration's round 0, then a restart on the
same state directory: the restarted daemon rolls the migration back within 10 s (source running with its
memory, x-ignore-shared off, destination QEMU gone), reports "aborted: back-end restarted", and adopts the
source's balloon worker, which held QEMU's vhost-user connection all along: the VM is not degraded, the
guest's hinted blocks are given back (DONE) within 10 s, and a second fph migration (it unplugs that
balloon: QEMU 11.1 aborts on device_del of a balloon whose back-end went away) succeeds to a verified
destination. QEMU must survive all of it. Killed at switchover: in the final round (the source stopped) the
migration is rolled back the same way; during the destination's balloon re-plug (the guest already runs
there) it is finished instead, never rolled back onto the source that handed the guest over."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from fph.api.v1 import fph_pb2 as pb
from fph.api.v1 import fph_pb2_grpc as pbg
from fph.daemon.recovery import COMPLETED
from fph.waiting import poll_until
from fph_lab.check import check_destination
from fph_lab.guest import kernel_errors
from fph_lab.provision import Lab
from fph_lab.vm import VM, VMConfig
from fph_lab.workers import end_workers

pytestmark = [pytest.mark.guest, pytest.mark.fault, pytest.mark.timeout(600)]
MiB = 1 << 20
MEM_MIB = 1024


class Served:
    """``fph serve`` as its own process (killed by PID), with stubs on its socket."""

    def __init__(self, state: Path) -> None:
        self.sock = state / "fph.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fph.cli", "serve", "--socket", str(self.sock), "--state-dir", str(state),
             "--log-format", "text"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.kill_on = ""
        """A log line containing this kills the daemon at once (from the reader thread)."""
        self.killed_on = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert poll_until(lambda: self._accepts() or self.proc.poll() is not None, 60, 0.05)
        assert self.proc.poll() is None, self.log()
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        self.vms = pbg.VmServiceStub(self.channel)
        self.hints = pbg.HintingServiceStub(self.channel)
        self.migrations = pbg.MigrationServiceStub(self.channel)

    def _accepts(self) -> bool:
        """The socket accepts (a dead predecessor's socket file exists but refuses)."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
            return True

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.kill_on and self.kill_on in line and not self.killed_on.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.killed_on.set()

    def log(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.channel.close()

    def stop(self) -> str:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        return self.log()


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="fph-restart-", dir=base))
    monkeypatch.setenv("FPH_RUN_DIR", str(d / "vms"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class Started:
    """What a test started, ended by the ``started`` fixture: daemons, then their workers, then QEMUs."""

    daemons: list[Served] = field(default_factory=list)
    vms: list[VM] = field(default_factory=list)

    def serve(self, state: Path) -> Served:
        self.daemons.append(Served(state))
        return self.daemons[-1]


@pytest.fixture
def started(state: Path) -> Iterator[Started]:
    s = Started()
    try:
        yield s
    finally:
        for d in s.daemons:
            d.stop()
        end_workers(state)  # the balloon workers outlive the daemons by design
        for vm in s.vms:
            vm.stop()


def register(daemon: Served, vm: VM, *, write_log: bool) -> Any:
    s = pb.VmSpec(
        name=vm.name, qmp_socket=str(vm.qmp_socket), ram_file=str(vm.run_dir / "ram"),
        balloon_socket=str(vm.run_dir / "balloon.sock"), memory_bytes=MEM_MIB * MiB,
        write_log=str(vm.run_dir / "wlog.bin") if write_log else "",
    )  # fmt: skip
    return daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=s))


def start_source(lab: Lab, daemon: Served, vms: list[VM]) -> VM:
    """The source: fph's balloon (its worker listens from RegisterVm on) and the TCG write log."""
    src = VM(lab, VMConfig(mem_mib=MEM_MIB), name="src")
    vms.append(src)
    rec = register(daemon, src, write_log=True)
    src.config = VMConfig(
        mem_mib=MEM_MIB, balloon="fph", vhost_user_socket=rec.spec.balloon_socket, ram_backend="file",
        plugins=(rec.plugin_arg,),
    )  # fmt: skip
    src.start()
    return src


def start_destination(lab: Lab, daemon: Served, vms: list[VM], name: str) -> VM:
    dst = VM(lab, VMConfig(mem_mib=MEM_MIB, balloon="none", ram_backend="file", incoming=True), name=name)
    vms.append(dst)
    register(daemon, dst, write_log=False)
    dst.start()
    return dst


def assert_back_whole(second: Served, src: VM, t_restart: float) -> None:
    """After the restart: the VM not degraded (its worker kept QEMU's connection), its balloon plugged,
    the guest's hinted blocks back within 10 s of the restart, its checksummed memory unchanged."""
    vm_src = second.vms.GetVm(pb.GetVmRequest(name="src"))
    assert not vm_src.degraded and vm_src.balloon_connected, vm_src
    assert vm_src.state == pb.VM_STATE_REGISTERED
    children = {c["name"] for c in src.qmp("qom-list", {"path": "/machine/peripheral"})}
    assert "bal0" in children, "the source has no balloon after the rollback"

    def released() -> bool:
        st = second.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="src"))
        return st.guest_held_bytes == 0 and st.state in ("done", "stop")

    assert poll_until(released, max(0.5, 10.0 - (time.monotonic() - t_restart)), 0.2), "hints still held"
    hb0 = src.guest.last_heartbeat()
    time.sleep(2.5)
    hb1 = src.guest.last_heartbeat()
    assert hb0 is not None and hb1 is not None and hb1.seq > hb0.seq and hb1.ok, (hb0, hb1)
    assert hb1.csum == hb0.csum, "the guest's checksummed region changed"
    assert src.alive() and src.status() == "running", "QEMU died or stopped after the restart"


def test_a_daemon_killed_in_round_0_is_rolled_back_by_its_successor(
    lab: Lab, state: Path, started: Started
) -> None:
    vms = started.vms
    first = started.serve(state)
    src = start_source(lab, first, vms)
    dst = start_destination(lab, first, vms, "dst")
    src.wait_ready(180)
    src.guest.fill(300)  # data that round 0 must send: at 16 MiB/s it takes many seconds
    src.guest.start_hold(32, 1)
    kill_in_phase(first, "rounds")
    assert src.alive() and dst.alive(), "QEMU died with fph"

    t_restart = time.monotonic()
    second = started.serve(state)
    report = second.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
    assert time.monotonic() - t_restart < 10.0
    assert report.error == "aborted: back-end restarted", report
    assert "source x-ignore-shared off" in report.cleanup, report.cleanup  # (round 0: it never stopped)
    caps = {c["capability"]: c["state"] for c in src.qmp("query-migrate-capabilities")}
    assert caps["x-ignore-shared"] is False
    assert poll_until(lambda: not dst.alive(), 10, 0.1), "the destination QEMU was not told to quit"
    assert_back_whole(second, src, t_restart)

    # the adopted balloon serves a whole fph migration, its unplug at switchover included
    dst2 = start_destination(lab, second, vms, "dst2")
    target2 = second.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst2", mode=pb.MODE_FPH))
    request2 = pb.MigrateRequest(
        vm="src", mode=pb.MODE_FPH, destination=target2, bandwidth_bytes_per_second=125_000_000
    )
    last = list(second.migrations.Migrate(request2))[-1]
    assert last.phase == pb.PHASE_SUCCEEDED, last
    assert src.alive(), "the source QEMU died (device_del of the adopted balloon?)"
    hb = src.guest.last_heartbeat()
    assert hb is not None
    assert poll_until(lambda: dst2.status() == "running", 60, 0.2)
    check = check_destination(dst2, hb, src=src)
    assert check.ok, check.problems
    # both reports outlive the daemon that wrote them
    done = second.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
    second.kill()
    third = started.serve(state)
    assert third.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src")) == done
    aborted = third.migrations.GetMigrationReport(
        pb.GetMigrationReportRequest(vm="src", migration_id=report.migration_id)
    )
    assert aborted.error == "aborted: back-end restarted", aborted


PHASES = ("idle", "hint-run", "unplug")
"""Round 0 is the test above (it also migrates the VM again after the restart); the final round and the
re-plug are the switchover test below."""
KILL_ON = {
    "unplug": "balloon unplug requested",  # while QEMU and the guest eject the device
    "final-round": "source stopped for the final round",  # the source stopped, its last pages going out
    "re-plug": "balloon re-plug requested",  # the guest runs on the destination, its fresh balloon coming
}
"""The daemon's log line that kills it in a phase too short to be reached through the progress stream."""


def kill_in_phase(first: Served, phase: str) -> None:
    """Bring the first daemon to ``phase`` (a hint run, or an fph migration's rounds, unplug, final round
    or the destination's re-plug), then kill -9 it there."""
    if phase == "hint-run":
        first.hints.StartHinting(pb.StartHintingRequest(vm="src"))

        def hinting() -> bool:
            st = first.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="src"))
            return st.state == "start" and st.hinted_bytes > 0

        assert poll_until(hinting, 60, 0.02), "the guest never started hinting"
    elif phase in ("rounds", *KILL_ON):  # an fph migration to the incoming VM "dst"
        first.kill_on = KILL_ON.get(phase, "")
        target = first.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst", mode=pb.MODE_FPH))
        request = pb.MigrateRequest(
            vm="src",
            mode=pb.MODE_FPH,
            destination=target,
            bandwidth_bytes_per_second=(16 if phase == "rounds" else 125) * MiB,
            progress_interval_ms=50,
        )
        reached = threading.Event()
        seen: list[str] = []

        def follow() -> None:
            try:
                for ev in first.migrations.Migrate(request):
                    seen.append(f"{ev.fph_phase}/{ev.phase}")
                    if ev.fph_phase == phase and (phase != "rounds" or ev.memory_processed > 8 * MiB):
                        reached.set()
                        return
            except grpc.RpcError as e:  # the daemon is killed under the stream (or refused it)
                seen.append(f"{e.code()}: {e.details()}")

        threading.Thread(target=follow, daemon=True).start()
        if first.kill_on:
            assert first.killed_on.wait(120), f"no {phase}: {seen[-5:]}"
        else:
            assert reached.wait(120), f"the migration never reached {phase}: {seen[-5:]}"
    first.kill()


@pytest.mark.parametrize("phase", PHASES)
def test_a_daemon_killed_in_each_phase_leaves_qemu_and_its_balloon_whole(
    lab: Lab, state: Path, started: Started, phase: str
) -> None:
    """kill -9 of ``fph serve`` when idle, in a hint run, or while QEMU unplugs the balloon in an fph
    migration; a new daemon on the state directory: QEMU alive, the source running with its memory, the VM not
    degraded with its balloon plugged (re-added if the dead daemon had unplugged it), the guest's hinted
    blocks back within 10 s, and the adopted balloon serves a new hint run."""
    vms = started.vms
    first = started.serve(state)
    src = start_source(lab, first, vms)
    if phase == "unplug":
        start_destination(lab, first, vms, "dst")
    src.wait_ready(180)
    src.guest.start_hold(32, 1)
    worker = first.vms.GetVm(pb.GetVmRequest(name="src")).balloon_worker_pid
    kill_in_phase(first, phase)
    assert src.alive(), "the source QEMU died with fph"

    t_restart = time.monotonic()
    second = started.serve(state)
    if phase == "unplug":
        report = second.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
        assert report.error == "aborted: back-end restarted", report
        assert "balloon re-added on the source" in report.cleanup, report.cleanup
        print(f"phase {phase}: rollback {list(report.cleanup)}")
    assert_back_whole(second, src, t_restart)
    assert second.vms.GetVm(pb.GetVmRequest(name="src")).balloon_worker_pid == worker > 0  # adopted

    def hinted_again() -> bool:
        st = second.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="src"))
        return st.state == "stop" and st.hinted_bytes > 0

    # the balloon (adopted, or re-added on its chardev) answers a new hint run
    assert poll_until(lambda: second.vms.GetVm(pb.GetVmRequest(name="src")).free_page_hint_negotiated, 60)
    second.hints.StartHinting(pb.StartHintingRequest(vm="src", acknowledge_on_stop=True))
    assert poll_until(hinted_again, 60, 0.2), "no hint run after the restart"
    second.hints.StopHinting(pb.StopHintingRequest(vm="src"))
    assert src.alive() and src.status() == "running"


def served_balloon(daemon: Served, vm: VM, name: str) -> None:
    """The VM's balloon plugged in QEMU, served by its (adopted) worker: a hint run through ``daemon``
    gets hints, and after it the guest holds nothing."""
    children = {c["name"] for c in vm.qmp("qom-list", {"path": "/machine/peripheral"})}
    assert "bal0" in children, f"{name} has no balloon"
    got = daemon.vms.GetVm(pb.GetVmRequest(name=name))
    assert not got.degraded and got.balloon_connected, got
    assert poll_until(lambda: daemon.vms.GetVm(pb.GetVmRequest(name=name)).free_page_hint_negotiated, 60)

    def hinted() -> bool:
        st = daemon.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm=name))
        return st.state == "stop" and st.hinted_bytes > 0

    daemon.hints.StartHinting(pb.StartHintingRequest(vm=name, acknowledge_on_stop=True))
    assert poll_until(hinted, 60, 0.2), f"no hint run on {name}"
    daemon.hints.StopHinting(pb.StopHintingRequest(vm=name))

    def released() -> bool:
        st = daemon.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm=name))
        return st.guest_held_bytes == 0 and st.state in ("done", "stop")

    assert poll_until(released, 10, 0.2), f"{name}'s guest still holds hinted memory"


@pytest.mark.parametrize("phase", ("final-round", "re-plug"))
def test_a_daemon_killed_at_switchover_leaves_the_guest_whole_on_one_side(
    lab: Lab, state: Path, started: Started, phase: str
) -> None:
    """kill -9 of ``fph serve`` (which serves both VMs) at switchover, with the guest writing; a new daemon
    on the state directory. In the final round (the source stopped, its last dirty pages going out) the
    migration is rolled back within 10 s: the source resumed with its memory and its balloon re-added, the
    destination QEMU gone, and the source migrates again to a verified destination. During the
    destination's re-plug (the guest already runs there) it is finished, never rolled back: the
    destination runs the verified guest with a fresh balloon served by its adopted worker, the source stays
    stopped, and the migration reads completed (or had already ended before the kill)."""
    vms = started.vms
    first = started.serve(state)
    src = start_source(lab, first, vms)
    dst = start_destination(lab, first, vms, "dst")
    src.wait_ready(180)
    src.guest.start_hold(32, 1)
    src.guest.start_dirty(64, 2000)  # the final round has pages to send (~8 MB/s of rewrites)
    workers = {n: first.vms.GetVm(pb.GetVmRequest(name=n)).balloon_worker_pid for n in ("src", "dst")}
    kill_in_phase(first, phase)
    assert src.alive() and dst.alive(), "QEMU died with fph"
    hb = src.guest.last_heartbeat()  # the source's last word before it stopped
    assert hb is not None

    t_restart = time.monotonic()
    second = started.serve(state)
    # finished reports are kept: this one is either the restarted daemon's (in flight at the kill) or, at
    # the re-plug, the job's own, saved when it ended just before the kill
    report = second.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
    assert time.monotonic() - t_restart < 10.0
    for name, pid in workers.items():  # both balloons' workers adopted, neither VM degraded
        got = second.vms.GetVm(pb.GetVmRequest(name=name))
        assert got.balloon_worker_pid == pid > 0 and not got.degraded, got

    if phase == "final-round":
        assert report is not None
        assert report.phase == pb.PHASE_FAILED and report.error == "aborted: back-end restarted", report
        cleanup = list(report.cleanup)
        for step in (
            "source x-ignore-shared off",
            "source resumed (was paused)",
            "balloon re-added on the source",
        ):
            assert step in cleanup, cleanup
        print(f"phase {phase}: rollback {cleanup}")
        caps = {c["capability"]: c["state"] for c in src.qmp("query-migrate-capabilities")}
        assert caps["x-ignore-shared"] is False
        assert poll_until(lambda: not dst.alive(), 10, 0.1), "the destination QEMU was not told to quit"
        assert_back_whole(second, src, t_restart)
        assert not kernel_errors(src.console.text()), kernel_errors(src.console.text())
        served_balloon(second, src, "src")
        # the rolled-back source is whole: it migrates again (its re-added balloon unplugged at switchover)
        dst2 = start_destination(lab, second, vms, "dst2")
        target2 = second.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst2", mode=pb.MODE_FPH))
        request2 = pb.MigrateRequest(
            vm="src", mode=pb.MODE_FPH, destination=target2, bandwidth_bytes_per_second=125_000_000
        )
        last = list(second.migrations.Migrate(request2))[-1]
        assert last.phase == pb.PHASE_SUCCEEDED, last
        hb2 = src.guest.last_heartbeat()
        assert hb2 is not None and hb2.csum == hb.csum
        assert poll_until(lambda: dst2.status() == "running", 60, 0.2)
        check = check_destination(dst2, hb2, src=src)
        assert check.ok, check.problems
        return

    # re-plug: the guest runs on the destination; the source handed it over and stays stopped
    assert report.phase == pb.PHASE_SUCCEEDED and report.status == "completed" and not report.error, report
    in_flight = bool(report.cleanup)  # a job that ended by itself has no cleanup steps
    if in_flight:
        assert report.cleanup[0] == COMPLETED, report.cleanup
    dst_vm = second.vms.GetVm(pb.GetVmRequest(name="dst"))
    finished = [line.split("incoming: ", 1)[1].strip() for line in second.lines if "incoming: " in line]
    print(
        f"phase {phase}: migration {'in flight' if in_flight else 'already ended'} at the kill; "
        f"report {list(report.cleanup)}; destination {dst_vm.incoming!r}: {finished}"
    )
    assert dst_vm.incoming.startswith("resumed"), dst_vm.incoming
    assert second.vms.GetVm(pb.GetVmRequest(name="src")).state == pb.VM_STATE_MIGRATED
    assert dst.status() == "running"
    assert src.alive() and src.status() == "postmigrate", "the source must not run after the destination did"
    check = check_destination(dst, hb, src=src)
    assert check.ok, check.problems
    served_balloon(second, dst, "dst")
    assert src.status() == "postmigrate" and dst.status() == "running"
