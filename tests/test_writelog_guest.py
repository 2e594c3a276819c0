"""The TCG write log against a real guest (QEMU 11.1, TCG, file-backed RAM, fph's plugin).

The property: every RAM page whose content changed between two snapshots taken after ``start()`` has its
bit in the harvest. Misses that only flip PTE Accessed/Dirty bits (TCG's page walker, a known blind spot)
are counted and reported, any other miss fails. Page-straddling stores are provoked with a tiny guest
program pasted over the serial console (the lab's programs only make aligned stores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fph.ram_layout import RamLayout
from fph.writelog.errors import SoftDirtyUnavailableError
from fph.writelog.softdirty import SoftDirtyWriteLog, find_ram_mappings, probe_soft_dirty, qmp_vcpu_control
from fph.writelog.tcg import HEADER_SIZE, TcgWriteLog
from fph_lab.provision import Lab
from fph_lab.vm import VM, VMConfig
from fph_lab.writelog_check import build_guest_program, build_straddler, coverage, snapshot, upload

pytestmark = pytest.mark.guest

MEM_MIB = 256
SMP = 2
"""Two vCPUs: MTTCG, so stores from two host threads OR into the same bitmap concurrently."""
FIGURES: dict[str, object] = {}


@dataclass
class Traced:
    vm: VM
    log: TcgWriteLog
    layout: RamLayout
    boot_s: float


def _boot(lab: Lab, plugins: tuple[str, ...], name: str) -> tuple[VM, float]:
    vm = VM(
        lab,
        VMConfig(mem_mib=MEM_MIB, smp=SMP, balloon="none", ram_backend="file", plugins=plugins),
        name=name,
    )
    t0 = time.monotonic()
    try:
        vm.start()
        vm.wait_ready(240)
    except BaseException:
        vm.stop()
        raise
    return vm, time.monotonic() - t0


@pytest.fixture(scope="module")
def traced(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    layout = RamLayout.pc(MEM_MIB << 20)
    log = TcgWriteLog(tmp_path_factory.mktemp("wlog") / "wlog.bin", layout)
    vm, boot_s = _boot(lab, (log.plugin_arg,), "wlog")
    t = Traced(vm, log, layout, boot_s)
    try:
        log.start()
        yield t
    finally:
        vm.stop()
        log.close()
        t.log.close()  # a test may have replaced it with a new consumer
        if FIGURES:
            print("\nwrite-log figures:", json.dumps(FIGURES, indent=1, default=str))


def _stopped_snapshot_and_harvest(t: Traced) -> tuple[np.ndarray, np.ndarray]:
    """Stop the vCPUs (so every store's callback has completed), snapshot, harvest, continue."""
    assert t.vm.ram_path is not None
    t.vm.qmp("stop")
    try:
        after = snapshot(t.vm.ram_path)
        words = t.log.harvest(vcpus_stopped=True)
    finally:
        t.vm.qmp("cont")
    return after, words


def _assert_fill_and_dirty_are_logged(t: Traced, label: str) -> None:
    assert t.vm.ram_path is not None
    t.log.harvest()  # from here on every store is in the next harvest
    before = snapshot(t.vm.ram_path)
    t.vm.guest.start_dirty(8, 2000, 2)
    out = t.vm.console.run("fill 16 & fill 16 & wait", timeout=120)  # one per vCPU
    assert out.count("FPH-FILL mib=16") == 2
    t.vm.console.wait_for("FPH-DIRTY done", 60)
    after, words = _stopped_snapshot_and_harvest(t)
    rep = coverage(before, after, words, t.layout)
    FIGURES[label] = {**rep.as_dict(), "header": t.log.describe()}
    # The workload must have done something for the check below to mean anything. Not "every page fill
    # wrote": fill's pattern depends only on the offset in its buffer, so a page can be written with the
    # bytes it already held and not count as changed (one CI run: 8,037 changed of the 8,192 fill writes).
    assert rep.changed >= 16 * 256, "the workload changed fewer pages than one fill writes"
    assert rep.unexplained == [], (
        f"guest writes missing from the log (RAM file pages): {rep.unexplained[:20]}"
    )


def test_every_guest_write_is_logged(traced: Traced) -> None:
    _assert_fill_and_dirty_are_logged(traced, "fill+dirty")


def _bitmap(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint64, offset=HEADER_SIZE)


def test_disarmed_the_plugin_logs_nothing_and_armed_again_every_write(traced: Traced) -> None:
    """Between migrations the plugin is disarmed: no store callback runs (no store is counted, no bit
    set). A new consumer arms it again (the plugin retranslates all code, on both vCPUs), and from its
    start() every write is logged as before."""
    t = traced
    t.log.close()  # asks to disarm: the plugin follows at the next block a vCPU runs
    rearmed = t.log = TcgWriteLog(t.log.path, t.layout, create=False)
    deadline = time.monotonic() + 10
    while rearmed.header().armed:
        t.vm.console.run("true")
        assert time.monotonic() < deadline, "the plugin did not disarm"
    stores, bits = rearmed.header().stores, _bitmap(rearmed.path)
    out = t.vm.console.run("fill 16 & fill 16 & wait", timeout=120)
    assert out.count("FPH-FILL mib=16") == 2
    assert rearmed.header().stores == stores, "a store callback ran while disarmed"
    assert np.array_equal(_bitmap(rearmed.path), bits), "a bit was set while disarmed"
    rearmed.start()
    h = rearmed.header()
    FIGURES["rearm"] = {"arm_ms": rearmed.arm_ms, "arm_changes": h.arm_changes}
    assert h.armed and h.arm_changes >= 2  # disarmed, then armed again: two retranslations
    _assert_fill_and_dirty_are_logged(t, "fill+dirty after re-arming")


def test_page_straddling_stores_are_logged(traced: Traced) -> None:
    t = traced
    assert t.vm.ram_path is not None
    upload(t.vm.console, build_straddler(), "/tmp/straddle")
    since = t.vm.console.offset()
    t.vm.console.send_line("/tmp/straddle")
    t.vm.console.wait_for("FPH-STRADDLE ready", 60, since)
    straddles0 = t.log.header().straddles
    t.log.harvest()
    before = snapshot(t.vm.ram_path)
    t.vm.console.send_line("")
    t.vm.console.wait_for("FPH-STRADDLE done n=256", 60, since)
    after, words = _stopped_snapshot_and_harvest(t)
    t.vm.console.send_line("")  # let the program exit
    rep = coverage(before, after, words, t.layout)
    # The second pages: they begin with the tail of a straddling store ("STRD" / "STRX").
    heads = after.reshape(-1, 512)[:, 0] & np.uint64(0xFFFF_FFFF)
    was = before.reshape(-1, 512)[:, 0] & np.uint64(0xFFFF_FFFF)
    tails = np.flatnonzero(
        ((heads == np.uint64(0x44525453)) | (heads == np.uint64(0x58525453))) & (heads != was)
    )
    straddles = t.log.header().straddles - straddles0
    FIGURES["straddle"] = {**rep.as_dict(), "second_pages_found": len(tails), "straddles_counted": straddles}
    assert len(tails) == 256, "the snapshot does not show the 256 second pages the program wrote"
    assert straddles >= 256
    assert rep.unexplained == [], f"straddle pages missing from the log: {rep.unexplained[:20]}"
    logged = set(np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")))
    assert all(int(p) in logged for p in tails)  # RAM file offset == GPA below 3.5 GiB on pc


def test_pte_accessed_bits_set_by_the_page_walker_are_the_known_blind_spot(traced: Traced) -> None:
    """Characterisation of the one known miss. Window 1: the guest's command shell clears the Accessed
    bits of its own PTEs (clear_refs 1: kernel stores, logged). Window 2: the shell runs a builtin (no
    fork, so no kernel page-table writes); TCG's page walker sets the Accessed bits again with an
    uninstrumented cmpxchg, so those page-table pages change without a logged store. Every other change
    must be logged. If window 2 ever shows no such page, QEMU instruments the walker now: update
    this test."""
    t = traced
    assert t.vm.ram_path is not None
    # A walk happens only on a TLB miss: a window may see none. Three clear/walk pairs, one must show it.
    attempts = []
    for _ in range(3):
        reports = []
        for command in ("echo 1 > /proc/$$/clear_refs", "echo walk"):
            t.log.harvest()
            before = snapshot(t.vm.ram_path)
            t.vm.console.run(command)
            after, words = _stopped_snapshot_and_harvest(t)
            reports.append(coverage(before, after, words, t.layout))
        for rep in reports:
            assert rep.unexplained == [], (
                f"guest writes missing from the log (RAM file pages): {rep.unexplained[:20]}"
            )
        assert reports[0].missed_pte_ad_only == []  # clearing is done by kernel stores: logged
        attempts.append(reports)
        if reports[1].missed_pte_ad_only:
            break
    FIGURES["pte_accessed_blind_spot"] = {
        "clear": attempts[-1][0].as_dict(),
        "walk": attempts[-1][1].as_dict(),
        "attempts": len(attempts),
    }
    if not attempts[-1][1].missed_pte_ad_only:
        # Every window still proved that no real write was missed (asserted above); only the blind spot
        # itself did not show (no TLB miss on a cleared PTE). The harmful variant is pinned by the
        # MADV_FREE test below, which does not depend on the TLB.
        pytest.skip("the walker set no unlogged Accessed bit in 3 windows (no TLB miss): nothing to show")


def test_pte_dirty_bit_after_madv_free_is_not_logged(traced: Traced) -> None:
    """Characterisation of the harmful variant: after MADV_FREE (the kernel clears the PTEs' Dirty bits:
    logged) the program writes its pages again; the walker sets Dirty with an uninstrumented cmpxchg. The
    data pages are logged, the PTE page is not: a destination copied from this log can hold "clean" PTEs
    for rewritten MADV_FREE pages, which its kernel may then discard. If this ever finds nothing, QEMU
    instruments the walker now: update this test."""
    t = traced
    assert t.vm.ram_path is not None
    upload(t.vm.console, build_guest_program("madvfree"), "/tmp/madvfree")
    since = t.vm.console.offset()
    t.vm.console.send_line("/tmp/madvfree")
    t.vm.console.wait_for("FPH-MADVFREE written", 60, since)
    reports, dirty_bit_pages = [], []
    try:
        for tag in ("freed", "rewritten"):
            t.log.harvest()
            before = snapshot(t.vm.ram_path)
            t.vm.console.send_line("")
            t.vm.console.wait_for(f"FPH-MADVFREE {tag}", 60, since)
            after, words = _stopped_snapshot_and_harvest(t)
            rep = coverage(before, after, words, t.layout)
            reports.append(rep)
            for page in rep.missed_pte_ad_only:
                a, b = before[page * 512 : (page + 1) * 512], after[page * 512 : (page + 1) * 512]
                if ((~a & b & np.uint64(0x40)) != 0).any():  # a PTE's Dirty bit went 0 -> 1
                    dirty_bit_pages.append(page)
    finally:
        t.vm.console.send_line("")
    assert "error" not in t.vm.console.text(since)
    FIGURES["pte_dirty_madv_free"] = {
        "freed": reports[0].as_dict(),
        "rewritten": reports[1].as_dict(),
        "pte_pages_with_unlogged_dirty_bit": len(dirty_bit_pages),
    }
    for rep in reports:
        assert rep.unexplained == [], (
            f"guest writes missing from the log (RAM file pages): {rep.unexplained[:20]}"
        )
    assert reports[0].missed_pte_ad_only == []  # MADV_FREE's clearing is done by kernel stores: logged
    assert dirty_bit_pages, "no PTE Dirty bit set without a logged store (see docstring)"


def test_qemu_ram_mapping_is_found_and_soft_dirty_is_refused_here(traced: Traced) -> None:
    t = traced
    assert t.vm.pid is not None and t.vm.ram_path is not None
    maps = Path(f"/proc/{t.vm.pid}/maps").read_text()
    found = find_ram_mappings(maps, ram_path=str(t.vm.ram_path), ram_bytes=t.layout.ram_bytes)
    assert sum(m.end - m.start for m in found) >= t.layout.ram_bytes

    def must_not(*_a: object) -> None:
        raise AssertionError("the guest must not be paused when soft-dirty is unavailable")

    sd = SoftDirtyWriteLog(t.vm.pid, t.layout, pause=must_not, resume=must_not, ram_path=t.vm.ram_path)
    if probe_soft_dirty():
        pytest.skip("this kernel has soft-dirty: the refusal path does not apply")
    with pytest.raises(SoftDirtyUnavailableError):
        sd.start()
    assert t.vm.status() == "running"


def test_plugin_boot_slowdown(traced: Traced, lab: Lab) -> None:
    """Boot to the ready line with the plugin (disarmed: fph arms it only for a migration) and without
    (noisy: other TCG guests share the host). Disarmed, the plugin costs a call per translation block."""
    vm, plain_s = _boot(lab, (), "noplugin")
    vm.stop()
    FIGURES["boot"] = {
        "with_plugin_s": round(traced.boot_s, 2),
        "without_plugin_s": round(plain_s, 2),
        "slowdown": round(traced.boot_s / plain_s, 2),
        "host_load": os.getloadavg(),
    }
    assert traced.boot_s < 1.5 * plain_s


def test_soft_dirty_pause_mechanics_on_real_qemu(traced: Traced) -> None:
    """The stop → read pagemap → clear_refs → cont path against the real QEMU process, to measure the
    pause. The probe is bypassed: on this kernel every soft-dirty bit reads 0, so only the mechanics and
    the timing are real here, not the tracking."""
    t = traced
    assert t.vm.pid is not None and t.vm.ram_path is not None
    pause, resume = qmp_vcpu_control(str(t.vm.lab_qmp_socket))
    sd = SoftDirtyWriteLog(
        t.vm.pid, t.layout, pause=pause, resume=resume, ram_path=t.vm.ram_path, probe=lambda: True
    )
    sd.start()
    for _ in range(5):
        words = sd.harvest()
        assert words.shape == (t.log.nwords,)
        assert t.vm.status() == "running"
    sd.harvest(vcpus_stopped=True)
    assert t.vm.status() == "running"  # vcpus_stopped: the provider did not touch the run state
    d = sd.describe()
    FIGURES["soft_dirty_pause_mechanics"] = {
        "pause_mean_ms": round(d["pause_total_s"] / 5 * 1000, 2),
        "pause_max_ms": round(d["pause_max_s"] * 1000, 2),
        "pages": t.layout.ram_bytes >> 12,
    }
    assert 0 < d["pause_max_s"] < 2.0
    sd.close()


def test_qemu_refuses_to_start_with_a_log_for_another_guest(lab: Lab, tmp_path: Path) -> None:
    """A log file made for another RAM size must stop QEMU at start-up, not log into the wrong bits."""
    log = TcgWriteLog(tmp_path / "w.bin", RamLayout.pc(128 << 20))
    arg = log.plugin_arg.replace(f"ram={128 << 20}", f"ram={MEM_MIB << 20}")
    cmd = lab.qemu.command("-machine", "none", "-display", "none", "-nodefaults", "-plugin", arg)
    p = subprocess.run(cmd, env=lab.qemu.environ(), capture_output=True, text=True, timeout=60, check=False)
    log.close()
    assert p.returncode != 0
    assert re.search(r"fph writelog: .*created for another guest size", p.stderr), p.stderr
