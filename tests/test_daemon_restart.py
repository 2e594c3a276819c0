"""A restarted daemon: its VMs back from the saved state, a running VM whose balloon connection dropped
reported degraded (never re-attached, never unplugged), and a migration the dead daemon was running
rolled back over QMP (fake QEMU monitors) with the report "aborted: back-end restarted", or, where the
destination already holds the guest, finished there and reported completed (the source stays stopped)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fph.api.v1 import fph_pb2 as pb
from fph.daemon.migration_mode import MigrationMode
from fph.daemon.recovery import COMPLETED
from fph.daemon.server import DaemonConfig
from fph.daemon.state_file import PersistedMigration, PersistedState, PersistedVm, StateFile, StateFileError
from fph.daemon.vm_state import VmState
from fph.ram_layout import GiB, RamLayout
from fph.writelog.tcg import TcgWriteLog
from tests.daemon_helper import RunningDaemon
from tests.fake_qmp import FakeQMP


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def make_daemon(tmp_path: Path, state: Path) -> Iterator[Callable[[], RunningDaemon]]:
    started: list[RunningDaemon] = []

    def make() -> RunningDaemon:
        sock = str(tmp_path / f"fph{len(started)}.sock")
        cfg = DaemonConfig.load(None, {"socket": sock, "state_dir": str(state), "log_format": "text"})
        d = RunningDaemon(cfg)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def vm(state: Path, name: str, *, balloon: bool = True) -> PersistedVm:
    d = state / name
    d.mkdir(exist_ok=True)
    return PersistedVm(
        name=name, qmp_socket=str(d / "qmp.sock"), ram_file=str(d / "ram"),
        balloon_socket=str(d / "balloon.sock") if balloon else "", memory_bytes=GiB, write_log="",
        state=VmState.REGISTERED,
    )  # fmt: skip


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def test_vms_come_back_after_a_restart(make_daemon: Callable[[], RunningDaemon], state: Path) -> None:
    first = make_daemon()
    for name, balloon in (("vm1", True), ("vm2", False)):
        v = vm(state, name, balloon=balloon)
        first.vms.RegisterVm(
            pb.RegisterVmRequest(
                spec=pb.VmSpec(
                    name=v.name,
                    qmp_socket=v.qmp_socket,
                    ram_file=v.ram_file,
                    balloon_socket=v.balloon_socket,
                    memory_bytes=v.memory_bytes,
                )
            )
        )
    first.stop()
    second = make_daemon()
    vms = {v.spec.name: v for v in second.vms.ListVms(pb.ListVmsRequest()).vms}
    assert sorted(vms) == ["vm1", "vm2"] and not any(v.degraded for v in vms.values())
    assert listening(vms["vm1"].spec.balloon_socket)  # no QEMU runs it yet: its balloon is served again
    second.vms.UnregisterVm(pb.UnregisterVmRequest(name="vm2"))
    assert [v.name for v in StateFile(state).load().vms] == ["vm1"]


def test_a_restarted_daemon_disarms_the_write_log_its_predecessor_left_armed(
    make_daemon: Callable[[], RunningDaemon], state: Path
) -> None:
    """The first daemon died during an fph migration: the plugin stays armed (every guest store pays a
    callback) until someone asks otherwise. The restarted daemon asks, since no migration runs now."""
    first = make_daemon()
    v = vm(state, "vm1", balloon=False)
    wlog = state / "vm1" / "wlog.bin"
    spec = pb.VmSpec(name=v.name, qmp_socket=v.qmp_socket, ram_file=v.ram_file, memory_bytes=v.memory_bytes,
                     write_log=str(wlog))  # fmt: skip
    first.vms.RegisterVm(pb.RegisterVmRequest(spec=spec))
    first.stop()
    dead_migration = TcgWriteLog(wlog, RamLayout.pc(GiB), create=False)
    with open(wlog, "r+b") as f:  # a plugin attached (what its install does)
        f.seek(48)
        f.write(struct.pack("<II", os.getpid(), 1))
    dead_migration.prepare()  # armed, and never closed: its daemon died
    assert dead_migration.header().arm_request & 1
    second = make_daemon()
    assert [x.spec.name for x in second.vms.ListVms(pb.ListVmsRequest()).vms] == ["vm1"]
    assert not dead_migration.header().arm_request & 1
    dead_migration.close()


def test_a_running_vm_whose_balloon_dropped_is_degraded(
    make_daemon: Callable[[], RunningDaemon], state: Path
) -> None:
    v = vm(state, "vm1")
    qemu = FakeQMP(
        Path(v.qmp_socket), {"qom-list": [{"name": "bal0", "type": "child<vhost-user-test-device-pci>"}]}
    )
    try:
        StateFile(state).save(PersistedState([v]))
        d = make_daemon()
        got = d.vms.GetVm(pb.GetVmRequest(name="vm1"))
        assert "cannot re-attach" in got.degraded and not got.balloon_connected
        assert not listening(v.balloon_socket)  # never served again while that QEMU runs
        with pytest.raises(grpc.RpcError) as info:
            d.hints.StartHinting(pb.StartHintingRequest(vm="vm1"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "degraded" in info.value.details()
        assert "device_del" not in qemu.commands
    finally:
        qemu.close()


def test_a_vm_whose_directory_is_gone_is_degraded_and_the_others_come_back(
    make_daemon: Callable[[], RunningDaemon], state: Path
) -> None:
    """Seen in the two-host tests: a VM's run directory removed while the daemon was down made the restarted
    daemon exit at start, so no VM of the host came back. One VM's fault stays with that VM."""
    gone, ok = vm(state, "gone"), vm(state, "ok")
    StateFile(state).save(PersistedState([gone, ok]))
    shutil.rmtree(state / "gone")
    d = make_daemon()
    vms = {v.spec.name: v for v in d.vms.ListVms(pb.ListVmsRequest()).vms}
    assert sorted(vms) == ["gone", "ok"]
    assert "could not be served again" in vms["gone"].degraded and not vms["ok"].degraded
    assert listening(ok.balloon_socket)
    d.vms.UnregisterVm(pb.UnregisterVmRequest(name="gone"))
    assert [v.name for v in StateFile(state).load().vms] == ["ok"]


