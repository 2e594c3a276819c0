"""Real guests migrated between two "hosts": two network namespaces joined by a 1 Gbit/s tbf-shaped veth,
one ``fph serve`` per namespace (``fph_lab.twohost.TwoHostRig``), mutual TLS on the data plane.

Everything goes through the two daemons' gRPC APIs, as an orchestrator would call them: PrepareIncoming on
the destination daemon, Migrate on the source daemon with the IncomingTarget it returned.

1. fph mode: the destination listens on its namespace's address with TLS; a stranger that connects to the
   RAM receiver in plain TCP and sends garbage is refused and the migration still succeeds; the bytes cross
   the veth; the destination daemon resumed its QEMU and re-plugged the balloon; the guest checks out.
2. native mode (QEMU's own free page hinting) across the same link.
3. the link goes down during round 0: the migration fails with ABORTED within a bounded time, the source
   guest runs on and is registered again, the destination daemon reports the incoming side failed; with the
   link back up a fresh destination takes the guest.
4. the destination daemon is killed (kill -9) during round 0: the source fails at once and rolls back (its
   QEMU's migration capabilities as before, balloon back); the restarted daemon tells the abandoned
   destination QEMU to quit; a retry succeeds.
5. the destination QEMU is killed during round 0: its daemon sees the exit and cuts the RAM stream, so the
   source fails in the rounds (not at switchover) and rolls back; a retry succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fph.api.v1 import fph_pb2 as pb
from fph.waiting import poll_until
from fph_lab.check import check_destination
from fph_lab.netlab import LinkConfig, leftover_namespaces
from fph_lab.provision import Lab
from fph_lab.run_state import RunStateWatch, stop_to_resume_ms
from fph_lab.twohost import TwoHostRig
from fph_lab.vm import VM

pytestmark = [
    pytest.mark.guest,
    pytest.mark.twohost,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
        reason="needs root and iproute2 (ip, tc): network namespaces, veth and tc need CAP_NET_ADMIN",
    ),
]

MiB = 1 << 20
MEM_MIB = 1024
LINK = LinkConfig(rate_bits_per_s=1_000_000_000)
#: From the link going down to the source's ABORTED and the destination's "failed": the sender's socket
#: timeout (30 s) and the receiver's (60 s) fit in it with room to spare.
LINK_DOWN_BOUND_S = 90.0
CAPPED_BPS = 32 * MiB
#: From the destination daemon's or QEMU's death to the source's ABORTED.
FAULT_BOUND_S = 30.0

# A host on the data network that is not the source: connects to the RAM receiver in plain TCP, sends
# garbage, and reports whether the receiver hung up on it (EOF or reset) within the timeout.
STRANGER = """
import json, os, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
out = {"connected": False, "closed_by_peer": False, "error": None}
try:
    s = socket.create_connection((host, int(port)), timeout=10)
    out["connected"] = True
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: fph\\r\\n\\r\\n" + os.urandom(2048))
    while s.recv(65536):
        pass
    out["closed_by_peer"] = True
except (ConnectionResetError, BrokenPipeError):
    out["closed_by_peer"] = True
except OSError as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def rig(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHostRig]:
    logs = tmp_path_factory.mktemp("twohost-logs")
    r = TwoHostRig(lab, LINK, tls=True, mem_mib=MEM_MIB, log_dir=logs)
    with r:
        yield r
    # both daemons stopped cleanly on SIGTERM, and nothing of the link is left
    assert (r.src.exit_status, r.dst.exit_status) == (0, 0), r.tails()
    assert r.link is not None and r.link.src_ns not in leftover_namespaces()


@pytest.fixture(autouse=True)
def stop_test_vms(rig: TwoHostRig) -> Iterator[None]:
    """Each test's VMs stop when it ends (the rig outlives it): no idle guest eats the 2 cores."""
    before = len(rig.vms)
    yield
    for vm in rig.vms[before:]:
        vm.stop()


# ------------------------------------------------------------------------------------------------ helpers


def prepare_incoming(rig: TwoHostRig, vm: str, mode: pb.Mode) -> Any:
    target = rig.dst.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm=vm, mode=mode))
    assert rig.link is not None
    assert target.mode == mode and target.vm == vm, target
    assert target.migration_uri.startswith(f"tcp:{rig.link.dst_ip}:"), target.migration_uri
    got = rig.dst.get_vm(vm)
    assert got.state == pb.VM_STATE_INCOMING and got.incoming.startswith("prepared"), got
    return target


