"""fph-mode migrations of a real guest (QEMU 11.1, TCG, Debian kernel), byte-verified.

Each test boots a 1 GiB source with fph's balloon and the TCG write log, has the guest write ~700 MiB and
free it, keeps a checksummed region alive (``hold``), and migrates with fph. At the COMPLETE hook both
VMs are stopped: every page of the destination RAM file must equal the source's (with init_on_alloc=1 the
guest zeroes every block it hints, so even never-sent free pages match). After ``cont`` the destination
check runs: VM running, heartbeats go on with the same checksum and a later uptime, no Oops/BUG/panic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fph.migration.fph_mode import FphConfig, FphMigrationError, Phase
from fph.migration_hook import HookEvent, HookPoint
from fph.waiting import poll_until
from fph.writelog.base import Words, WriteLog
from fph_lab.fph_mode import FphPair
from fph_lab.provision import Lab
from fph_lab.ram_compare import PageCompare

pytestmark = pytest.mark.guest
MiB = 1 << 20


@pytest.fixture
def pair(lab: Lab, tmp_path: Path) -> Iterator[FphPair]:
    p = FphPair(lab, mem_mib=1024, keep_logs=tmp_path / "logs")
    with p:
        p.src.guest.fill(700)  # write 700 MiB of data, exit: free memory that still holds data
        p.src.guest.start_hold(32, 1)
        yield p


@pytest.mark.parametrize("policy", ["every-round", "release-early"])
def test_fph_migration_with_shrinker_pressure_is_byte_exact(pair: FphPair, policy: str) -> None:
    """Adversarial: after the first hint run the guest allocates hard enough to use the blocks it hinted,
    and writes them, while fph's rounds go on. ``every-round``: the blocks are still held by the driver,
    so its shrinker hands them back early (the race the epoch rule is for). ``release-early``: DONE gave
    them back before round 0 and the guest simply reuses them."""
    compare = PageCompare(pair)
    started: list[float] = []

    def pressure(event: HookEvent) -> None:
        if event.point is HookPoint.AFTER_SYNC and event.sync == 1 and not started:
            pair.src.console.run("memhog 850 2 >/dev/null 2>&1 &", timeout=30)
            started.append(time.monotonic())
            time.sleep(1.5)  # let it eat into the hinted blocks while the next rounds run

    # the whole first run (wait): the most blocks hinted, so the pressure reuses as many as it can
    cfg = FphConfig(max_rounds=8, hint_policy=policy, first_hint_run="wait")
    mig = pair.migration(cfg, hooks=(pressure, compare))
    report = asyncio.run(mig.run())
    assert started, "the pressure hook never ran"
    assert compare.diff == [], f"{len(compare.diff or [])} pages differ, first {(compare.diff or [])[:8]}"
    check = pair.check()
    assert check.ok, check.problems
    fph = report.fph
    assert fph["hinted_bytes"] > 500 * MiB, fph
    assert fph["redirtied_after_hint"] > 0  # the pressure re-used hinted blocks and the log caught it
    assert report.job_stats["memory_iteration"] >= 2
    assert fph["replug_ms"] is not None  # a fresh balloon was plugged on the destination
    # the destination's balloon is bound and hinting works there
    assert pair.dst_control is not None
    ctl = pair.dst_control

    def hints_accepted() -> bool:
        if ctl.status().broken is not None:
            pytest.fail("destination balloon never became usable")
        try:
            ctl.request_hints()
        except Exception:  # the driver has not bound yet
            return False
        return True

    if not poll_until(hints_accepted, 60, 0.5):
        pytest.fail("destination balloon never became usable")


def test_fph_migration_into_a_receiver_process(pair: FphPair) -> None:
    """The destination's receiver runs as its own process (``fph.transfer.receiver``), as on another host."""
    compare = PageCompare(pair)
    report = asyncio.run(
        pair.migration(FphConfig(max_rounds=8), receiver_process=True, hooks=(compare,)).run()
    )
    assert compare.diff == [], f"{len(compare.diff or [])} pages differ"
    check = pair.check()
    assert check.ok, check.problems
    assert report.destination["receiver"] is None and report.destination["ack"]["ok"]
    proc = pair.receiver_procs[0]
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and '"ok": true' in out