@pytest.mark.parametrize("destination_status", ["inmigrate", "running"])
def test_an_interrupted_migration_is_rolled_back(
    make_daemon: Callable[[], RunningDaemon], state: Path, destination_status: str
) -> None:
    src_vm, dst_vm = vm(state, "src"), vm(state, "dst", balloon=False)
    replies: dict[str, Any] = {"query-cpus-fast": [], "migrate_cancel": {}, "migrate-set-capabilities": {}}
    src = FakeQMP(Path(src_vm.qmp_socket), {**replies, "query-status": {"status": "paused"}, "cont": {},
                                            "qom-list": []})  # fmt: skip
    dst = FakeQMP(Path(dst_vm.qmp_socket), {"query-status": {"status": destination_status}, "quit": {},
                                            "query-migrate": {"status": "setup"}})  # fmt: skip
    try:
        m = PersistedMigration(
            "mig-1", "src", MigrationMode.FPH, src_vm.qmp_socket, "dst", dst_vm.qmp_socket, 1.0
        )
        StateFile(state).save(PersistedState([src_vm, dst_vm], [m]))
        d = make_daemon()
        report = d.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
        assert report.migration_id == "mig-1"
        if destination_status == "inmigrate":  # not finished: the source gets its guest back
            assert report.error == "aborted: back-end restarted" and report.phase == pb.PHASE_FAILED
            assert {"migrate_cancel", "migrate-set-capabilities", "cont"} <= set(src.commands), report.cleanup
            assert "quit" in dst.commands
            assert any("source resumed" in c for c in report.cleanup), report.cleanup
        else:  # finished before the crash: the guest runs on the destination; the source stays stopped
            assert "cont" not in src.commands and "quit" not in dst.commands
            assert report.phase == pb.PHASE_SUCCEEDED and report.status == "completed" and not report.error
            assert report.cleanup[0] == COMPLETED, report.cleanup
            assert d.vms.GetVm(pb.GetVmRequest(name="src")).state == pb.VM_STATE_MIGRATED
        assert StateFile(state).load().migrations == []
        # a second restart still knows how it ended (an orchestrator may ask only then)
        d.stop()
        again = make_daemon().migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
        assert again == report
    finally:
        src.close()
        dst.close()


class RunsAfterCont(dict[str, Any]):
    """A fake QEMU's replies: "running" once it was sent ``cont``, as a loaded destination."""

    def __init__(self, fake: FakeQMP) -> None:
        super().__init__(fake.replies)
        self.fake = fake

    def __getitem__(self, cmd: str) -> Any:
        if cmd == "query-status" and "cont" in self.fake.commands:
            return {"status": "running"}
        return super().__getitem__(cmd)