def migrate(rig: TwoHostRig, vm: str, mode: pb.Mode, target: Any, **kw: Any) -> tuple[list[Any], Any, float]:
    """Migrate ``vm`` to ``target`` through the source daemon; the events, the report and the wall time."""
    t0 = time.monotonic()
    req = pb.MigrateRequest(vm=vm, mode=mode, destination=target, progress_interval_ms=200, **kw)
    try:
        events = list(rig.src.migrations.Migrate(req, timeout=300))
    except grpc.RpcError as e:
        pytest.fail(f"Migrate({vm}) {e.code().name}: {e.details()}\n{rig.tails()}")
    wall = time.monotonic() - t0
    report = rig.src.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm=vm))
    assert events and events[-1].phase == pb.PHASE_SUCCEEDED, (events[-1:], report.error, rig.tails())
    assert report.status == "completed" and report.phase == pb.PHASE_SUCCEEDED and not report.error, (
        report.error,
        rig.tails(),
    )
    return events, report, wall


def boot_fph_source(rig: TwoHostRig, name: str) -> VM:
    src = rig.source_vm(name)
    src.wait_ready(180)
    got = rig.src.get_vm(name)
    assert got.balloon_connected and got.free_page_hint_negotiated, got
    return src


def stranger(rig: TwoHostRig, address: str) -> dict[str, Any]:
    """Run the stranger in the source's namespace (a host on the data network) against ``address``."""
    assert rig.link is not None
    argv = rig.link.exec_argv(rig.link.src_ns, [sys.executable, "-I", "-c", STRANGER, address])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def heartbeats_advance(vm: VM, wait_s: float = 2.5) -> None:
    hb0 = vm.guest.last_heartbeat()
    time.sleep(wait_s)
    hb1 = vm.guest.last_heartbeat()
    assert hb0 is not None and hb1 is not None and hb1.seq > hb0.seq and hb1.ok, (hb0, hb1)


# -------------------------------------------------------------------------------------------------- tests


def test_fph_migration_across_the_link_with_tls(rig: TwoHostRig) -> None:
    assert rig.link is not None
    t0 = time.monotonic()
    src = boot_fph_source(rig, "src1")
    dst = rig.destination_vm("dst1")
    src.guest.fill(700)
    src.guest.start_hold(32, 1)
    t_workload = time.monotonic() - t0

    target = prepare_incoming(rig, "dst1", pb.MODE_FPH)
    assert target.tls is True, target
    host, _, port = target.data_address.rpartition(":")
    assert host == rig.link.dst_ip and port.isdigit(), target.data_address
    assert target.credential, "no one-time credential"

    # a stranger on the data network: refused before any page, and the receiver waits on
    seen = stranger(rig, target.data_address)
    assert seen["connected"] and seen["closed_by_peer"], seen
    refused = poll_until(
        lambda: [ln for ln in rig.dst.log_text().splitlines() if "refused a peer before any page" in ln],
        10,
        0.1,
    )
    assert refused and f"{rig.link.src_ip}:" in refused[-1], (refused, rig.dst.tail())
    assert rig.dst.get_vm("dst1").incoming.startswith("prepared")

    prep = rig.src.migrations.PrepareMigration(
        pb.PrepareMigrationRequest(vm="src1", mode=pb.MODE_FPH, destination=target)
    )
    assert prep.ready, prep.checks
    tx0 = rig.link.wire_bytes("src")
    watches = RunStateWatch(src), RunStateWatch(dst)
    try:
        events, rep, wall = migrate(rig, "src1", pb.MODE_FPH, target)
    finally:
        for watch in watches:
            watch.close()
    tx = rig.link.wire_bytes("src") - tx0
    # the report's downtime is the guest's: the source QEMU's STOP to the destination QEMU's RESUME
    stopped = stop_to_resume_ms(watches[0].events(), watches[1].events())
    downtime = rep.job_stats["downtime"]
    assert stopped is not None and abs(stopped - downtime) <= max(20, 0.2 * downtime), (stopped, downtime)

    running = [e for e in events if e.phase == pb.PHASE_RUNNING]
    assert any(e.memory_processed > 0 for e in running), running[-3:]
    js = rep.job_stats
    assert rep.fph["hinted_bytes"] > 400 * MiB, dict(rep.fph)
    assert 0 < js["memory_processed"] < 600 * MiB, dict(js)
    # every byte fph counted crossed the shaped veth (plus TCP/IP and TLS framing)
    assert tx >= js["memory_processed"], (tx, js["memory_processed"])
    full = json.loads(rep.json)
    assert full["fph"]["data_plane_tls"] is True, full["fph"].get("data_plane_tls")
    word = full["fph"]["destination_daemon"]
    assert word and word.get("resumed") is True, word

    hb = src.guest.last_heartbeat()
    assert hb is not None
    check = check_destination(dst, hb, src=src)
    assert check.ok, (check.problems, rig.tails())
    assert rig.src.get_vm("src1").state == pb.VM_STATE_MIGRATED
    got = rig.dst.get_vm("dst1")
    assert got.incoming.startswith("resumed"), (got.incoming, rig.dst.tail())
    assert poll_until(lambda: rig.dst.get_vm("dst1").balloon_connected, 60, 0.5), (
        "the destination daemon never re-plugged the balloon",
        rig.dst.get_vm("dst1"),
        rig.dst.tail(),
    )
    print(
        f"\nfph across the link: boot+workload {t_workload:.1f} s, migration {wall:.1f} s, "
        f"sent {js['memory_processed'] / MiB:.1f} MiB ({tx / MiB:.1f} MiB on the veth), "
        f"hinted {rep.fph['hinted_bytes'] / MiB:.0f} MiB, rounds {js['memory_iteration']}, "
        f"downtime {js['downtime']} ms (STOP to RESUME {stopped:.0f} ms), total {time.monotonic() - t0:.1f} s"
    )


