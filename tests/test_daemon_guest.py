"""The daemon with real guests: everything through the gRPC API of an in-process daemon.

One source boot. The daemon serves the source's balloon and owns its write log; the guest writes 700 MiB
and frees it, keeps a checksummed region alive (``hold``). Then, through the API only: register, hint
start/stop/status, guest stats, prepare, accept incoming, an fph migration cancelled through the API (the
source keeps running, the stream ends ABORTED), an fph migration src -> dst with streamed progress and the
final report; then the same guest goes on: mode none is refused while fph's balloon is plugged,
then (balloon unplugged) a mode-none migration dst -> dst2, and (QEMU's virtio-balloon hot-plugged) a
native migration dst2 -> dst3. Every destination passes ``check_destination``.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fph.api.v1 import fph_pb2 as pb
from fph.daemon.server import DaemonConfig
from fph.waiting import poll_until
from fph_lab.check import check_destination
from fph_lab.provision import Lab
from fph_lab.vm import VM, VMConfig
from tests.daemon_helper import RunningDaemon

pytestmark = [pytest.mark.guest, pytest.mark.timeout(600)]
MiB = 1 << 20
GiB = 1 << 30
MEM_MIB = 1024
# QEMU's virtio-balloon for the native hop, at the slot fph's balloon had (the source's PCI layout must match)
NATIVE_BALLOON = (
    "-object",
    "iothread,id=io1",
    "-device",
    "virtio-balloon-pci,id=balloon0,iothread=io1,free-page-hint=on,bus=pci.0,addr=0x5",
)


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # RAM files: not on disk
    d = Path(tempfile.mkdtemp(prefix="fph-daemon-", dir=base))
    monkeypatch.setenv("FPH_RUN_DIR", str(d / "vms"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(state: Path) -> Iterator[RunningDaemon]:
    cfg = DaemonConfig.load(
        None,
        {
            "socket": str(state / "fph.sock"),
            "state_dir": str(state),
            "log_format": "text",
            "metrics_address": "127.0.0.1:0",
        },
    )
    d = RunningDaemon(cfg)
    yield d
    d.stop()


@pytest.fixture
def vms() -> Iterator[list[VM]]:
    started: list[VM] = []
    yield started
    for vm in started:
        vm.stop()


def register(d: RunningDaemon, vm: VM, *, balloon: bool, write_log: bool = False) -> Any:
    s = pb.VmSpec(
        name=vm.name,
        qmp_socket=str(vm.qmp_socket),
        ram_file=str(vm.run_dir / "ram"),
        balloon_socket=str(vm.run_dir / "balloon.sock") if balloon else "",
        memory_bytes=MEM_MIB * MiB,
        write_log=str(vm.run_dir / "wlog.bin") if write_log else "",
    )
    return d.vms.RegisterVm(pb.RegisterVmRequest(spec=s))


def destination(d: RunningDaemon, lab: Lab, vms: list[VM], name: str, extra: tuple[str, ...] = ()) -> VM:
    """A destination QEMU (-incoming defer, RAM file, no fph balloon) registered with the daemon."""
    cfg = VMConfig(mem_mib=MEM_MIB, balloon="none", ram_backend="file", incoming=True, extra_args=extra)
    vm = VM(lab, cfg, name=name)
    vms.append(vm)
    register(d, vm, balloon=True)  # its balloon socket: where fph re-plugs a balloon after switchover
    vm.start()
    return vm


def fph_source(d: RunningDaemon, lab: Lab, vms: list[VM]) -> VM:
    """The source VM "src" registered for fph mode (its balloon behind the daemon's worker, RAM in a file,
    the write-log plugin the daemon names), started."""
    src = VM(lab, VMConfig(mem_mib=MEM_MIB), name="src")
    vms.append(src)
    vm = register(d, src, balloon=True, write_log=True)
    assert vm.plugin_arg
    src.config = VMConfig(
        mem_mib=MEM_MIB,
        balloon="fph",
        vhost_user_socket=vm.spec.balloon_socket,
        ram_backend="file",
        plugins=(vm.plugin_arg,),
    )
    src.start()
    return src


def source_runs_on(d: RunningDaemon, src: VM) -> None:
    """After a migration that failed or was cancelled: the source QEMU runs, the daemon has it registered
    again, and its guest's heartbeat goes on with the same checksummed region."""
    assert src.status() == "running"
    assert d.vms.GetVm(pb.GetVmRequest(name=src.name)).state == pb.VM_STATE_REGISTERED
    hb0 = src.guest.last_heartbeat()
    time.sleep(2.5)
    hb1 = src.guest.last_heartbeat()
    assert hb0 is not None and hb1 is not None and hb1.seq > hb0.seq and hb1.ok, (hb0, hb1)