@pytest.mark.parametrize("destination_status", ["inmigrate", "loaded", "running"])
def test_an_incoming_vm_of_the_dead_daemon_is_torn_down_unless_it_holds_the_guest(
    make_daemon: Callable[[], RunningDaemon], state: Path, destination_status: str
) -> None:
    """Its receiver died with the daemon. A QEMU still waiting for its source (which rolls back: the data
    connection broke) is told to quit; one that has loaded the device state (the source sent it only after
    every page landed, and stays stopped) is resumed; one that already runs the guest is left running."""
    dst_vm = dataclasses.replace(vm(state, "dst", balloon=False), state=VmState.INCOMING)
    status = {"inmigrate": "inmigrate", "loaded": "paused", "running": "running"}[destination_status]
    migration = {"inmigrate": "setup", "loaded": "completed", "running": "completed"}[destination_status]
    dst = FakeQMP(Path(dst_vm.qmp_socket), {"query-status": {"status": status}, "quit": {}, "cont": {},
                                            "query-migrate": {"status": migration}})  # fmt: skip
    dst.replies = RunsAfterCont(dst)
    try:
        StateFile(state).save(PersistedState([dst_vm]))
        d = make_daemon()
        got = d.vms.GetVm(pb.GetVmRequest(name="dst"))
        assert got.state == pb.VM_STATE_REGISTERED
        if destination_status == "inmigrate":
            assert got.incoming == "failed: aborted: back-end restarted" and "quit" in dst.commands
        elif destination_status == "loaded":
            assert "cont" in dst.commands and "quit" not in dst.commands, dst.commands
            assert got.incoming == "resumed: finished by the restarted daemon", got.incoming
        else:
            assert got.incoming.startswith("resumed") and "quit" not in dst.commands
    finally:
        dst.close()


@pytest.mark.parametrize("source_migration", ["active", "completed", "incoming-completed"])
def test_an_interrupted_migration_to_another_host_trusts_the_source_qemu(
    make_daemon: Callable[[], RunningDaemon], state: Path, source_migration: str
) -> None:
    """The destination belongs to another host's daemon (no destination QMP saved): the source's own
    migration status decides. Completed (the source ``postmigrate``): the guest went; the source stays
    stopped. Else it resumes, also when "completed" is the status of the migration that brought this VM
    here (a source that arrived by migration reports it until it migrates out; it sits paused)."""
    src_vm = vm(state, "src")
    replies: dict[str, Any] = {"query-cpus-fast": [], "migrate_cancel": {}, "migrate-set-capabilities": {}}
    handed_over = source_migration == "completed"
    replies.update({"query-status": {"status": "postmigrate" if handed_over else "paused"}, "cont": {}})
    status = "active" if source_migration == "active" else "completed"
    src = FakeQMP(Path(src_vm.qmp_socket), {**replies, "qom-list": [], "query-migrate": {"status": status}})
    try:
        m = PersistedMigration("mig-2", "src", MigrationMode.FPH, src_vm.qmp_socket, "dst", "", 1.0)
        StateFile(state).save(PersistedState([src_vm], [m]))
        d = make_daemon()
        report = d.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
        assert any("owned by its daemon" in c for c in report.cleanup), report.cleanup
        if handed_over:
            assert "cont" not in src.commands
            assert report.phase == pb.PHASE_SUCCEEDED and not report.error, report
            assert d.vms.GetVm(pb.GetVmRequest(name="src")).state == pb.VM_STATE_MIGRATED
        else:
            assert report.error == "aborted: back-end restarted"
            assert "cont" in src.commands and any("source resumed" in c for c in report.cleanup)
    finally:
        src.close()


@pytest.mark.parametrize(
    ("section", "key", "value"), [("vms", "state", "flying"), ("migrations", "mode", "teleport")]
)
def test_a_state_file_with_an_unknown_state_or_mode_is_refused(
    state: Path, section: str, key: str, value: str
) -> None:
    """A VM state or a migration mode the daemon does not know is a StateFileError naming it, at load."""
    file = StateFile(state)
    m = PersistedMigration("m-1", "src", MigrationMode.FPH, "", "dst", "", 1.0)
    file.save(PersistedState([vm(state, "src")], [m]))
    assert file.load() == PersistedState([vm(state, "src")], [m])  # states and modes round-trip
    raw = json.loads(file.path.read_text())
    raw[section][0][key] = value
    file.path.write_text(json.dumps(raw))
    with pytest.raises(StateFileError, match=value):
        file.load()