def test_the_orchestrator_example_moves_a_guest(rig: TwoHostRig) -> None:
    """examples/orchestrator.py, as the README shows it: its calls in order, and a verified destination."""
    src = boot_fph_source(rig, "osrc")
    dst = rig.destination_vm("odst")
    src.guest.start_hold(32, 1)
    src.guest.fill(300)
    script = Path(__file__).resolve().parent.parent / "examples" / "orchestrator.py"
    argv = [sys.executable, str(script), "--src", f"unix:{rig.src.socket}", "--dst", f"unix:{rig.dst.socket}",
            "--vm", "osrc", "--dest-vm", "odst", "--mode", "fph"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-2000:], rig.tails())
    calls = [ln for ln in r.stdout.splitlines() if ln.startswith("> ")]
    assert [c.split("(")[0] for c in calls] == [
        "> source PrepareMigration",
        "> destination PrepareIncoming",
        "> source Migrate",
        "> source GetMigrationReport",
        "> destination GetVm",
    ], calls
    assert "PHASE_SUCCEEDED" in r.stdout and "<one-time secret>" in r.stdout
    assert rig.dst.get_vm("odst").incoming.startswith("resumed")
    hb = src.guest.last_heartbeat()
    assert hb is not None
    check = check_destination(dst, hb, src=src)
    assert check.ok, (check.problems, rig.tails())


def test_native_migration_across_the_link(rig: TwoHostRig) -> None:
    assert rig.link is not None
    t0 = time.monotonic()
    src = rig.native_vm("nsrc", side="src")
    dst = rig.native_vm("ndst", side="dst", incoming=True)
    src.wait_ready(180)
    src.guest.start_hold(32, 1)
    target = prepare_incoming(rig, "ndst", pb.MODE_NATIVE)
    assert not target.data_address, target  # QEMU moves the RAM itself
    tx0 = rig.link.wire_bytes("src")
    watches = RunStateWatch(src), RunStateWatch(dst)
    try:
        _, rep, wall = migrate(rig, "nsrc", pb.MODE_NATIVE, target)
        # The source's QEMU completes once its last bytes are in its socket, not once they arrived: the
        # destination's "resumed" (its QEMU read the whole stream) is when every byte has crossed the veth.
        incoming_at_end = rig.dst.get_vm("ndst").incoming
        assert poll_until(lambda: rig.dst.get_vm("ndst").incoming.startswith("resumed"), 30, 0.1), (
            rig.dst.get_vm("ndst").incoming,
            rig.dst.tail(),
        )
    finally:
        for watch in watches:
            watch.close()
    tx = rig.link.wire_bytes("src") - tx0
    js = rep.job_stats
    # QEMU's downtime ends when the source has written its last bytes: the guest stands still at least
    # that long, and until the destination has loaded them and resumed
    stopped = stop_to_resume_ms(watches[0].events(), watches[1].events())
    assert stopped is not None and stopped >= js["downtime"] - 1, (stopped, js["downtime"])
    assert js["memory_processed"] > 0 and js["memory_iteration"] >= 1, dict(js)
    assert tx >= js["memory_processed"], (tx, js["memory_processed"])
    hb = src.guest.last_heartbeat()
    assert hb is not None
    check = check_destination(dst, hb, src=src)
    assert check.ok, (check.problems, rig.tails())
    print(
        f"\nnative across the link: migration {wall:.1f} s, sent {js['memory_processed'] / MiB:.1f} MiB "
        f"({tx / MiB:.1f} MiB on the veth), downtime {js['downtime']} ms (STOP to RESUME {stopped:.0f} ms), "
        f"destination {incoming_at_end!r} "
        f"when the source said SUCCEEDED, total {time.monotonic() - t0:.1f} s"
    )


