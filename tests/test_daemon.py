"""The fph daemon through a real gRPC channel: an in-process grpc.aio server on a temporary Unix socket.

Balloon paths use the fake vhost-user front-end and Linux driver model (tests/fake_frontend.py); QEMU's
monitor is a fake QMP server (tests/fake_qmp.py). Real guests: tests/test_daemon_guest.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fph.api.v1 import fph_pb2 as pb
from fph.api.v1 import fph_pb2_grpc as pbg
from fph.balloon.spec import F_REPORTING, QueueRole
from fph.daemon.server import ConfigError, DaemonConfig
from fph.waiting import poll_until
from tests.daemon_helper import RunningDaemon
from tests.fake_frontend import (
    HINT_BLOCK,
    FakeFrontend,
    GuestRam,
    LinuxBalloonDriver,
    MiB,
    boot_and_read_done,
    guest_hints,
)
from tests.fake_qmp import FakeQMP

pytestmark = pytest.mark.timeout(120)
GiB = 1 << 30


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def make_daemon(tmp_path: Path, state: Path) -> Iterator[Callable[..., RunningDaemon]]:
    started: list[RunningDaemon] = []

    def make(**overrides: Any) -> RunningDaemon:
        cfg = DaemonConfig.load(
            None,
            {
                "socket": str(tmp_path / f"fph{len(started)}.sock"),
                "state_dir": str(state),
                "log_format": "text",
                **overrides,
            },
        )
        d = RunningDaemon(cfg)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(make_daemon: Callable[..., RunningDaemon]) -> RunningDaemon:
    return make_daemon()


def spec(state: Path, key: str = "vm1", *, balloon: bool = True, write_log: bool = False, **kw: Any) -> Any:
    d = state / key
    d.mkdir(exist_ok=True)
    fields: dict[str, Any] = {
        "name": key,
        "qmp_socket": str(d / "qmp.sock"),
        "ram_file": str(d / "ram"),
        "balloon_socket": str(d / "balloon.sock") if balloon else "",
        "memory_bytes": GiB,
        "write_log": str(d / "wlog.bin") if write_log else "",
    }
    fields.update(kw)
    return pb.VmSpec(**fields)


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        r = call()
        if hasattr(r, "__iter__") and not isinstance(r, pb.Vm):
            list(r)  # a stream: the error comes while reading it
    err = info.value
    return err.code(), err.details()


# ------------------------------------------------------------------------------------------ socket + config


def test_socket_is_0600_and_refuses_other_users(make_daemon: Callable[..., RunningDaemon]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to try as another user")
    # a directory user nobody can traverse, so that only the socket's own mode decides
    base = Path(tempfile.mkdtemp(prefix="fph-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        daemon = make_daemon(socket=str(base / "fph.sock"))
        path = daemon.cfg.socket
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert daemon.vms.ListVms(pb.ListVmsRequest()).vms == []  # the owner gets in
        probe = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\nsys.exit(0)\n"
        )
        rc = subprocess.run([sys.executable, "-c", probe, path], timeout=30).returncode
        assert rc == 13, "user nobody could connect to a 0600 root socket"
        os.chmod(path, 0o666)  # control: the same probe gets in once the mode allows it
        rc = subprocess.run([sys.executable, "-c", probe, path], timeout=30).returncode
        assert rc == 0, "the probe cannot reach the socket at all: the test would prove nothing"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_socket_mode_from_config_and_stale_socket_replaced(
    make_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    stale = tmp_path / "fph0.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    d = make_daemon(socket_mode=0o660)
    assert stat.S_IMODE(os.stat(d.cfg.socket).st_mode) == 0o660
    assert d.vms.ListVms(pb.ListVmsRequest()).vms == []


def test_config_file_flags_and_tcp_without_mutual_tls_refused(tmp_path: Path) -> None:
    f = tmp_path / "fph.toml"
    f.write_text('socket = "/run/x/fph.sock"\nstate_dir = "/run/x"\nmetrics_address = "127.0.0.1:0"\n')
    cfg = DaemonConfig.load(f, {"state_dir": str(tmp_path), "socket": None})
    assert (cfg.socket, cfg.state_dir, cfg.metrics_address) == (
        "/run/x/fph.sock",
        str(tmp_path),
        "127.0.0.1:0",
    )
    f.write_text('[tcp]\naddress = "0.0.0.0:7443"\ncert = "/c.pem"\n')
    with pytest.raises(ConfigError, match=r"mutual TLS.*--tls-key.*--tls-client-ca"):
        DaemonConfig.load(f, {})
    with pytest.raises(ConfigError, match="mutual TLS"):
        DaemonConfig.load(None, {"tcp_address": "127.0.0.1:7443"})
    f.write_text("sockett = 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        DaemonConfig.load(f, {})
    with pytest.raises(ConfigError, match="others may not"):
        DaemonConfig.load(None, {"socket_mode": 0o666})


# ----------------------------------------------------------------------------------------------------- VMs


def test_the_daemon_loads_the_migration_kernels_at_start(daemon: RunningDaemon) -> None:
    """On a thread of its own, so its first fph migration does not spend ~0.4 s on them in its setup."""
    assert daemon.srv.kernels_warm.wait(120), "the daemon did not warm the migration kernels"


def test_register_list_get_unregister(daemon: RunningDaemon, state: Path) -> None:
    vm = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, write_log=True)))
    assert vm.state == pb.VM_STATE_REGISTERED and not vm.balloon_connected
    assert Path(vm.spec.balloon_socket).exists()  # the daemon listens for QEMU's balloon chardev
    assert f"log={state / 'vm1' / 'wlog.bin'}" in vm.plugin_arg and (state / "vm1" / "wlog.bin").exists()
    daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "vm2", balloon=False)))
    assert [v.spec.name for v in daemon.vms.ListVms(pb.ListVmsRequest()).vms] == ["vm1", "vm2"]
    assert daemon.vms.GetVm(pb.GetVmRequest(name="vm2")).spec.balloon_socket == ""
    r = daemon.vms.UnregisterVm(pb.UnregisterVmRequest(name="vm1"))
    assert not r.done_sent
    assert not Path(vm.spec.balloon_socket).exists()
    assert [v.spec.name for v in daemon.vms.ListVms(pb.ListVmsRequest()).vms] == ["vm2"]
    # the name is free again
    daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state)))


def test_bad_registrations(daemon: RunningDaemon, state: Path, tmp_path: Path) -> None:
    reg = daemon.vms.RegisterVm
    outside = tmp_path / "outside"
    outside.mkdir()
    (state / "vm1").mkdir()
    (state / "vm1" / "escape").symlink_to(outside)
    (state / "vm1" / "ramdir").mkdir()
    (state / "vm1" / "plain").write_text("not a socket")
    (state / "vm1" / "open-ram").write_bytes(b"")
    os.chmod(state / "vm1" / "open-ram", 0o666)
    cases = {
        "name with a newline": pb.RegisterVmRequest(spec=spec(state, "x", name="vm1\n")),
        "a directory as the RAM file": pb.RegisterVmRequest(spec=spec(state, ram_file=f"{state}/vm1/ramdir")),
        "a file as the QMP socket": pb.RegisterVmRequest(spec=spec(state, qmp_socket=f"{state}/vm1/plain")),
        "a RAM file all may write": pb.RegisterVmRequest(spec=spec(state, ram_file=f"{state}/vm1/open-ram")),
        "missing spec": pb.RegisterVmRequest(),
        "no name": pb.RegisterVmRequest(spec=spec(state, "x", name="")),
        "bad name": pb.RegisterVmRequest(spec=spec(state, "vm1", name="VM/1")),
        "relative path": pb.RegisterVmRequest(spec=spec(state, qmp_socket="vm1/qmp.sock")),
        "dot-dot": pb.RegisterVmRequest(spec=spec(state, ram_file=f"{state}/vm1/../../outside/ram")),
        "outside": pb.RegisterVmRequest(spec=spec(state, ram_file="/etc/passwd")),
        "symlink out": pb.RegisterVmRequest(spec=spec(state, balloon_socket=f"{state}/vm1/escape/b.sock")),
        "state dir itself": pb.RegisterVmRequest(spec=spec(state, ram_file=str(state))),
        "memory too small": pb.RegisterVmRequest(spec=spec(state, memory_bytes=1 << 20)),
        "memory unaligned": pb.RegisterVmRequest(spec=spec(state, memory_bytes=GiB + 4096)),
        "memory too big": pb.RegisterVmRequest(spec=spec(state, memory_bytes=2 << 40)),
        "same path twice": pb.RegisterVmRequest(spec=spec(state, ram_file=f"{state}/vm1/qmp.sock")),
        "socket path too long": pb.RegisterVmRequest(spec=spec(state, qmp_socket=f"{state}/vm1/{'q' * 120}")),
    }
    for what, req in cases.items():
        code, msg = code_of(lambda req=req: reg(req))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, msg)
        assert msg, what
    code, msg = code_of(lambda: reg(pb.RegisterVmRequest(spec=spec(state, ram_file=f"{state}/vm1/ramdir"))))
    assert "exists and is not a regular file" in msg
    code, msg = code_of(lambda: reg(pb.RegisterVmRequest(spec=spec(state, ram_file="/etc/passwd"))))
    assert "outside the daemon's state directory" in msg
    assert not (outside / "b.sock").exists()
    assert daemon.vms.ListVms(pb.ListVmsRequest()).vms == []
    # a directory that does not exist yet
    code, msg = code_of(
        lambda: reg(pb.RegisterVmRequest(spec=spec(state, qmp_socket=f"{state}/nodir/q.sock")))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "does not exist" in msg


def test_duplicates_and_unknown_vms(daemon: RunningDaemon, state: Path) -> None:
    daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state)))
    code, msg = code_of(lambda: daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state))))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already registered" in msg
    other = spec(state, "vm2", balloon_socket=f"{state}/vm1/balloon.sock")
    code, msg = code_of(lambda: daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=other)))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "vm1" in msg
    unknown: list[Callable[[], Any]] = [
        lambda: daemon.vms.GetVm(pb.GetVmRequest(name="nope")),
        lambda: daemon.vms.UnregisterVm(pb.UnregisterVmRequest(name="nope")),
        lambda: daemon.hints.StartHinting(pb.StartHintingRequest(vm="nope")),
        lambda: daemon.hints.StopHinting(pb.StopHintingRequest(vm="nope")),
        lambda: daemon.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="nope")),
        lambda: daemon.hints.WatchHintingStatus(pb.WatchHintingStatusRequest(vm="nope")),
        lambda: daemon.hints.GetGuestStats(pb.GetGuestStatsRequest(vm="nope")),
        lambda: daemon.hints.SetBalloonTarget(pb.SetBalloonTargetRequest(vm="nope")),
        lambda: daemon.migrations.PrepareMigration(pb.PrepareMigrationRequest(vm="nope", mode=pb.MODE_FPH)),
        lambda: daemon.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="nope", mode=pb.MODE_FPH)),
        lambda: daemon.migrations.Migrate(pb.MigrateRequest(vm="nope", mode=pb.MODE_FPH)),
        lambda: daemon.migrations.CancelMigration(pb.CancelMigrationRequest(vm="nope")),
        lambda: daemon.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="nope")),
    ]
    for call in unknown:
        code, msg = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "no VM 'nope'" in msg and "vm1" in msg, (code, msg)
    code, msg = code_of(lambda: daemon.vms.GetVm(pb.GetVmRequest(name="")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------------------------- Hinting


def test_hinting_start_stop_status_stats_target(daemon: RunningDaemon, state: Path, ram: GuestRam) -> None:
    vm = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state)))
    code, msg = code_of(lambda: daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm1")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no QEMU is connected" in msg
    fe, drv = boot_and_read_done(vm.spec.balloon_socket, ram)
    try:
        got = daemon.vms.GetVm(pb.GetVmRequest(name="vm1"))
        assert got.balloon_connected and got.free_page_hint_negotiated
        st = daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm1", acknowledge_on_stop=True))
        assert st.state == "requested" and st.host_cmd_id >= 0x8000_0000 and st.acknowledge_on_stop
        code, msg = code_of(lambda: daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm1")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already on" in msg
        guest_hints(fe, drv)
        st = daemon.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="vm1"))
        assert st.state == "stop" and st.host_cmd_id >= 0x8000_0000  # the guest's STOP ended its run
        assert st.hinted_bytes == len(drv.held) * HINT_BLOCK > 0
        assert st.guest_held_bytes == st.hinted_bytes and st.blocks == len(drv.held)
        assert st.run_seconds > 0
        st = daemon.hints.StopHinting(pb.StopHintingRequest(vm="vm1"))
        assert st.state == "done" and st.guest_held_bytes == 0  # acknowledge_on_stop: DONE
        assert fe.wait_config_change()
        drv.config_changed()
        assert drv.held == []
        code, msg = code_of(lambda: daemon.hints.StopHinting(pb.StopHintingRequest(vm="vm1")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no hint run was started" in msg

        stats = daemon.hints.GetGuestStats(pb.GetGuestStatsRequest(vm="vm1", refresh=False))
        assert stats.values["free_memory"] == 100 * MiB and stats.values["total_memory"] == 256 * MiB
        assert stats.age_seconds >= 0

        t = daemon.hints.SetBalloonTarget(pb.SetBalloonTargetRequest(vm="vm1", target_bytes=64 * MiB))
        assert t.target_bytes == 64 * MiB
        assert fe.wait_config_change()
        assert int.from_bytes(fe.get_config()[0:4], "little") == 64 * MiB // 4096
        for bad in (4095, 2 * GiB):
            code, msg = code_of(
                lambda bad=bad: daemon.hints.SetBalloonTarget(
                    pb.SetBalloonTargetRequest(vm="vm1", target_bytes=bad)
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, bad

        watch = daemon.hints.WatchHintingStatus(pb.WatchHintingStatusRequest(vm="vm1", interval_ms=20))
        seen = []
        for s in watch:
            seen.append(s)
            if len(seen) == 3:
                watch.cancel()
                break
        assert [s.state for s in seen] == ["done"] * 3
        code, _ = code_of(
            lambda: daemon.hints.WatchHintingStatus(pb.WatchHintingStatusRequest(vm="vm1", interval_ms=1))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        fe.close()


def test_hinting_without_a_balloon_is_refused(daemon: RunningDaemon, state: Path) -> None:
    daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, balloon=False)))
    for call in (
        lambda: daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm1")),
        lambda: daemon.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="vm1")),
        lambda: daemon.hints.GetGuestStats(pb.GetGuestStatsRequest(vm="vm1")),
    ):
        code, msg = code_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "without balloon_socket" in msg


def test_unregister_and_shutdown_send_done_to_guests_holding_hints(
    make_daemon: Callable[..., RunningDaemon], state: Path, ram: GuestRam
) -> None:
    d = make_daemon()
    vm = d.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state)))
    fe, drv = boot_and_read_done(vm.spec.balloon_socket, ram)
    try:
        d.hints.StartHinting(pb.StartHintingRequest(vm="vm1"))  # no acknowledge_on_stop
        guest_hints(fe, drv)
        st = d.hints.StopHinting(pb.StopHintingRequest(vm="vm1"))
        assert st.state == "stop" and st.guest_held_bytes > 0
        assert drv.held  # STOP keeps the blocks with the guest
        stopper = threading.Thread(target=d.stop)
        stopper.start()
        assert fe.wait_config_change(10)  # DONE on shutdown
        drv.config_changed()
        stopper.join(30)
        assert not stopper.is_alive()
        assert drv.held == []
        assert not os.path.exists(d.cfg.socket)
    finally:
        fe.close()


def test_unregister_sends_done(daemon: RunningDaemon, state: Path, ram: GuestRam) -> None:
    vm = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state)))
    fe, drv = boot_and_read_done(vm.spec.balloon_socket, ram)
    try:
        daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm1"))
        guest_hints(fe, drv)
        result: list[Any] = []
        t = threading.Thread(
            target=lambda: result.append(daemon.vms.UnregisterVm(pb.UnregisterVmRequest(name="vm1")))
        )
        t.start()
        assert fe.wait_config_change(10)
        drv.config_changed()  # the guest reads DONE; only then does the daemon drop the connection
        t.join(10)
        assert result and result[0].done_sent
        assert drv.held == []
        assert fe.is_closed()
    finally:
        fe.close()


# ----------------------------------------------------------------------------------------------- Migration


@pytest.fixture
def qemus(state: Path) -> Iterator[dict[str, FakeQMP]]:
    (state / "src").mkdir()
    (state / "dst").mkdir()
    memdev = [
        {
            "id": "mem",
            "size": GiB,
            "share": True,
            "merge": True,
            "dump": True,
            "prealloc": False,
            "policy": "default",
            "host-nodes": [],
        }
    ]
    q = {
        "src": FakeQMP(
            state / "src" / "qmp.sock",
            {
                "query-memdev": memdev,
                "query-status": {"status": "running"},
                "migrate-set-capabilities": RuntimeError("capability refused"),
            },
        ),
        "dst": FakeQMP(
            state / "dst" / "qmp.sock",
            {
                "query-memdev": memdev,
                "query-status": {"status": "inmigrate"},
                "migrate-set-capabilities": {},
                "migrate-incoming": {},
                "quit": {},
                "query-migrate": {"socket-address": [{"type": "inet", "host": "127.0.0.1", "port": "4444"}]},
            },
        ),
    }
    yield q
    for f in q.values():
        f.close()


def register_pair(d: RunningDaemon, state: Path, *, write_log: bool = False) -> Any:
    for side in ("src", "dst"):
        with open(state / side / "ram", "wb") as f:
            f.truncate(GiB)
    d.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "src", balloon=False, write_log=write_log)))
    d.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "dst", balloon=False)))
    return d.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst", mode=pb.MODE_FPH))


def test_accept_prepare_and_a_failing_migration_is_aborted(
    make_daemon: Callable[..., RunningDaemon], daemon: RunningDaemon, state: Path, qemus: dict[str, FakeQMP]
) -> None:
    target = register_pair(daemon, state)
    assert target.vm == "dst" and target.migration_uri == "tcp:127.0.0.1:4444"
    assert target.data_address.startswith("127.0.0.1:") and len(target.credential) == 64 and not target.tls
    assert "migrate-incoming" in qemus["dst"].commands
    assert daemon.vms.GetVm(pb.GetVmRequest(name="dst")).state == pb.VM_STATE_INCOMING
    code, msg = code_of(
        lambda: daemon.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst", mode=pb.MODE_FPH))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # already reserved
    code, msg = code_of(
        lambda: daemon.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="src", mode=pb.MODE_FPH))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'running'" in msg

    prep = daemon.migrations.PrepareMigration(
        pb.PrepareMigrationRequest(vm="src", mode=pb.MODE_FPH, destination=target)
    )
    checks = {c.name: c for c in prep.checks}
    assert not prep.ready
    assert checks["qmp"].ok and checks["destination"].ok
    assert not checks["write_log"].ok and "needs one" in checks["write_log"].detail
    assert not checks["free_page_hint"].ok
    assert prep.memory_total == GiB and prep.estimated_bytes == GiB
    code, msg = code_of(
        lambda: daemon.migrations.PrepareMigration(
            pb.PrepareMigrationRequest(vm="src", mode=pb.MODE_NATIVE, destination=target)
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prepared for MODE_FPH" in msg, msg
    target = pb.IncomingTarget(**{**_fields(target), "mode": pb.MODE_NATIVE})  # as if prepared for native
    prep = daemon.migrations.PrepareMigration(
        pb.PrepareMigrationRequest(vm="src", mode=pb.MODE_NATIVE, destination=target)
    )
    assert prep.ready, prep.checks

    # fph mode without a write log: refused before anything starts
    fph_target = pb.IncomingTarget(**{**_fields(target), "mode": pb.MODE_FPH})
    code, msg = code_of(
        lambda: daemon.migrations.Migrate(
            pb.MigrateRequest(vm="src", mode=pb.MODE_FPH, destination=fph_target)
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "write_log" in msg
    # native: the source QEMU refuses a capability -> the migration fails, the stream ends ABORTED
    events: list[Any] = []
    with pytest.raises(grpc.RpcError) as info:
        for ev in daemon.migrations.Migrate(
            pb.MigrateRequest(vm="src", mode=pb.MODE_NATIVE, destination=target)
        ):
            events.append(ev)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert "capability refused" in info.value.details(), info.value.details()
    assert events and events[-1].phase == pb.PHASE_FAILED and events[-1].status == "failed"
    assert events[0].migration_id.startswith("mig-")
    rep = daemon.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
    assert rep.phase == pb.PHASE_FAILED and rep.status == "failed" and "capability refused" in rep.error
    assert rep.mode == pb.MODE_NATIVE and rep.destination_vm == "dst"
    again = daemon.migrations.GetMigrationReport(
        pb.GetMigrationReportRequest(vm="src", migration_id=rep.migration_id)
    )
    assert again.migration_id == rep.migration_id
    code, _ = code_of(
        lambda: daemon.migrations.GetMigrationReport(
            pb.GetMigrationReportRequest(vm="src", migration_id="mig-x")
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    # the source is usable again after the failure
    assert daemon.vms.GetVm(pb.GetVmRequest(name="src")).state == pb.VM_STATE_REGISTERED
    # a second failure: the first report stays readable by its id, and both survive a restart
    with pytest.raises(grpc.RpcError):
        list(daemon.migrations.Migrate(pb.MigrateRequest(vm="src", mode=pb.MODE_NATIVE, destination=target)))
    last = daemon.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
    assert last.migration_id != rep.migration_id
    daemon.stop()
    after = make_daemon()
    assert after.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src")) == last
    first = after.migrations.GetMigrationReport(
        pb.GetMigrationReportRequest(vm="src", migration_id=rep.migration_id)
    )
    assert first.error == rep.error and first.end_time == rep.end_time
    assert after.vms.GetVm(pb.GetVmRequest(name="src")).migration_id == last.migration_id
    # they go with their VM
    after.vms.UnregisterVm(pb.UnregisterVmRequest(name="src"))
    after.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "src", balloon=False)))
    code, _ = code_of(lambda: after.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_an_incoming_stream_that_fails_tears_the_destination_down(
    daemon: RunningDaemon, state: Path, qemus: dict[str, FakeQMP]
) -> None:
    """The destination daemon owns its side: a stranger is refused and changes nothing; the source's
    ABORT fails the incoming migration, its QEMU is told to quit and GetVm says why."""
    from fph.ram_layout import RamLayout
    from fph.transfer.ram_file import RamFile
    from fph.transfer.security import DataPlaneSecurity
    from fph.transfer.sender import RamSender

    target = register_pair(daemon, state)
    host, _, port = target.data_address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as stranger:
        stranger.sendall(b"GET / HTTP/1.0\r\n\r\n" * 4)
        with contextlib.suppress(ConnectionResetError):
            assert stranger.recv(1) == b""  # refused
    assert daemon.vms.GetVm(pb.GetVmRequest(name="dst")).incoming == "prepared"
    ram = RamFile(state / "src" / "ram", RamLayout.pc(GiB), writable=False)
    try:
        sender = RamSender((host, int(port)), ram, security=DataPlaneSecurity(target.credential))
        sender.connect()
        sender.abort("the source gave up")
    finally:
        ram.close()

    def ended() -> str:
        return str(daemon.vms.GetVm(pb.GetVmRequest(name="dst")).incoming)

    outcome = poll_until(ended, 10, 0.05, until=lambda s: s.startswith("failed"))
    assert outcome.startswith("failed") and "the source gave up" in outcome, outcome
    assert "quit" in qemus["dst"].commands
    assert daemon.vms.GetVm(pb.GetVmRequest(name="dst")).state == pb.VM_STATE_REGISTERED


def test_migrate_bad_inputs(daemon: RunningDaemon, state: Path, qemus: dict[str, FakeQMP]) -> None:
    target = pb.IncomingTarget(**{**_fields(register_pair(daemon, state)), "mode": pb.MODE_NATIVE})
    base = {"vm": "src", "mode": pb.MODE_NATIVE, "destination": target}

    def migrate(**kw: Any) -> tuple[grpc.StatusCode, str]:
        return code_of(lambda: daemon.migrations.Migrate(pb.MigrateRequest(**{**base, **kw})))

    for kw in (
        {"mode": pb.MODE_UNSPECIFIED},
        {"bandwidth_bytes_per_second": 1000},
        {"bandwidth_bytes_per_second": 200 << 30},
        {"downtime_limit_ms": 60001},
        {"max_rounds": 1001},
        {"progress_interval_ms": 10},
        {"out_dirty_policy": 7},
        {"out_dirty_policy": pb.OUT_DIRTY_POLICY_FAIL},  # QEMU's own migration has no such policy
        {"first_hint_run": 9},
        {"first_hint_run": pb.FIRST_HINT_RUN_WAIT},  # QEMU's own migration always overlaps
        {"time_budget_s": 86401},
        {"destination": None},
        {"destination": pb.IncomingTarget(**{**_fields(target), "migration_uri": "tcp:host.example:5"})},
        {"destination": pb.IncomingTarget(**{**_fields(target), "migration_uri": "tcp:1.2.3.4:0"})},
        {"destination": pb.IncomingTarget(**{**_fields(target), "migration_uri": "unix:/tmp/m.sock"})},
        {"destination": pb.IncomingTarget(**{**_fields(target), "vm": "Bad Name"})},
        {
            "mode": pb.MODE_FPH,
            "destination": pb.IncomingTarget(**{**_fields(target), "credential": "", "mode": pb.MODE_FPH}),
        },
        {
            "mode": pb.MODE_FPH,
            "destination": pb.IncomingTarget(
                **{**_fields(target), "data_address": "x:1", "mode": pb.MODE_FPH}
            ),
        },
        {
            "mode": pb.MODE_FPH,
            "destination": pb.IncomingTarget(**{**_fields(target), "data_address": "", "mode": pb.MODE_FPH}),
        },
    ):
        code, msg = migrate(**kw)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (kw, code, msg)
        for field in ("out_dirty_policy", "first_hint_run"):
            if field in kw:
                assert field in msg, msg
    # a destination that wants TLS from a daemon without TLS files
    code, msg = migrate(destination=pb.IncomingTarget(**{**_fields(target), "tls": True}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "tls_cert" in msg, msg
    code, msg = code_of(lambda: daemon.migrations.CancelMigration(pb.CancelMigrationRequest(vm="src")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "nothing to cancel" in msg
    code, msg = code_of(lambda: daemon.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src")))
    assert code == grpc.StatusCode.NOT_FOUND
    (state / "gone").mkdir()
    # a source whose QEMU does not answer
    qemus["src"].close()
    code, msg = migrate()
    assert code == grpc.StatusCode.UNAVAILABLE and "does not answer" in msg, msg
    # a registered VM whose QEMU is not a migration target
    daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "gone", balloon=False)))
    code, msg = code_of(
        lambda: daemon.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="gone", mode=pb.MODE_FPH))
    )
    assert code == grpc.StatusCode.UNAVAILABLE


def _fields(msg: Any) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


# ------------------------------------------------------------------------------------------------- Metrics


def test_metrics_endpoint(make_daemon: Callable[..., RunningDaemon], state: Path, ram: GuestRam) -> None:
    d = make_daemon(metrics_address="127.0.0.1:0")
    assert d.srv.metrics_address is not None
    host, port = d.srv.metrics_address
    vm = d.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state)))
    fe, drv = boot_and_read_done(vm.spec.balloon_socket, ram)
    try:
        d.hints.StartHinting(pb.StartHintingRequest(vm="vm1"))
        guest_hints(fe, drv)
        want = len(drv.held) * HINT_BLOCK

        def series(text: str) -> dict[str, float]:
            return {m[1]: float(m[2]) for m in re.finditer(r'^(\S+)\{vm="vm1"\} (\S+)$', text, re.M)}

        url = f"http://{host}:{port}/metrics"
        text = poll_until(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode(),
            5,
            0.05,
            until=lambda t: series(t).get("fph_hint_run_hinted_bytes") == want,
        )
        values = series(text)
        assert values.get("fph_hint_run_hinted_bytes") == want > 0, text
        assert values.get("fph_guest_held_bytes") == want
        assert values.get("fph_hint_runs_started_total") == 1.0
        assert values.get("fph_hint_dropped") == 0.0
        assert "fph_migration_downtime_seconds" in text and "fph_migrations_total" in text
    finally:
        fe.close()


# --------------------------------------------------------------------------------------------- TCP + mTLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
"""``openssl req`` arguments for a new unencrypted P-256 key."""


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    _openssl(
        "req",
        "-x509",
        *NEW_EC_KEY,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fph-test-ca",
        cwd=d,
    )
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:orchestrator")):
        _openssl(
            "req",
            *NEW_EC_KEY,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_tcp_needs_a_client_certificate(make_daemon: Callable[..., RunningDaemon], tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = make_daemon(
        tcp_address=f"127.0.0.1:{port}",
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem"),
    )
    ca = (pki / "ca.pem").read_bytes()
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=(pki / "client.key").read_bytes(),
        certificate_chain=(pki / "client.pem").read_bytes(),
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", with_cert) as ch:
        assert pbg.VmServiceStub(ch).ListVms(pb.ListVmsRequest(), timeout=10).vms == []
    without = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(f"127.0.0.1:{port}", without) as ch, pytest.raises(grpc.RpcError) as info:
        pbg.VmServiceStub(ch).ListVms(pb.ListVmsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError):  # plaintext: refused
        pbg.VmServiceStub(ch).ListVms(pb.ListVmsRequest(), timeout=10)
    assert d.vms.ListVms(pb.ListVmsRequest()).vms == []  # the Unix socket still serves


@contextlib.contextmanager
def two_booted_vms(
    daemon: RunningDaemon, state: Path, ram: GuestRam
) -> Iterator[tuple[tuple[FakeFrontend, LinuxBalloonDriver], tuple[FakeFrontend, LinuxBalloonDriver]]]:
    """vm1 and vm2 registered (a balloon worker each), a front-end and driver booted on each."""
    v1 = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "vm1")))
    v2 = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "vm2")))
    with GuestRam(64 * MiB, gpa=1 << 32) as ram2:
        one = boot_and_read_done(v1.spec.balloon_socket, ram)
        two = boot_and_read_done(v2.spec.balloon_socket, ram2)
        try:
            yield one, two
        finally:
            one[0].close()
            two[0].close()


def assert_vm2_hints_on(daemon: RunningDaemon, fe2: FakeFrontend, drv2: LinuxBalloonDriver) -> None:
    st = daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm2"))
    assert st.state == "requested"
    guest_hints(fe2, drv2)
    st = daemon.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="vm2"))
    assert st.hinted_bytes == len(drv2.held) * HINT_BLOCK > 0
    assert not daemon.vms.GetVm(pb.GetVmRequest(name="vm2")).degraded


def test_a_killed_worker_degrades_its_vm_and_no_other(
    daemon: RunningDaemon, state: Path, ram: GuestRam
) -> None:
    """Each VM's balloon is a worker process of its own: kill -9 of one leaves the daemon and the other VM
    hinting; the VM whose worker died is reported degraded with the reason and fph asks nothing of its
    balloon again."""
    with two_booted_vms(daemon, state, ram) as (_, (fe2, drv2)):
        ctl1 = daemon.srv.daemon.registry.vms["vm1"].control
        ctl2 = daemon.srv.daemon.registry.vms["vm2"].control
        assert ctl1 is not None and ctl2 is not None and ctl1.pid != ctl2.pid != os.getpid()
        assert daemon.vms.GetVm(pb.GetVmRequest(name="vm1")).balloon_worker_pid == ctl1.pid
        os.kill(ctl1.pid, signal.SIGKILL)
        assert poll_until(lambda: bool(ctl1.lost), 5)
        got = daemon.vms.GetVm(pb.GetVmRequest(name="vm1"))
        assert got.balloon_worker_pid == 0
        assert "balloon worker" in got.degraded and "is gone" in got.degraded and not got.balloon_connected
        code, msg = code_of(lambda: daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm1")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "degraded" in msg
        assert_vm2_hints_on(daemon, fe2, drv2)


def test_a_guest_memory_file_truncated_under_one_worker_fails_that_vm_only(
    daemon: RunningDaemon, state: Path, ram: GuestRam
) -> None:
    """A front-end shrinks its memory file under fph (no seals on a memory-backend-file): the next ring
    access faults (SIGBUS) in that VM's worker, which dies alone; its VM is degraded and says why, and the
    other VM hints on."""
    with two_booted_vms(daemon, state, ram) as ((fe1, drv1), (fe2, drv2)):
        os.ftruncate(ram.fd, 0)  # from here the test must not touch vm1's memory either
        fe1.kick(drv1.roles[QueueRole.STATS])
        assert poll_until(lambda: "is gone" in daemon.vms.GetVm(pb.GetVmRequest(name="vm1")).degraded, 10)
        got = daemon.vms.GetVm(pb.GetVmRequest(name="vm1"))
        assert "killed by SIGBUS: a guest memory file shrank under it" in got.degraded, got.degraded
        assert_vm2_hints_on(daemon, fe2, drv2)


def test_a_thousand_connects_on_one_vm_socket_leave_the_others_hinting(
    daemon: RunningDaemon, state: Path, ram: GuestRam
) -> None:
    """A peer connects to vm1's balloon socket and hangs up 1,000 times (half of them after a garbage
    message) while vm2 runs hint runs through the daemon: every vm2 run completes, vm1's worker keeps its
    fd count and serves a real front-end afterwards."""
    v1 = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "vm1")))
    v2 = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "vm2")))
    ctl1 = daemon.srv.daemon.registry.vms["vm1"].control
    assert ctl1 is not None
    fds_before = len(os.listdir(f"/proc/{ctl1.pid}/fd"))
    stop = threading.Event()
    done = [0]

    def hostile() -> None:
        for i in range(1000):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(v1.spec.balloon_socket)
                if i % 2:
                    with contextlib.suppress(OSError):  # the worker may have hung up first
                        s.sendall(b"\xff" * 64)
            done[0] += 1
        stop.set()

    with GuestRam(64 * MiB, gpa=1 << 32) as ram2:
        fe2, drv2 = boot_and_read_done(v2.spec.balloon_socket, ram2)
        try:
            peer = threading.Thread(target=hostile, daemon=True)
            peer.start()
            runs = 0
            while not stop.is_set() or runs < 3:
                daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm2", acknowledge_on_stop=True))
                guest_hints(fe2, drv2)
                st = daemon.hints.StopHinting(pb.StopHintingRequest(vm="vm2"))
                assert st.state == "done" and st.hinted_bytes == len(drv2.held) * HINT_BLOCK > 0
                assert fe2.wait_config_change()
                drv2.config_changed()
                runs += 1
            peer.join(30)
            assert done[0] == 1000
        finally:
            fe2.close()
    assert poll_until(lambda: len(os.listdir(f"/proc/{ctl1.pid}/fd")) == fds_before, 5), (
        fds_before,
        len(os.listdir(f"/proc/{ctl1.pid}/fd")),
    )
    assert not ctl1.lost and not daemon.vms.GetVm(pb.GetVmRequest(name="vm1")).degraded
    fe1, drv1 = boot_and_read_done(v1.spec.balloon_socket, ram)
    try:
        daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm1"))
        guest_hints(fe1, drv1)
        st = daemon.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="vm1"))
        assert st.hinted_bytes == len(drv1.held) * HINT_BLOCK > 0
    finally:
        fe1.close()


def test_status_streams_share_device_queries(daemon: RunningDaemon, state: Path, ram: GuestRam) -> None:
    """Many watchers of one VM cost a few device round trips, not one per message (the load check)."""
    vm = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state)))
    fe, _drv = boot_and_read_done(vm.spec.balloon_socket, ram)
    try:
        ctl = daemon.srv.daemon.registry.vms["vm1"].control  # the worker's handle: each call a round trip
        assert ctl is not None
        real = ctl.status_async
        calls = [0]

        async def counting() -> Any:
            calls[0] += 1
            return await real()

        ctl.status_async = counting  # type: ignore[method-assign]
        streams = [
            daemon.hints.WatchHintingStatus(pb.WatchHintingStatusRequest(vm="vm1", interval_ms=20))
            for _ in range(20)
        ]
        got = [0] * len(streams)

        def read(i: int) -> None:
            with contextlib.suppress(grpc.RpcError):  # CANCELLED at the end
                for _ in streams[i]:
                    got[i] += 1

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(streams))]
        for t in readers:
            t.start()
        time.sleep(1.0)
        for s in streams:
            s.cancel()
        for t in readers:
            t.join(5)
        messages = sum(got)
        assert min(got) >= 10, got  # every stream flows (~50 per second each)
        assert calls[0] * 4 < messages, (calls[0], messages)  # without sharing: one query per message
    finally:
        fe.close()


def test_standard_health_and_reflection_services(daemon: RunningDaemon) -> None:
    """What orchestrators and generic clients call, through their own stubs (grpcio-health-checking,
    grpcio-reflection), not fph's: grpc.health.v1 Check for the server and each service, and reflection's
    service list and a file descriptor by symbol."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(daemon.channel)
    for service in ("", "fph.api.v1.VmService", "fph.api.v1.HintingService", "fph.api.v1.MigrationService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    code, _msg = code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service")))
    assert code == grpc.StatusCode.NOT_FOUND
    stub = reflection_pb2_grpc.ServerReflectionStub(daemon.channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    names = {s.name for r in stub.ServerReflectionInfo(iter([req])) for s in r.list_services_response.service}
    assert {"fph.api.v1.VmService", "fph.api.v1.MigrationService", "grpc.health.v1.Health"} <= names
    req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="fph.api.v1.VmService")
    (reply,) = list(stub.ServerReflectionInfo(iter([req])))
    assert reply.file_descriptor_response.file_descriptor_proto, reply


