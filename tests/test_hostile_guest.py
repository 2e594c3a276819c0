"""A hostile vhost-user peer on one VM's balloon socket while another VM, a real QEMU 11.1 guest, runs an
fph migration through the same daemon: every hostile message of tests/test_vhost_user_hostile.py, connect
and hang-up cycles, a call fd that is a full blocking pipe, and at last a memory file truncated under the
victim's worker (SIGBUS). The migration succeeds to a verified destination, the victim's worker keeps its
fd count until the SIGBUS kills it alone, and the victim is then reported degraded with the reason."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fph.api.v1 import fph_pb2 as pb
from fph.balloon.spec import QueueRole
from fph.vhost_user import message as m
from fph.vhost_user.message import FrontendReq as R
from fph.waiting import poll_until
from fph_lab.check import check_destination
from fph_lab.provision import Lab
from tests.fake_frontend import FakeFrontend, GuestRam, boot
from tests.test_daemon_restart_guest import (  # noqa: F401  (state and started are fixtures)
    MiB,
    Started,
    start_destination,
    start_source,
    started,
    state,
)
from tests.test_vhost_user_hostile import HOSTILE, fill_pipe

pytestmark = [pytest.mark.guest, pytest.mark.fault, pytest.mark.timeout(600)]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def attack(path: str, stop: threading.Event, tally: dict[str, int]) -> None:
    """Every hostile message and a connect/hang-up, round after round, until ``stop``."""
    with GuestRam(16 * MiB) as ram:
        while not stop.is_set():
            for kind, send in HOSTILE.items():
                fe = FakeFrontend(path, ram)
                try:
                    send(fe, ram)
                    tally["closed" if fe.is_closed() else "not closed: " + kind] += 1
                except (BrokenPipeError, ConnectionResetError):
                    # refused at once: the worker had not yet seen the last connection's hang-up (it
                    # takes one front-end at a time)
                    tally["refused"] += 1
                finally:
                    fe.sock.close()
            FakeFrontend(path, ram).sock.close()
            tally["rounds"] += 1


def test_a_hostile_peer_on_one_vm_leaves_another_vms_fph_migration_whole(
    lab: Lab,
    state: Path,  # noqa: F811  (the fixture)
    started: Started,  # noqa: F811
) -> None:
    vms = started.vms
    d = started.serve(state)
    src = start_source(lab, d, vms)
    dst = start_destination(lab, d, vms, "dst")
    victim_dir = state / "victim"
    victim_dir.mkdir()
    victim = d.vms.RegisterVm(
        pb.RegisterVmRequest(
            spec=pb.VmSpec(
                name="victim",
                qmp_socket=str(victim_dir / "qmp.sock"),
                ram_file=str(victim_dir / "ram"),
                balloon_socket=str(victim_dir / "balloon.sock"),
                memory_bytes=64 * MiB,
            )
        )
    )
    path, worker = victim.spec.balloon_socket, victim.balloon_worker_pid
    src.wait_ready(180)
    src.guest.start_hold(32, 1)
    src.guest.fill(200)  # data the migration has to send while the attack runs
    fds_before = fd_count(worker)

    stop, tally = threading.Event(), {"closed": 0, "refused": 0, "rounds": 0}
    tally_any: dict[str, Any] = tally
    attacker = threading.Thread(target=attack, args=(path, stop, tally_any), daemon=True)
    attacker.start()
    target = d.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst", mode=pb.MODE_FPH))
    request = pb.MigrateRequest(
        vm="src", mode=pb.MODE_FPH, destination=target, bandwidth_bytes_per_second=32 * MiB
    )
    t0 = time.monotonic()
    last = list(d.migrations.Migrate(request))[-1]
    took = time.monotonic() - t0
    stop.set()
    attacker.join(60)
    assert last.phase == pb.PHASE_SUCCEEDED, last
    hb = src.guest.last_heartbeat()
    assert hb is not None and poll_until(lambda: dst.status() == "running", 60, 0.2)
    check = check_destination(dst, hb, src=src)
    assert check.ok, check.problems
    bad = {k: v for k, v in tally.items() if k.startswith("not closed")}
    assert tally["rounds"] >= 1 and not bad, tally
    fds_after = poll_until(lambda: fd_count(worker), 5, 0.05, until=lambda n: n == fds_before)
    print(f"migration {took:.1f} s under {tally['rounds']} rounds of {len(HOSTILE)} hostile messages "
          f"({tally['closed']} closed by the worker, {tally['refused']} refused); "
          f"victim worker fds {fds_before} -> {fds_after}")  # fmt: skip
    assert fds_after == fds_before, "the victim's worker leaked or lost fds"

    # a call fd that is a full blocking pipe, then a memory file shrunk under the victim's worker
    with GuestRam(16 * MiB) as ram:
        fe, drv = boot(path, ram)
        r, w = os.pipe()
        fill_pipe(w)
        inflate = drv.roles[QueueRole.INFLATE]
        fe.call(R.SET_VRING_CALL, m.encode_u64(inflate), [w], need_reply=True)
        q = drv.queue(QueueRole.INFLATE)
        pfns = ram.alloc.alloc(4, 4)
        ram.mem.write_u32(pfns, ram.blocks[0] >> 12)
        worst = 0.0
        for n in range(1, 21):  # every returned buffer is a call notification into the full pipe
            q.add_chain(out=[(pfns, 4)])
            fe.kick(inflate)
            fe.wait_until(lambda n=n: q.used_idx == n, 5.0, "the inflate buffer back")
            t1 = time.monotonic()
            assert d.vms.GetVm(pb.GetVmRequest(name="victim")).balloon_connected  # asks the victim's worker
            worst = max(worst, time.monotonic() - t1)
        assert worst < 1.0, f"the victim's worker stalled {worst:.1f} s on a full call pipe"
        os.ftruncate(ram.fd, 0)
        fe.kick(drv.roles[QueueRole.STATS])
        gone = lambda: "is gone" in d.vms.GetVm(pb.GetVmRequest(name="victim")).degraded  # noqa: E731
        assert poll_until(gone, 10), d.vms.GetVm(pb.GetVmRequest(name="victim"))
        assert "SIGBUS" in d.vms.GetVm(pb.GetVmRequest(name="victim")).degraded
        fe.close()
        os.close(r)
        os.close(w)
    assert src.alive() and dst.alive() and dst.status() == "running"
    assert not d.vms.GetVm(pb.GetVmRequest(name="dst")).degraded