def fault_in_round_0(rig: TwoHostRig, vm: str, target: Any, fault: Callable[[], None]) -> tuple[Any, float]:
    """Migrate ``vm`` capped (round 0 lasts seconds), run ``fault`` once pages are on their way, and expect
    the stream to end ABORTED: the error and the seconds from the fault to it."""
    req = pb.MigrateRequest(
        vm=vm,
        mode=pb.MODE_FPH,
        destination=target,
        bandwidth_bytes_per_second=CAPPED_BPS,
        progress_interval_ms=200,
    )
    stream = rig.src.migrations.Migrate(req, timeout=240)  # a backstop far beyond the bound asserted
    seen: list[Any] = []
    t_fault: float | None = None
    with pytest.raises(grpc.RpcError) as info:
        for ev in stream:
            seen.append(ev)
            if t_fault is None and ev.phase == pb.PHASE_RUNNING and ev.memory_processed > 0:
                fault()
                t_fault = time.monotonic()
    took = time.monotonic() - (t_fault or 0.0)
    assert t_fault is not None, f"no progress with memory_processed > 0 before the end: {seen[-3:]}"
    at = next(e for e in seen if e.memory_processed > 0)
    assert at.memory_processed < at.memory_total / 2, at  # in round 0, not after it
    err = info.value
    assert err.code() == grpc.StatusCode.ABORTED, (err.code(), err.details(), rig.tails())
    assert seen[-1].phase == pb.PHASE_FAILED, seen[-1]
    rep = rig.src.migrations.GetMigrationReport(pb.GetMigrationReportRequest(vm=vm))
    assert rep.status == "failed" and rep.error, rep
    assert all("FAILED" not in c for c in rep.cleanup), rep.cleanup
    return err, took


def source_restored(rig: TwoHostRig, src: VM) -> None:
    """The source guest runs on with its memory: registered again, its balloon back, QEMU's migration
    capabilities as before the migration (no ``x-ignore-shared`` left on)."""
    assert src.status() == "running"
    got = rig.src.get_vm(src.name)
    assert got.state == pb.VM_STATE_REGISTERED and got.balloon_connected, got
    caps = {c["capability"]: c["state"] for c in src.qmp("query-migrate-capabilities")}
    assert not caps.get("x-ignore-shared"), caps
    heartbeats_advance(src)


def retry_to_a_fresh_destination(rig: TwoHostRig, src: VM, name: str) -> tuple[Any, float]:
    dst_b = rig.destination_vm(name)
    target_b = prepare_incoming(rig, name, pb.MODE_FPH)
    _, rep_b, wall = migrate(rig, src.name, pb.MODE_FPH, target_b)
    hb = src.guest.last_heartbeat()
    assert hb is not None
    check = check_destination(dst_b, hb, src=src)
    assert check.ok, (check.problems, rig.tails())
    assert rig.dst.get_vm(name).incoming.startswith("resumed")
    return rep_b, wall


def test_link_down_during_round_0_fails_cleanly_then_migrates(rig: TwoHostRig) -> None:
    assert rig.link is not None
    link = rig.link
    t0 = time.monotonic()
    src = boot_fph_source(rig, "src3")
    dst = rig.destination_vm("dst3")
    src.guest.start_hold(32, 1)
    target = prepare_incoming(rig, "dst3", pb.MODE_FPH)

    t_cut = [0.0]

    def cut() -> None:
        link.set_link(False)
        t_cut[0] = time.monotonic()

    err, took = fault_in_round_0(rig, "src3", target, cut)
    assert took < LINK_DOWN_BOUND_S, f"ABORTED {took:.0f} s after the link went down"
    details = err.details()
    assert "failed" in details and link.dst_ip in details, details  # says what failed, and where
    source_restored(rig, src)

    # the destination daemon gives up on its own (no word can reach it) and says so
    def dst_failed() -> bool:
        return rig.dst.get_vm("dst3").incoming.startswith("failed")

    left = max(1.0, LINK_DOWN_BOUND_S - (time.monotonic() - t_cut[0]))
    assert poll_until(dst_failed, left, 0.5), (
        f"destination incoming still {rig.dst.get_vm('dst3').incoming!r} "
        f"{time.monotonic() - t_cut[0]:.0f} s after the link went down\n{rig.dst.tail()}"
    )
    t_dst_failed = time.monotonic() - t_cut[0]
    dst_incoming = rig.dst.get_vm("dst3").incoming
    assert poll_until(lambda: not dst.alive(), 15, 0.2), "the failed destination's QEMU still runs"

    # link back: a fresh destination takes the guest
    link.set_link(True)
    rep_b, wall = retry_to_a_fresh_destination(rig, src, "dst3b")
    print(
        f"\nlink down: source ABORTED {took:.1f} s after the cut ({details}); destination "
        f"{dst_incoming[:160]!r} after {t_dst_failed:.1f} s; retry migrated in {wall:.1f} s "
        f"({rep_b.job_stats['memory_processed'] / MiB:.1f} MiB); total {time.monotonic() - t0:.1f} s"
    )