def migrate(d: RunningDaemon, src: str, mode: int, target: Any, **kw: Any) -> tuple[list[Any], Any, float]:
    t0 = time.monotonic()
    events = list(
        d.migrations.Migrate(
            pb.MigrateRequest(vm=src, mode=mode, destination=target, progress_interval_ms=200, **kw)
        )
    )
    wall = time.monotonic() - t0
    report = d.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm=src))
    return events, report, wall


def resumed(d: RunningDaemon, name: str, timeout: float = 60.0) -> str:
    """Wait for the destination daemon's incoming outcome, as an orchestrator does (README): the source's
    SUCCEEDED in none/native mode means QEMU sent everything, not that the destination runs yet."""
    got = poll_until(
        lambda: d.vms.GetVm(pb.GetVmRequest(name=name)).incoming,
        timeout,
        0.1,
        until=lambda s: s.startswith(("resumed", "failed")),
    )
    assert got.startswith("resumed"), got
    return got


def test_daemon_drives_hinting_and_fph_none_native_migrations(
    lab: Lab, state: Path, daemon: RunningDaemon, vms: list[VM]
) -> None:
    d = daemon
    t_start = time.monotonic()
    src = fph_source(d, lab, vms)
    dst = destination(d, lab, vms, "dst")
    dstc = destination(d, lab, vms, "dstc")  # the target of the cancelled migration
    src.wait_ready(180)
    boot_s = time.monotonic() - t_start
    src.guest.fill(700)
    src.guest.start_hold(32, 1)

    # ---- hinting through the API
    got = d.vms.GetVm(pb.GetVmRequest(name="src"))
    assert got.balloon_connected and got.free_page_hint_negotiated, got
    st = d.hints.StartHinting(pb.StartHintingRequest(vm="src", acknowledge_on_stop=True))
    assert st.state in ("requested", "start")
    st = poll_until(  # until the guest reported every free block and sent its STOP
        lambda: d.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="src")), 60, 0.2, until=stopped
    )
    assert st.state == "stop" and st.hinted_bytes > 500 * MiB, st
    assert st.guest_held_bytes == st.hinted_bytes and st.guest_cmd_id == 0 and st.run_seconds > 0
    free_held = src.guest.meminfo().memfree_kb
    st = d.hints.StopHinting(pb.StopHintingRequest(vm="src"))
    assert st.state == "done" and st.guest_held_bytes == 0  # acknowledge_on_stop: DONE
    poll_until(lambda: src.guest.meminfo().memfree_kb >= free_held + 400 * 1024, 30, 0.5)
    assert src.guest.meminfo().memfree_kb >= free_held + 400 * 1024, "the guest did not get its blocks back"
    d.hints.GetGuestStats(pb.GetGuestStatsRequest(vm="src", refresh=True))
    # read what the refresh brings; if free_memory is not there yet, refresh again
    asks = itertools.chain(
        [pb.GetGuestStatsRequest(vm="src")], itertools.repeat(pb.GetGuestStatsRequest(vm="src", refresh=True))
    )
    stats = poll_until(
        lambda: d.hints.GetGuestStats(next(asks)), 20, 0.5, until=lambda s: "free_memory" in s.values
    )
    assert 400 * MiB < stats.values["free_memory"] < GiB, stats

    # ---- an fph migration cancelled after its first progress figures: ABORTED, rolled back
    target_c = d.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dstc", mode=pb.MODE_FPH))
    stream = d.migrations.Migrate(pb.MigrateRequest(vm="src", mode=pb.MODE_FPH, destination=target_c))
    seen: list[Any] = []
    with pytest.raises(grpc.RpcError) as info:
        for ev in stream:
            seen.append(ev)
            if ev.phase == pb.PHASE_RUNNING and len(seen) == 2:
                assert (
                    d.migrations.CancelMigration(pb.CancelMigrationRequest(vm="src")).migration_id
                    == ev.migration_id
                )
    assert info.value.code() == grpc.StatusCode.ABORTED and "cancelled" in info.value.details(), info.value
    assert seen[-1].phase == pb.PHASE_FAILED and seen[-1].status == "cancelled"
    rep = d.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
    assert rep.status == "cancelled" and rep.cleanup and all("FAILED" not in c for c in rep.cleanup), (
        rep.cleanup
    )
    source_runs_on(d, src)
    # the rollback told the destination QEMU to quit
    assert poll_until(lambda: not dstc.alive(), 10, 0.1), (
        "the cancelled migration's destination QEMU is still running"
    )
    d.vms.UnregisterVm(pb.UnregisterVmRequest(name="dstc"))

    # ---- fph migration src -> dst
    target = d.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst", mode=pb.MODE_FPH))
    prep = d.migrations.PrepareMigration(
        pb.PrepareMigrationRequest(vm="src", mode=pb.MODE_FPH, destination=target)
    )
    assert prep.ready, prep.checks
    assert {c.name for c in prep.checks} >= {
        "qmp",
        "shared_ram",
        "free_page_hint",
        "write_log",
        "destination",
    }
    assert prep.estimated_bytes < 600 * MiB, prep
    # capped at a 1 Gbit/s link's rate, round 0 waits while the guest hints faster than that (auto); with
    # no cap it overlaps the hint run, and how much is hinted before round 0 ends races the loopback
    events, rep, fph_wall = migrate(d, "src", pb.MODE_FPH, target, bandwidth_bytes_per_second=125_000_000)
    assert events[-1].phase == pb.PHASE_SUCCEEDED and events[-1].status == "completed", events[-1]
    running = [e for e in events if e.phase == pb.PHASE_RUNNING]
    assert any(e.memory_iteration >= 1 and e.memory_processed > 0 for e in running), running[-3:]
    assert {e.fph_phase for e in running} >= {"rounds"}
    assert rep.status == "completed" and rep.phase == pb.PHASE_SUCCEEDED and not rep.error
    assert rep.fph["hinted_bytes"] > 400 * MiB, (dict(rep.fph), dict(rep.job_stats))
    assert rep.job_stats["memory_processed"] < 600 * MiB, dict(rep.job_stats)
    assert rep.job_stats["memory_iteration"] == len(rep.rounds) >= 2
    assert rep.job_stats["downtime"] > 0 and rep.end_time > rep.start_time
    hb = src.guest.last_heartbeat()
    assert hb is not None
    resumed(d, "dst")
    check = check_destination(dst, hb, src=src)
    assert check.ok, check.problems
    assert d.vms.GetVm(pb.GetVmRequest(name="src")).state == pb.VM_STATE_MIGRATED
    metrics = scrape(d)
    assert metrics['fph_migration_rounds{vm="src"}'] == rep.job_stats["memory_iteration"]
    assert metrics['fph_migration_bytes_total{mode="fph",vm="src"}'] == rep.job_stats["memory_processed"]
    assert metrics['fph_migration_hinted_bytes_total{vm="src"}'] == rep.fph["hinted_bytes"]
    assert metrics['fph_migration_downtime_seconds{vm="src"}'] == rep.job_stats["downtime"] / 1e3
    assert metrics['fph_migrations_total{mode="fph",result="succeeded",vm="src"}'] == 1
    assert metrics['fph_migrations_total{mode="fph",result="cancelled",vm="src"}'] == 1
    code = _code(lambda: d.hints.StartHinting(pb.StartHintingRequest(vm="src")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # the guest left

    # ---- the fph balloon was re-plugged on dst: hinting through the API works there
    assert poll_until(lambda: d.vms.GetVm(pb.GetVmRequest(name="dst")).free_page_hint_negotiated, 60, 0.5), (
        "the destination's re-plugged balloon never negotiated"
    )
    d.hints.StartHinting(pb.StartHintingRequest(vm="dst", acknowledge_on_stop=True))
    st = poll_until(
        lambda: d.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="dst")), 60, 0.2, until=stopped
    )
    assert st.state == "stop", st
    assert st.hinted_bytes > 400 * MiB
    d.hints.StopHinting(pb.StopHintingRequest(vm="dst"))

    # ---- mode none dst -> dst2: refused while fph's balloon is plugged, then after unplugging it
    dst2 = destination(d, lab, vms, "dst2")
    target2 = d.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst2", mode=pb.MODE_NONE))
    code = _code(
        lambda: list(
            d.migrations.Migrate(pb.MigrateRequest(vm="dst", mode=pb.MODE_NONE, destination=target2))
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    dst.qmp("device_del", {"id": "bal0"})
    assert poll_until(
        lambda: "bal0" not in {c["name"] for c in dst.qmp("qom-list", {"path": "/machine/peripheral"})},
        30,
        0.2,
    ), "bal0 not deleted"
    dst.qmp("chardev-remove", {"id": "vu"})
    assert poll_until(lambda: not d.vms.GetVm(pb.GetVmRequest(name="dst")).balloon_connected, 10, 0.1)
    events, rep, none_wall = migrate(d, "dst", pb.MODE_NONE, target2)
    assert events[-1].phase == pb.PHASE_SUCCEEDED and rep.status == "completed", (events[-1], rep.error)
    # every page goes (no hints); the free ones are zero pages here (fph never sent them to dst, and the
    # guest zeroed what it hinted with init_on_alloc), so QEMU counts them as constant, not as bytes
    js = rep.job_stats
    pages = js["memory_constant"] + js["memory_normal"]
    assert js["memory_processed"] > 64 * MiB and pages >= 200_000, dict(js)
    hb = dst.guest.last_heartbeat()
    assert hb is not None
    resumed(d, "dst2")
    check = check_destination(dst2, hb, src=dst)
    assert check.ok, check.problems

    # ---- native dst2 -> dst3 with QEMU's own free page hinting (balloon hot-plugged on dst2)
    dst2.qmp("object-add", {"qom-type": "iothread", "id": "io1"})
    dst2.qmp(
        "device_add",
        {
            "driver": "virtio-balloon-pci",
            "id": "balloon0",
            "iothread": "io1",
            "free-page-hint": True,
            "bus": "pci.0",
            "addr": "0x5",
        },
    )
    time.sleep(2)  # the guest driver probes the hot-plugged device
    dst3 = destination(d, lab, vms, "dst3", NATIVE_BALLOON)
    target3 = d.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst3", mode=pb.MODE_NATIVE))
    events, rep, native_wall = migrate(d, "dst2", pb.MODE_NATIVE, target3)
    assert events[-1].phase == pb.PHASE_SUCCEEDED and rep.status == "completed", (events[-1], rep.error)
    assert rep.job_stats["memory_processed"] > 0 and rep.job_stats["memory_iteration"] >= 1
    hb = dst2.guest.last_heartbeat()
    assert hb is not None
    resumed(d, "dst3")
    check = check_destination(dst3, hb, src=dst2)
    assert check.ok, check.problems
    print(
        f"\nboot {boot_s:.1f} s; fph {fph_wall:.1f} s; none {none_wall:.1f} s; native {native_wall:.1f} s; "
        f"native sent {rep.job_stats['memory_processed'] / MiB:.0f} MiB; "
        f"total {time.monotonic() - t_start:.1f} s"
    )


def scrape(d: RunningDaemon) -> dict[str, float]:
    assert d.srv.metrics_address is not None
    host, port = d.srv.metrics_address
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+\{[^}]*\}) (\S+)$", text, re.M)}


