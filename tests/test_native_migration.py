"""Real QEMU, real guest: QEMU-native migration with free page hints and without, each followed by the
destination check (VM running, same heartbeat checksum at a later uptime, shell answers, no Oops/BUG/panic).

Guest: 512 MiB, init_on_alloc=0, a 32 MiB checksummed region with a heartbeat, 300 MiB written and freed
before the migration. Without hints QEMU must send the freed 300 MiB (non-zero); with hints it must not.

QEMU's hinting races its own bulk stage: a hint for a page already sent saves nothing. Unlimited, the
migration thread outran a TCG guest slowed by a loaded CI host once (195 MiB sent, 78 of them freed); at
128 MiB/s (what the baselines in bench/results use) the hints win the race, as on a real link.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import time
from pathlib import Path

import pytest

from fph.migration_hook import HookEvent, HookPoint, NativeMigration
from fph.qmp import MigrationCancelledError, QMPCommandError
from fph_lab.check import check_destination
from fph_lab.pair import VMPair
from fph_lab.provision import Lab
from fph_lab.vm import VM, VMConfig

pytestmark = pytest.mark.guest

MIB = 1 << 20
MEM_MIB = 512
HINTED_BANDWIDTH = 128 * MIB
FREED_MIB = 300
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3


def _prepare(pair: VMPair) -> int:
    """Heartbeat region, then write and free FREED_MIB; return allocated bytes (the lower bound)."""
    pair.src.guest.start_hold(32, 1)
    pair.src.guest.memhog(FREED_MIB, 0)
    return pair.src.guest.meminfo().allocated_bytes


def test_native_migration_with_free_page_hints(lab: Lab) -> None:
    cfg = VMConfig(mem_mib=MEM_MIB, balloon="native", free_page_hint=True, init_on_alloc=0)
    hooks: list[HookEvent] = []
    with VMPair(lab, cfg) as pair:
        m = re.search(
            r"FPH-VIRTIO dev=\S+ id=0x0005 driver=virtio_balloon features=([01]+)", pair.src.console.text()
        )
        assert m, "guest has no virtio-balloon driver bound"
        assert m.group(1)[VIRTIO_BALLOON_F_FREE_PAGE_HINT] == "1", "free page hinting not negotiated"
        lower_bound = _prepare(pair)
        report = pair.migrate_native(max_bandwidth=HINTED_BANDWIDTH, hooks=(hooks.append,))
        check = pair.check()
        assert check.ok, check.problems
    assert report.status == "completed"
    # The freed 300 MiB must (almost all) stay home: allow a quarter of it on top of the allocated pages.
    assert report.bytes < lower_bound + FREED_MIB * MIB // 4, (report.bytes, lower_bound)
    points = [h.point for h in hooks]
    assert points[0] is HookPoint.SETUP and points[-2:] == [HookPoint.COMPLETE, HookPoint.CLEANUP]
    syncs = [h.sync for h in hooks if h.point is HookPoint.AFTER_SYNC]
    assert syncs == list(range(1, report.syncs + 1)), (syncs, report.syncs)
    assert report.job_stats["memory_total"] >= MEM_MIB * MIB


def test_native_migration_without_hints(lab: Lab) -> None:
    cfg = VMConfig(mem_mib=MEM_MIB, balloon="none", init_on_alloc=0)
    with VMPair(lab, cfg) as pair:
        assert "driver=virtio_balloon" not in pair.src.console.text()
        _prepare(pair)
        report = pair.migrate_native()
        hb = pair.last_source_heartbeat()
        check = pair.check(hb)
        assert check.ok, check.problems
        # Negative controls: the check must fail for other data or for a guest that (seemingly) rebooted.
        other = check_destination(pair.dst, dataclasses.replace(hb, csum="0" * 16), timeout=3)
        assert not other.ok and any("checksum" in p for p in other.problems), other.problems
        rebooted = check_destination(pair.dst, dataclasses.replace(hb, uptime=hb.uptime + 1e6), timeout=2)
        assert not rebooted.ok and any("heartbeat(s) after uptime" in p for p in rebooted.problems)
    assert report.status == "completed"
    # Free but non-zero memory cannot be skipped without hints: all of it crosses the wire.
    assert report.bytes >= FREED_MIB * MIB, report.bytes
    assert report.normal_pages >= FREED_MIB * MIB // 4096


def test_real_qemu_error_is_surfaced(vm_factory: object) -> None:
    """QEMU's own description of a refused command reaches the caller (no guest boot: -S)."""
    assert callable(vm_factory)
    vm: VM = vm_factory(VMConfig(mem_mib=128, balloon="none", extra_args=("-S",)), name="err")
    with pytest.raises(QMPCommandError) as ei:
        vm.qmp("migrate-set-parameters", {"downtime-limit": 10**9})
    assert ei.value.command == "migrate-set-parameters"
    assert "downtime-limit" in ei.value.desc and ei.value.error_class == "GenericError"
    assert vm.status() == "prelaunch"


def test_cancel_native_migration(vm_factory: object) -> None:
    """cancel() during a slow migration: run() raises MigrationCancelledError, the source keeps its state.

    No guest boot: the source is held at -S; 16 KiB/s makes its ~1 MB of ROM and zero pages take a minute."""
    assert callable(vm_factory)
    cfg = VMConfig(mem_mib=128, balloon="none", extra_args=("-S",))
    src: VM = vm_factory(cfg, name="src")
    dst: VM = vm_factory(cfg.destination(), name="dst")
    mig = NativeMigration(
        str(src.qmp_socket), str(dst.qmp_socket), f"unix:{dst.migration_socket}", max_bandwidth=16 * 1024
    )
    started = asyncio.Event()

    def on_hook(h: HookEvent) -> None:
        if h.point is HookPoint.AFTER_SYNC:
            started.set()

    mig.dispatcher.register(on_hook)

    async def go() -> float:
        task = asyncio.create_task(mig.run(timeout=120))
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await mig.cancel()
        with pytest.raises(MigrationCancelledError):
            await task
        return time.monotonic() - t0

    elapsed = asyncio.run(go())
    assert elapsed < 10, elapsed
    assert src.qmp("query-migrate")["status"] == "cancelled"
    assert src.status() == "prelaunch"
    assert [h.point for h in mig.dispatcher.history][-1] is HookPoint.CLEANUP


def test_teardown_kills_an_unresponsive_qemu(lab: Lab) -> None:
    """A QEMU that answers neither QMP nor SIGTERM (stopped) is killed by PID; its run directory goes."""
    vm = VM(lab, VMConfig(mem_mib=128, balloon="none", extra_args=("-S",)), name="stuck")
    vm.start()
    pid = vm.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    vm.stop(timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert not vm.alive()
    assert not Path(f"/proc/{pid}").exists()
    assert not vm.run_dir.exists()