def test_upgrade_balloon_worker_replaces_one_vms_worker_and_keeps_its_connection(
    daemon: RunningDaemon, state: Path, ram: GuestRam
) -> None:
    """UpgradeBalloonWorker: vm1's worker is replaced by a new process that took its connection over (the
    guest's hint run goes on through it); vm2's worker is not touched; a VM with no balloon is refused."""
    with two_booted_vms(daemon, state, ram) as ((fe1, drv1), (fe2, drv2)):
        before = {v.spec.name: v.balloon_worker_pid for v in daemon.vms.ListVms(pb.ListVmsRequest()).vms}
        daemon.hints.StartHinting(pb.StartHintingRequest(vm="vm1"))
        got = daemon.vms.UpgradeBalloonWorker(pb.UpgradeBalloonWorkerRequest(name="vm1"))
        assert got.previous_pid == before["vm1"] and got.vm.balloon_worker_pid not in (0, before["vm1"])
        assert got.vm.balloon_connected and not got.vm.degraded and got.seconds > 0
        assert daemon.vms.GetVm(pb.GetVmRequest(name="vm2")).balloon_worker_pid == before["vm2"]
        guest_hints(fe1, drv1)  # the run requested through the old worker, hinted through the new one
        st = daemon.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="vm1"))
        assert st.hinted_bytes == len(drv1.held) * HINT_BLOCK > 0
        assert_vm2_hints_on(daemon, fe2, drv2)
    daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "plain", balloon=False)))
    code, msg = code_of(lambda: daemon.vms.UpgradeBalloonWorker(pb.UpgradeBalloonWorkerRequest(name="plain")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "without balloon_socket" in msg


def test_free_page_reporting_is_offered_by_the_vms_worker_and_needs_a_balloon(
    daemon: RunningDaemon, state: Path, ram: GuestRam
) -> None:
    got = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "vm1", free_page_reporting=True)))
    assert got.spec.free_page_reporting
    fe = FakeFrontend(got.spec.balloon_socket, ram)
    try:
        fe.realize()
        assert fe.offered_features & F_REPORTING  # the worker runs with --reporting
    finally:
        fe.close()
    plain = daemon.vms.RegisterVm(pb.RegisterVmRequest(spec=spec(state, "vm2")))
    fe = FakeFrontend(plain.spec.balloon_socket, ram)
    try:
        fe.realize()
        assert not fe.offered_features & F_REPORTING
    finally:
        fe.close()
    code, msg = code_of(
        lambda: daemon.vms.RegisterVm(
            pb.RegisterVmRequest(spec=spec(state, "vm3", balloon=False, free_page_reporting=True))
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs balloon_socket" in msg