def stopped(st: Any) -> bool:
    """A hint run's status: the guest sent its STOP."""
    return bool(st.state == "stop")


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_an_out_dirtying_guest_with_policy_fail_is_refused_and_keeps_running(
    lab: Lab, state: Path, daemon: RunningDaemon, vms: list[VM]
) -> None:
    """MigrateRequest ``out_dirty_policy`` FAIL through the daemon: a guest rewriting up to 200 MiB/s under a
    16 MiB/s cap fails the migration once fph sees it out-dirty the link (ABORTED, the policy named), the
    source VM runs on, registered, its guest's heartbeat going, and the destination can be prepared again."""
    d = daemon
    src = fph_source(d, lab, vms)
    dst = destination(d, lab, vms, "dst")
    src.wait_ready(180)
    src.guest.start_hold(32, 1)
    src.guest.start_dirty(256, 51200)
    target = d.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst", mode=pb.MODE_FPH))
    with pytest.raises(grpc.RpcError) as info:
        migrate(
            d, "src", pb.MODE_FPH, target,
            bandwidth_bytes_per_second=16 * MiB, out_dirty_policy=pb.OUT_DIRTY_POLICY_FAIL, time_budget_s=120,
        )  # fmt: skip
    assert info.value.code() == grpc.StatusCode.ABORTED, info.value
    assert "policy 'fail'" in info.value.details(), info.value.details()
    rep = d.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm="src"))
    assert rep.phase == pb.PHASE_FAILED and "policy 'fail'" in rep.error, rep
    source_runs_on(d, src)
    assert poll_until(lambda: not dst.alive(), 10, 0.1), "the failed migration's destination QEMU still runs"
