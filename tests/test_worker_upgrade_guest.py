"""A balloon worker upgrade (UpgradeBalloonWorker: the new process takes the old one's fds and state over,
SCM_RIGHTS) on a real QEMU 11.1 guest, idle and in the middle of a hint run: QEMU alive, the source running
with its memory unchanged, the balloon connected (QEMU saw no disconnect), a hint run handed over mid-run
goes on in the new worker and its blocks come back with DONE, and the upgraded balloon serves a whole fph
migration, its unplug at switchover included (QEMU 11.1 aborts on device_del of a balloon whose back-end
went away), to a verified destination."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from fph.api.v1 import fph_pb2 as pb
from fph.balloon.worker_client import process_running
from fph.waiting import poll_until
from fph_lab.check import check_destination
from fph_lab.provision import Lab
from tests.test_daemon_restart_guest import (  # noqa: F401  (state and started are fixtures)
    Served,
    Started,
    start_destination,
    start_source,
    started,
    state,
)

pytestmark = [pytest.mark.guest, pytest.mark.fault, pytest.mark.timeout(600)]
HANDED_OVER = re.compile(r"handed over to pid (\d+) in (\d+) ms \(hint state (\w+), (\d+) blocks")


def hinting(d: Served) -> pb.HintingStatus:
    return d.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm="src"))


@pytest.mark.parametrize("phase", ("idle", "hint-run"))
def test_a_worker_upgrade_leaves_qemu_the_guest_and_its_hint_run_whole(
    lab: Lab,
    state: Path,  # noqa: F811  (the fixture)
    started: Started,  # noqa: F811
    phase: str,
) -> None:
    vms = started.vms
    d = started.serve(state)
    src = start_source(lab, d, vms)
    src.wait_ready(180)
    src.guest.start_hold(32, 1)
    old = d.vms.GetVm(pb.GetVmRequest(name="src")).balloon_worker_pid
    assert poll_until(lambda: d.vms.GetVm(pb.GetVmRequest(name="src")).free_page_hint_negotiated, 60)
    if phase == "hint-run":
        d.hints.StartHinting(pb.StartHintingRequest(vm="src", acknowledge_on_stop=True))
        assert poll_until(lambda: hinting(d).state == "start" and hinting(d).hinted_bytes > 0, 60, 0.01)

    up = d.vms.UpgradeBalloonWorker(pb.UpgradeBalloonWorkerRequest(name="src"))
    new = up.vm.balloon_worker_pid
    assert up.previous_pid == old and new not in (0, old), up
    assert poll_until(lambda: not process_running(old), 5), "the old worker did not exit"
    assert up.vm.balloon_connected and not up.vm.degraded, up.vm
    assert src.alive() and src.status() == "running", "QEMU died or stopped in the upgrade"
    log = (state / "workers" / "src.log").read_text()
    (m,) = [m for m in HANDED_OVER.finditer(log) if int(m.group(1)) == new]
    pause_ms, hint_state, blocks = int(m.group(2)), m.group(3), int(m.group(4))
    print(f"phase {phase}: upgrade {up.seconds * 1e3:.0f} ms, worker pause {pause_ms} ms, "
          f"hint state at hand-over {hint_state} ({blocks} blocks)")  # fmt: skip

    if phase == "hint-run":
        assert hint_state in ("requested", "start"), f"the run ended before the hand-over ({hint_state})"
        # the guest finishes the run it began under the old worker; the new one took the rest
        assert poll_until(lambda: hinting(d).state == "stop", 60, 0.1), hinting(d)
        st = hinting(d)
        assert st.blocks > blocks and st.guest_held_bytes > 0, (st, blocks)
        d.hints.StopHinting(pb.StopHintingRequest(vm="src"))  # acknowledge_on_stop: DONE
        assert poll_until(lambda: hinting(d).guest_held_bytes == 0, 10, 0.1), "the hinted blocks stayed held"

    hb0 = src.guest.last_heartbeat()
    time.sleep(2.5)
    hb1 = src.guest.last_heartbeat()
    assert hb0 is not None and hb1 is not None and hb1.seq > hb0.seq and hb1.ok and hb1.csum == hb0.csum

    # the upgraded worker's balloon serves a whole fph migration, unplug at switchover included
    dst = start_destination(lab, d, vms, "dst")
    target = d.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm="dst", mode=pb.MODE_FPH))
    request = pb.MigrateRequest(
        vm="src", mode=pb.MODE_FPH, destination=target, bandwidth_bytes_per_second=125 * 1000 * 1000
    )
    last = list(d.migrations.Migrate(request))[-1]
    assert last.phase == pb.PHASE_SUCCEEDED, last
    assert src.alive(), "the source QEMU died (device_del of the upgraded worker's balloon?)"
    hb = src.guest.last_heartbeat()
    assert hb is not None
    assert poll_until(lambda: dst.status() == "running", 60, 0.2)
    check = check_destination(dst, hb, src=src)
    assert check.ok, check.problems