class IgnoredLog(WriteLog):
    """Negative control: harvests the real log (so the plugin keeps running) but reports nothing."""

    kind = "ignored"

    def __init__(self, real: WriteLog) -> None:
        super().__init__(real.layout)
        self.real = real

    def _start(self) -> None:
        self.real.start()

    def _harvest(self, vcpus_stopped: bool) -> tuple[Words, float]:
        self.real.harvest(vcpus_stopped=vcpus_stopped)
        return np.zeros(self.nwords, dtype=np.uint64), 0.0


def test_negative_control_without_the_write_log_is_caught(pair: FphPair) -> None:
    compare = PageCompare(pair)

    def pressure(event: HookEvent) -> None:
        if event.point is HookPoint.AFTER_SYNC and event.sync == 1:
            pair.src.console.run("memhog 850 2 >/dev/null 2>&1 &", timeout=30)
            time.sleep(1.5)

    mig = pair.migration(
        FphConfig(max_rounds=4, verify_sent=False),
        writelog=IgnoredLog(pair.writelog),
        hooks=(pressure, compare),
    )
    try:
        asyncio.run(mig.run())
    except FphMigrationError as err:  # the broken destination guest may die right after cont
        assert err.phase is Phase.RESUME, err
    assert compare.diff, "ignoring the write log must leave differing pages; the check found none"


def test_aborts_leave_the_source_running_with_its_memory(pair: FphPair) -> None:
    """Cancel, a cut data connection, and a destination killed mid-migration: each aborts cleanly."""
    src = pair.src
    free_before = src.guest.meminfo().memfree_kb

    def cancel_after_first_round(mig):  # type: ignore[no-untyped-def]
        def hook(event: HookEvent) -> None:
            if event.point is HookPoint.AFTER_SYNC and event.sync == 1:
                mig.cancel()

        return hook

    def cut_data_connection(mig):  # type: ignore[no-untyped-def]
        def hook(event: HookEvent) -> None:
            if event.point is HookPoint.BEFORE_SYNC and event.sync == 2 and mig.receiver is not None:
                mig.receiver.stop()

        return hook

    def kill_destination(mig):  # type: ignore[no-untyped-def]
        def hook(event: HookEvent) -> None:
            if event.point is HookPoint.AFTER_SYNC and event.sync == 1:
                pair.dst.stop()

        return hook

    for make_fault, phases in (
        (cancel_after_first_round, {Phase.ROUNDS}),
        (cut_data_connection, {Phase.ROUNDS, Phase.STOPPED, Phase.UNPLUG}),
        (kill_destination, {Phase.ROUNDS, Phase.UNPLUG, Phase.STOPPED, Phase.DEVICE_STATE}),
    ):
        if not pair.dst.alive():
            pair.new_destination()
        mig = pair.migration(FphConfig(max_rounds=3), writelog=pair.fresh_writelog())
        mig.dispatcher.register(make_fault(mig))
        with pytest.raises(FphMigrationError) as info:
            asyncio.run(mig.run())
        err = info.value
        assert err.phase in phases, (make_fault.__name__, err)
        assert all("FAILED" not in step for step in err.cleanup), err.cleanup
        # the source runs, its guest keeps its data, and its hinted memory is back
        assert src.status() == "running", make_fault.__name__
        hb = src.guest.last_heartbeat()
        time.sleep(2.5)
        later = src.guest.last_heartbeat()
        assert hb is not None and later is not None and later.seq > hb.seq and later.ok
        poll_until(lambda: src.guest.meminfo().memfree_kb >= free_before - 64 * 1024, 60, 1)
        assert src.guest.meminfo().memfree_kb >= free_before - 64 * 1024, make_fault.__name__
        assert src.qmp("qom-get", {"path": "/machine/peripheral/bal0", "property": "type"})
        pair.dst.stop()