def test_destination_daemon_killed_during_round_0(rig: TwoHostRig) -> None:
    """kill -9 of the destination daemon mid-round: its receiver dies with it, so the source fails at once
    and rolls back; the restarted daemon finds the half-prepared destination and tells its QEMU to quit."""
    t0 = time.monotonic()
    src = boot_fph_source(rig, "src4")
    dst = rig.destination_vm("dst4")
    src.guest.start_hold(32, 1)
    target = prepare_incoming(rig, "dst4", pb.MODE_FPH)
    status: list[int | None] = []
    err, took = fault_in_round_0(rig, "src4", target, lambda: status.append(rig.kill_daemon("dst")))
    assert status == [-9], status
    assert took < FAULT_BOUND_S, f"ABORTED {took:.0f} s after the destination daemon died"
    details = err.details()
    assert rig.link is not None and rig.link.dst_ip in details, details
    source_restored(rig, src)
    assert dst.alive() and dst.status() == "inmigrate"  # nobody left to tell it otherwise

    t_restart = time.monotonic()
    rig.restart_daemon("dst")
    got = poll_until(lambda: rig.dst.get_vm("dst4"), 10, 0.2, until=lambda v: v.incoming.startswith("failed"))
    assert got.incoming.startswith("failed") and "restarted" in got.incoming, got
    assert poll_until(lambda: not dst.alive(), 10, 0.2), "the abandoned destination's QEMU still runs"
    restart_s = time.monotonic() - t_restart
    rep_b, wall = retry_to_a_fresh_destination(rig, src, "dst4b")
    print(
        f"\ndestination daemon killed: source ABORTED {took:.1f} s after ({details[:160]}); restarted daemon "
        f"abandoned the destination ({got.incoming!r}) within {restart_s:.1f} s; retry migrated in "
        f"{wall:.1f} s ({rep_b.job_stats['memory_processed'] / MiB:.1f} MiB); "
        f"total {time.monotonic() - t0:.1f} s"
    )


def test_destination_qemu_killed_during_round_0(rig: TwoHostRig) -> None:
    """kill -9 of the destination QEMU mid-round: the migration fails with an error that names it, the
    source rolls back, the destination daemon reports the incoming side failed, and a retry succeeds."""
    t0 = time.monotonic()
    src = boot_fph_source(rig, "src5")
    dst = rig.destination_vm("dst5")
    src.guest.start_hold(32, 1)
    target = prepare_incoming(rig, "dst5", pb.MODE_FPH)
    assert dst.proc is not None
    qemu = dst.proc

    def kill_qemu() -> None:
        os.kill(qemu.pid, signal.SIGKILL)
        qemu.wait(5)

    err, took = fault_in_round_0(rig, "src5", target, kill_qemu)
    # the destination daemon sees its QEMU exit (pidfd) and cuts the stream: the source stops sending now,
    # in the rounds, instead of finding out when QEMU's device-state migration is refused
    assert took < FAULT_BOUND_S, f"ABORTED {took:.0f} s after the destination QEMU died"
    details = err.details()
    assert "during rounds" in details, details
    source_restored(rig, src)
    got = poll_until(lambda: rig.dst.get_vm("dst5"), 30, 0.2, until=lambda v: v.incoming.startswith("failed"))
    assert "exited while the RAM stream was open" in got.incoming, got
    rep_b, wall = retry_to_a_fresh_destination(rig, src, "dst5b")
    print(
        f"\ndestination QEMU killed: source ABORTED {took:.1f} s after ({details[:200]}); destination "
        f"{got.incoming[:160]!r}; retry migrated in {wall:.1f} s "
        f"({rep_b.job_stats['memory_processed'] / MiB:.1f} MiB); total {time.monotonic() - t0:.1f} s"
    )
