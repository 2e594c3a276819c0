"""Write logs without a guest: the plugin's build and file format, the atomic harvest under a concurrent
writer (the property fph relies on), the plugin's store path with a fake page table (page-straddling
stores), the device log, combinations, and the soft-dirty provider against a fake procfs."""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fph.dirty_bitmap import DirtyBitmap
from fph.ram_layout import GiB, RamLayout
from fph.writelog import tcg
from fph.writelog.base import count_bits, full_words
from fph.writelog.build import main as build_main
from fph.writelog.combined import CombinedWriteLog
from fph.writelog.device import DeviceWriteLog
from fph.writelog.errors import (
    PluginNotAttachedError,
    RamMappingNotFoundError,
    SoftDirtyUnavailableError,
    VcpuControlError,
    WriteLogArmTimeoutError,
    WriteLogError,
    WriteLogFormatError,
    WriteLogStateError,
)
from fph.writelog.softdirty import (
    PM_SOFT_DIRTY,
    SoftDirtyWriteLog,
    find_ram_mappings,
    probe_soft_dirty,
    require_soft_dirty,
)
from fph.writelog.tcg import (
    HEADER_SIZE,
    LogHeader,
    PluginNotBuiltError,
    TcgWriteLog,
    build_plugin,
    check_log_file,
    create_log_file,
    harvest_words,
    helpers,
    plugin_path,
    span_bytes,
)

MiB = 1 << 20
PAGE = 4096


def pages_of(words: np.ndarray) -> set[int]:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return {int(p) for p in np.flatnonzero(bits)}


def fake_attach(path: Path) -> None:
    """What the plugin's install does to the header (attach_pid, attach_count)."""
    with open(path, "r+b") as f:
        f.seek(48)
        f.write(struct.pack("<II", os.getpid(), 1))


def ack_arm_request(path: Path) -> None:
    """What the plugin does at the next block a vCPU runs: puts fph's arm request in effect, and when."""
    with open(path, "r+b") as f:
        f.seek(112)
        request = f.read(8)
        f.seek(136)
        f.write(struct.pack("<Q", time.monotonic_ns()))
        f.seek(120)
        f.write(request)


def attached_log(tmp_path: Path, layout: RamLayout) -> TcgWriteLog:
    """A log whose (fake) plugin is attached and has already answered the arm request start() makes."""
    wl = TcgWriteLog(tmp_path / "wlog.bin", layout)
    fake_attach(wl.path)
    wl.prepare()
    ack_arm_request(wl.path)
    return wl


# ------------------------------------------------------------------------------------- plugin build


def test_plugin_builds_once_per_source_hash_and_declares_api_v7(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    so = build_plugin(cache_dir=tmp_path)
    built = time.perf_counter() - t0
    assert so.parent == tmp_path and so.name.startswith("tcg_writelog-") and so.suffix == ".so"
    assert build_plugin(cache_dir=tmp_path) == so  # cached: same key, no rebuild
    assert so.stat().st_mtime_ns == build_plugin(cache_dir=tmp_path).stat().st_mtime_ns
    lib = ctypes.CDLL(str(so), mode=os.RTLD_NOW)  # loads outside QEMU: the API symbols are weak
    assert ctypes.c_int.in_dll(lib, "qemu_plugin_version").value == 7
    assert hasattr(lib, "qemu_plugin_install") and hasattr(lib, "fph_wlog_harvest")
    assert built < 30


def test_runtime_uses_the_plugin_setup_built_and_never_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FPH_WRITELOG_CACHE", raising=False)
    monkeypatch.setattr(tcg, "PLUGIN_BUILD_DIR", tmp_path / "_build")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))  # a compile attempt would fail differently
    with pytest.raises(PluginNotBuiltError, match=r"plugin is not built: .* run scripts/setup"):
        plugin_path()
    with pytest.raises(PluginNotBuiltError, match="run scripts/setup"):
        TcgWriteLog(tmp_path / "w.bin", RamLayout.flat(16 * MiB))
    (tmp_path / "_build").mkdir()
    (tmp_path / "_build" / "tcg_writelog-0123456789abcdef.so").write_bytes(b"old")
    with pytest.raises(PluginNotBuiltError, match=r"stale \(tcg_writelog-0123456789abcdef.so was built from"):
        plugin_path()
    monkeypatch.delenv("CC")
    so = build_plugin()  # what scripts/setup runs: into PLUGIN_BUILD_DIR, older builds removed
    assert so == plugin_path() == tmp_path / "_build" / f"tcg_writelog-{tcg.plugin_key()}.so"
    assert [p.name for p in (tmp_path / "_build").glob("*.so")] == [so.name]


def test_the_cache_override_builds_on_demand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcg, "PLUGIN_BUILD_DIR", tmp_path / "_build")
    monkeypatch.setenv("FPH_WRITELOG_CACHE", str(tmp_path / "cache"))
    so = plugin_path()
    assert so.parent == tmp_path / "cache" and so.exists()
    assert not (tmp_path / "_build").exists()


def test_build_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tcg, "PLUGIN_BUILD_DIR", tmp_path / "_build")
    monkeypatch.setenv("CC", "fph-no-such-compiler")
    assert build_main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no C compiler" in err and "install gcc" in err
    monkeypatch.delenv("CC")
    assert build_main([]) == 0
    assert f"built: {tmp_path / '_build'}/tcg_writelog-" in capsys.readouterr().out
    assert build_main([]) == 0
    assert "up to date" in capsys.readouterr().out
    monkeypatch.setattr(tcg, "PLUGIN_SOURCE", tmp_path / "broken.c")
    (tmp_path / "broken.c").write_text("this is not C\n")
    assert build_main([]) == 1
    first, *rest = capsys.readouterr().err.splitlines()
    assert first.startswith("fph.writelog.build: building the TCG write-log plugin with") and rest


def test_plugin_arg_names_so_log_and_gpa_span(tmp_path: Path) -> None:
    layout = RamLayout.pc(4608 * MiB)  # 4.5 GiB: RAM above 4 GiB, span 5.5 GiB
    wl = TcgWriteLog(tmp_path / "w.bin", layout)
    so, log, ram = wl.plugin_arg.split(",")
    assert Path(so).exists() and log == f"log={tmp_path / 'w.bin'}"
    assert ram == f"ram={4 * GiB + 1536 * MiB}" and span_bytes(layout) == 4 * GiB + 1536 * MiB
    assert wl.nwords == DirtyBitmap(layout).nwords
    wl.close()


# ----------------------------------------------------------------------------------- header format


def test_header_round_trip_and_size(tmp_path: Path) -> None:
    layout = RamLayout.flat(256 * MiB)
    h = create_log_file(tmp_path / "w.bin", layout)
    assert (tmp_path / "w.bin").stat().st_size == HEADER_SIZE + 65536 // 8
    parsed = LogHeader.parse((tmp_path / "w.bin").read_bytes()[:HEADER_SIZE])
    assert parsed == h and parsed.nbits == 65536 and parsed.bitmap_off == HEADER_SIZE
    parsed.validate(nbits=65536, file_size=HEADER_SIZE + 8192)
    check_log_file(tmp_path / "w.bin", 256 * MiB)  # the plugin's C rules agree


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    ("damage", "match_py", "match_c"),
    [
        ("magic", "bad magic", "bad magic"),
        ("version", "header version", "unsupported header version"),
        ("size", "file has", "has .* bytes, expected"),
        ("nbits", "pages, the guest's GPA span has", "nbits does not match"),
    ],
)
def test_header_validation_rejects_bad_files(
    tmp_path: Path, damage: str, match_py: str, match_c: str
) -> None:
    path = tmp_path / "w.bin"
    layout = RamLayout.flat(64 * MiB)
    create_log_file(path, layout)
    if damage == "magic":
        _corrupt(path, 0, b"NOTALOG!")
    elif damage == "version":
        _corrupt(path, 8, struct.pack("<I", 1))  # the version before arm requests
    elif damage == "size":
        os.truncate(path, HEADER_SIZE + 100)
    elif damage == "other-guest":
        create_log_file(path, RamLayout.flat(128 * MiB))
    elif damage == "nbits":  # same bitmap size, one page fewer
        _corrupt(path, 16, struct.pack("<Q", 64 * MiB // PAGE - 1))
    with pytest.raises(WriteLogFormatError, match=match_py):
        TcgWriteLog(path, layout, create=False)
    with pytest.raises(WriteLogFormatError, match=match_c):
        check_log_file(path, 64 * MiB)


def test_a_log_attached_to_a_running_process_is_not_replaced(tmp_path: Path) -> None:
    layout = RamLayout.flat(16 * MiB)
    wl = TcgWriteLog(tmp_path / "w.bin", layout)
    fake_attach(wl.path)  # attached by this (running) process
    with pytest.raises(WriteLogStateError, match="attached to running process"):
        TcgWriteLog(tmp_path / "w.bin", layout)
    TcgWriteLog(tmp_path / "w.bin", layout, create=False).close()  # re-opening is fine
    with open(wl.path, "r+b") as f:  # attached by a process that is gone
        f.seek(48)
        f.write(struct.pack("<I", 2**22 + 12345))
    TcgWriteLog(tmp_path / "w.bin", layout).close()
    wl.close()


def test_short_header_is_a_format_error() -> None:
    with pytest.raises(WriteLogFormatError, match="truncated"):
        LogHeader.parse(b"WLOGv001")


def test_start_requires_an_attached_plugin_and_harvest_requires_start(tmp_path: Path) -> None:
    wl = TcgWriteLog(tmp_path / "w.bin", RamLayout.flat(16 * MiB))
    with pytest.raises(WriteLogStateError, match="call start"):
        wl.harvest()
    with pytest.raises(PluginNotAttachedError, match=r"-plugin .*log="):
        wl.start()
    fake_attach(wl.path)
    wl.prepare()
    ack_arm_request(wl.path)
    wl.start()
    wl.close()
    with pytest.raises(WriteLogStateError, match="closed"):
        wl.harvest()
    assert isinstance(PluginNotAttachedError("x"), WriteLogError)
    assert isinstance(WriteLogError("x"), RuntimeError)


def test_start_waits_for_the_plugin_to_arm_and_close_disarms_only_its_own_request(tmp_path: Path) -> None:
    layout = RamLayout.flat(16 * MiB)
    wl = TcgWriteLog(tmp_path / "w.bin", layout)
    fake_attach(wl.path)
    assert not wl.header().armed and wl.header().arm_request == 0
    wl.prepare()  # asks, does not wait
    assert wl.header().arm_request == (1 << 1) | 1 and not wl.header().armed
    answer = threading.Timer(0.05, ack_arm_request, (wl.path,))  # the plugin answers at a later block
    answer.start()
    wl.start()
    answer.join()
    assert wl.header().armed and wl.arm_ms is not None and wl.arm_ms >= 40
    assert wl.describe()["armed"] is True
    later = TcgWriteLog(wl.path, layout, create=False)  # the next migration's consumer of the same log
    later.prepare()
    ack_arm_request(later.path)
    later.start()
    wl.close()  # not its request any more: the log stays armed for `later`
    assert later.header().arm_request == (2 << 1) | 1
    later.close()
    h = LogHeader.parse(wl.path.read_bytes()[:HEADER_SIZE])
    assert h.arm_request == 3 << 1 and h.armed  # disarm asked; the plugin puts it in effect at its next block


def test_disarm_any_withdraws_whatever_arming_is_in_effect(tmp_path: Path) -> None:
    layout = RamLayout.flat(16 * MiB)
    armer = attached_log(tmp_path, layout)
    armer.start()
    restarted = TcgWriteLog(armer.path, layout, create=False)  # e.g. a restarted daemon: not its request
    assert restarted.disarm_any() and restarted.header().arm_request == 2 << 1
    assert not restarted.disarm_any()  # nothing armed is asked any more
    restarted.close()
    armer.close()  # its own request is gone: it leaves the log alone
    assert LogHeader.parse(armer.path.read_bytes()[:HEADER_SIZE]).arm_request == 2 << 1


def test_start_refuses_when_the_plugin_never_arms(tmp_path: Path) -> None:
    """A paused guest runs no block, so its plugin never answers: start() fails, it never goes on blind."""
    wl = TcgWriteLog(tmp_path / "w.bin", RamLayout.flat(16 * MiB), arm_timeout_s=0.05)
    fake_attach(wl.path)
    with pytest.raises(WriteLogArmTimeoutError, match=r"did not arm within 0.05 s.*paused"):
        wl.start()
    assert not wl.started
    with pytest.raises(WriteLogStateError, match="call start"):
        wl.harvest()
    wl.close()


# ----------------------------------------------------------------------------------- harvest semantics


def test_harvest_is_fetch_and_clear_and_merges_into_the_bitmap(tmp_path: Path) -> None:
    layout = RamLayout.pc(4608 * MiB)
    wl = attached_log(tmp_path, layout)
    view = np.frombuffer(wl._mm, dtype=np.uint64, count=wl.nwords, offset=HEADER_SIZE)  # type: ignore[arg-type]
    c = helpers()
    c.mark_pages(view.ctypes.data, np.array([5], dtype=np.uint64).ctypes.data, 1)
    wl.start()  # arming drops what was logged before
    written = np.array([0, 1, 63, 64, 4 * GiB // PAGE, layout.span_pages - 1], dtype=np.uint64)
    c.mark_pages(view.ctypes.data, written.ctypes.data, len(written))
    words = wl.harvest()
    assert words.dtype == np.uint64 and words.shape == (wl.nwords,)
    assert pages_of(words) == {int(p) for p in written}
    assert count_bits(wl.harvest()) == 0  # cleared
    bm = DirtyBitmap(layout)
    assert bm.merge_write_log(words) == len(written)
    d = wl.describe()
    assert d["harvests"] == 2 and d["pages_total"] == len(written) and d["pause_max_s"] == 0.0
    assert wl.header().harvests == 2
    del view
    wl.close()


def _hammer(words: np.ndarray, pages: np.ndarray, take: object) -> tuple[list[np.ndarray], int]:
    """A C writer thread ORs every page of ``pages`` once (GIL released, chunked) while this thread
    harvests with ``take`` in a loop. Returns the harvests and how many overlapped the writer."""
    c = helpers()
    done = threading.Event()

    def writer() -> None:
        for chunk in np.array_split(pages, 64):
            chunk = np.ascontiguousarray(chunk)
            c.mark_pages(words.ctypes.data, chunk.ctypes.data, len(chunk))
        done.set()

    t = threading.Thread(target=writer)
    harvests: list[np.ndarray] = []
    t.start()
    while not done.is_set():
        harvests.append(take(words))  # type: ignore[operator]
    overlapped = sum(1 for h in harvests if h.any())
    t.join()
    harvests.append(take(words))  # type: ignore[operator]
    return harvests, overlapped


def test_concurrent_writer_loses_nothing_with_the_atomic_harvest() -> None:
    """The property: union of harvests == everything written, and each write taken exactly once. Checked
    on every attempt; the run counts only once harvests overlapped the writer (on a loaded host the writer
    can finish before the harvesting thread gets the CPU: then the run is repeated, up to 8 times)."""
    rng = np.random.default_rng(7)
    nbits = 1 << 20
    pages = rng.permutation(nbits).astype(np.uint64)[: nbits // 2]
    overlapped = 0
    for _attempt in range(8):
        words = np.zeros(nbits // 64, dtype=np.uint64)
        harvests, overlapped = _hammer(words, pages, harvest_words)
        total = np.zeros_like(words)
        for h in harvests:
            assert not (total & h).any()  # no bit taken twice
            total |= h
        assert pages_of(total) == {int(p) for p in pages}
        assert sum(count_bits(h) for h in harvests) == len(pages)
        if overlapped >= 2:
            break
    assert overlapped >= 2, "the writer always finished before a harvest overlapped it: nothing proved"


def test_the_concurrency_test_catches_a_non_atomic_harvest() -> None:
    """Negative control: copy-then-zero (like pagemap read + clear_refs) loses bits under the same writer."""

    def racy(words: np.ndarray) -> np.ndarray:
        out = words.copy()
        words[:] = 0
        return out

    rng = np.random.default_rng(8)
    nbits = 1 << 20
    lost = 0
    for _ in range(5):
        pages = rng.permutation(nbits).astype(np.uint64)[: nbits // 2]
        words = np.zeros(nbits // 64, dtype=np.uint64)
        harvests, _ = _hammer(words, pages, racy)
        total = np.zeros_like(words)
        for h in harvests:
            total |= h
        lost = len(pages) - count_bits(total)
        if lost:
            break
    assert lost > 0


# ------------------------------------------------------------------ the plugin's store path, in-process


class FakeMmu:
    """A fake TLB for fph_wlog_record_store: virtual page -> (physical page, is_io), or a failed lookup."""

    def __init__(self, table: dict[int, tuple[int, bool]]) -> None:
        self.table = table
        self.lookups: list[int] = []
        c = helpers()

        def lookup(_ctx: int | None, vaddr: int, gpa: Any, is_io: Any) -> int:
            self.lookups.append(vaddr)
            entry = self.table.get(vaddr >> 12)
            if entry is None:
                return -1
            gpa[0] = (entry[0] << 12) | (vaddr & 0xFFF)
            is_io[0] = int(entry[1])
            return 0

        self.fn = c.LOOKUP(lookup)

    def store(self, wl: TcgWriteLog, vaddr: int, size: int) -> int:
        assert wl._mm is not None
        base = ctypes.addressof(ctypes.c_char.from_buffer(wl._mm))
        return int(helpers().record_store(base, vaddr, size, self.fn, None))


def test_page_straddling_store_marks_the_second_physical_page_by_its_own_lookup(tmp_path: Path) -> None:
    wl = attached_log(tmp_path, RamLayout.flat(64 * MiB))
    wl.start()
    # virtual pages 10 and 11 are adjacent; physical pages 100 and 7 are not.
    mmu = FakeMmu({10: (100, False), 11: (7, False), 12: (8, True), 20: (30, False)})
    assert mmu.store(wl, (11 << 12) - 4, 8) == 2  # 8-byte mov across the boundary
    assert mmu.lookups == [(11 << 12) - 4, (11 << 12) + 3]
    assert pages_of(wl.harvest()) == {100, 7}  # not 101 (= (pa + size - 1) >> 12)
    assert mmu.store(wl, (11 << 12) - 16, 16) == 1  # 16-byte store ending exactly at the boundary
    assert mmu.store(wl, (20 << 12) + 4000, 16) == 1  # inside one page: one lookup only
    assert mmu.store(wl, (12 << 12) - 8, 16) == 1  # second page is I/O: skipped
    assert pages_of(wl.harvest()) == {100, 30, 7}
    h = wl.header()
    assert h.straddles == 2 and h.io_skipped == 1 and h.lookup_failures == 0
    wl.close()


def test_failed_lookup_makes_the_next_harvest_conservative(tmp_path: Path) -> None:
    layout = RamLayout.flat(8 * MiB)
    wl = attached_log(tmp_path, layout)
    wl.start()
    mmu = FakeMmu({10: (100, False)})
    assert mmu.store(wl, (11 << 12) - 4, 8) == 1  # second page has no TLB entry
    assert wl.header().lookup_failures == 1
    words = wl.harvest()
    assert np.array_equal(words, full_words(layout.span_pages)) and count_bits(words) == 2048
    assert wl.stats.conservative_harvests == 1
    assert count_bits(wl.harvest()) == 0  # counted once
    wl.close()


def test_store_beyond_the_span_is_counted_not_written(tmp_path: Path) -> None:
    wl = attached_log(tmp_path, RamLayout.flat(4 * MiB))
    wl.start()
    mmu = FakeMmu({1: (0xFFFC0, False)})  # BIOS ROM at 0xfffc0000, above a 4 MiB span
    assert mmu.store(wl, 1 << 12, 4) == 1
    assert count_bits(wl.harvest()) == 0
    h = wl.header()
    assert h.out_of_range == 1 and h.last_out_of_range_gpa == 0xFFFC0000
    wl.close()


# --------------------------------------------------------------------------------------- device log


def test_device_log_marks_ranges_and_harvests_atomically() -> None:
    layout = RamLayout.pc(4608 * MiB)
    dl = DeviceWriteLog(layout)
    dl.mark(0, 8)  # before start: dropped by arming
    dl.start()
    dl.mark(0x1FF8, 16)  # straddles pages 1 and 2
    dl.mark(4 * GiB, 1)
    dl.mark_pages([10, 11])
    dl.mark(PAGE * 50, 0)  # empty write: nothing
    assert pages_of(dl.harvest()) == {1, 2, 10, 11, 4 * GiB // PAGE}
    assert count_bits(dl.harvest()) == 0
    with pytest.raises(WriteLogStateError, match="outside the guest's GPA span"):
        dl.mark(layout.span_pages * PAGE, 1)
    with pytest.raises(WriteLogStateError, match="outside"):
        dl.mark_pages([layout.span_pages])


def test_device_log_concurrent_marks_are_never_lost() -> None:
    layout = RamLayout.flat(256 * MiB)
    dl = DeviceWriteLog(layout)
    dl.start()
    pages = np.random.default_rng(3).permutation(layout.span_pages)
    done = threading.Event()
    harvested = threading.Event()

    def writer() -> None:
        for i, chunk in enumerate(np.array_split(pages, 2000)):
            dl.mark_pages(chunk)
            if i == 1000:  # threads need not interleave by themselves: let one harvest land mid-way
                harvested.wait(10)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    harvests = []
    while not done.is_set():
        harvests.append(dl.harvest())
        if harvests[-1].any():
            harvested.set()
    t.join()
    harvests.append(dl.harvest())
    assert sum(count_bits(h) for h in harvests) == layout.span_pages
    assert sum(1 for h in harvests if h.any()) >= 2


# ------------------------------------------------------------------------------------ combinations


def test_combined_harvest_is_the_or_of_each_providers_harvest(tmp_path: Path) -> None:
    layout = RamLayout.flat(64 * MiB)
    tcg = attached_log(tmp_path, layout)
    dev = DeviceWriteLog(layout)
    both = CombinedWriteLog([tcg, dev])
    both.start()
    assert tcg.started and dev.started
    view = np.frombuffer(tcg._mm, dtype=np.uint64, count=tcg.nwords, offset=HEADER_SIZE)  # type: ignore[arg-type]
    helpers().mark_pages(view.ctypes.data, np.array([1, 2], dtype=np.uint64).ctypes.data, 2)
    dev.mark_pages([2, 3000])
    assert pages_of(both.harvest()) == {1, 2, 3000}
    assert count_bits(tcg.harvest()) == 0 and count_bits(dev.harvest()) == 0  # each one was cleared
    dev.mark_pages([9])
    assert pages_of(asyncio.run(both.aharvest())) == {9}
    d = both.describe()
    assert d["atomic"] and [p["kind"] for p in d["providers"]] == ["tcg-plugin", "device"]
    del view
    both.close()
    assert tcg.closed and dev.closed


def test_combined_refuses_logs_of_different_sizes() -> None:
    with pytest.raises(WriteLogStateError, match="different sizes"):
        CombinedWriteLog(
            [DeviceWriteLog(RamLayout.flat(64 * MiB)), DeviceWriteLog(RamLayout.flat(128 * MiB))]
        )
    with pytest.raises(WriteLogStateError, match="at least one"):
        CombinedWriteLog([])


# ---------------------------------------------------------------------------------------- soft-dirty


def test_soft_dirty_unavailable_is_a_clear_error_at_start() -> None:
    def no(*_a: object) -> None:
        raise AssertionError("vCPUs must not be touched")

    sd = SoftDirtyWriteLog(
        os.getpid(), RamLayout.flat(64 * MiB), pause=no, resume=no, ram_path="/x", probe=lambda: False
    )
    with pytest.raises(SoftDirtyUnavailableError, match=r"CONFIG_MEM_SOFT_DIRTY.*Refusing to migrate"):
        sd.start()
    assert not sd.started
    with pytest.raises(WriteLogStateError):
        sd.harvest()


def test_soft_dirty_probe_on_this_host() -> None:
    """This host's kernel: a page just written shows bit 55 iff soft-dirty is built in; start() follows."""
    supported = probe_soft_dirty()
    config = Path(f"/boot/config-{os.uname().release}")
    if config.exists():
        assert supported == ("CONFIG_MEM_SOFT_DIRTY=y" in config.read_text())
    if supported:
        require_soft_dirty()
    else:
        with pytest.raises(SoftDirtyUnavailableError):
            require_soft_dirty()


MAPS_FILE = """\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f00c0000000 rw-s 00000000 00:2a 77 /run/fph/src.ram
7f00c0000000-7f0120000000 rw-s c0000000 00:2a 77 /run/fph/src.ram
7f2000000000-7f2000200000 rw-s 00000000 00:01 99 /memfd:memory-backend-memfd (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
"""


def test_find_ram_mappings_by_path_and_memfd_name() -> None:
    ms = find_ram_mappings(MAPS_FILE, ram_path="/run/fph/src.ram", ram_bytes=4608 * MiB)
    assert [(m.start, m.offset) for m in ms] == [(0x7F0000000000, 0), (0x7F00C0000000, 3 * GiB)]
    (mf,) = find_ram_mappings(MAPS_FILE, memfd_name="memory-backend-memfd", ram_bytes=2 * MiB)
    assert mf.start == 0x7F2000000000
    with pytest.raises(RamMappingNotFoundError, match="no mapping of the RAM file"):
        find_ram_mappings(MAPS_FILE, ram_path="/run/fph/dst.ram", ram_bytes=MiB)
    with pytest.raises(RamMappingNotFoundError, match="maps only"):
        find_ram_mappings(MAPS_FILE, memfd_name="memory-backend-memfd", ram_bytes=4 * MiB)
    with pytest.raises(WriteLogStateError, match="exactly one"):
        find_ram_mappings(MAPS_FILE, ram_bytes=MiB)


def _fake_proc(tmp_path: Path, pid: int, dirty_vaddrs: list[int]) -> Path:
    d = tmp_path / str(pid)
    d.mkdir(parents=True)
    (d / "maps").write_text(MAPS_FILE)
    (d / "clear_refs").write_bytes(b"")
    with open(d / "pagemap", "wb") as f:
        f.truncate((0x7F2000200000 >> 12) * 8)
        for va in dirty_vaddrs:
            f.seek((va >> 12) * 8)
            f.write(struct.pack("<Q", PM_SOFT_DIRTY | (1 << 63)))
    return tmp_path


def test_soft_dirty_harvest_pauses_reads_clears_resumes_and_maps_to_gpas(tmp_path: Path) -> None:
    layout = RamLayout.pc(4608 * MiB)  # file offset 3 GiB is GPA 4 GiB
    base = 0x7F0000000000
    dirty = [base, base + 3 * GiB - PAGE, base + 3 * GiB, base + 4608 * MiB - PAGE]
    proc = _fake_proc(tmp_path, 4242, dirty)
    events: list[str] = []
    clear_refs = proc / "4242" / "clear_refs"

    def pause() -> None:
        events.append("stop")
        time.sleep(0.01)

    def resume() -> None:
        events.append(f"cont clear_refs={clear_refs.read_bytes()!r}")

    sd = SoftDirtyWriteLog(
        4242,
        layout,
        pause=pause,
        resume=resume,
        ram_path="/run/fph/src.ram",
        proc=str(proc),
        probe=lambda: True,
    )
    sd.start()
    assert events == [] and clear_refs.read_bytes() == b"4"  # armed without pausing
    clear_refs.write_bytes(b"")
    words = sd.harvest()
    assert events == ["stop", "cont clear_refs=b'4'"]  # read and clear happened inside the pause
    gpas = {p * PAGE for p in pages_of(words)}
    assert gpas == {0, 3 * GiB - PAGE, 4 * GiB, 4 * GiB + 1536 * MiB - PAGE}
    assert words.shape == (DirtyBitmap(layout).nwords,)
    assert sd.stats.pause_last_s >= 0.01 and sd.describe()["atomic"] is False
    events.clear()
    sd.harvest(vcpus_stopped=True)  # final harvest: the caller stopped the guest; leave it stopped
    assert events == [] and sd.stats.pause_last_s == 0.0
    sd.close()


def test_soft_dirty_async_pause_and_failures(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, 7, [0x7F2000000000 + PAGE])
    events: list[str] = []

    async def apause() -> None:
        events.append("stop")

    async def aresume() -> None:
        events.append("cont")

    layout = RamLayout.flat(2 * MiB)
    kw = {"memfd_name": "memory-backend-memfd", "proc": str(proc), "probe": lambda: True}
    sd = SoftDirtyWriteLog(7, layout, pause=apause, resume=aresume, **kw)  # type: ignore[arg-type]
    sd.start()
    assert pages_of(asyncio.run(sd.aharvest())) == {1} and events == ["stop", "cont"]
    with pytest.raises(VcpuControlError, match="async: call aharvest"):
        sd.harvest()

    def bad_resume() -> None:
        raise OSError("QMP socket gone")

    sd2 = SoftDirtyWriteLog(7, layout, pause=lambda: None, resume=bad_resume, **kw)  # type: ignore[arg-type]
    sd2.start()
    with pytest.raises(VcpuControlError, match="LEFT PAUSED"):
        sd2.harvest()


# ------------------------------------------------------------- the plugin's install, outside QEMU


def _install(args: list[str]) -> int:
    """Call the plugin's qemu_plugin_install in this process: it parses its arguments and opens (or
    creates) the log like inside QEMU, then returns -2 because the QEMU API is absent."""
    fn = helpers().lib.qemu_plugin_install
    fn.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    fn.restype = ctypes.c_int
    argv = (ctypes.c_char_p * len(args))(*[a.encode() for a in args])
    return int(fn(0, None, len(args), argv))


def test_plugin_install_creates_or_validates_the_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "new.bin"
    assert _install([f"log={path}", "ram=64M"]) == -2
    assert "not running inside QEMU" in capfd.readouterr().err
    TcgWriteLog(path, RamLayout.flat(64 * MiB), create=False).close()  # Python accepts the C-made file
    layout = RamLayout.pc(4608 * MiB)
    wl = TcgWriteLog(tmp_path / "py.bin", layout)
    assert _install(wl.plugin_arg.split(",")[1:]) == -2  # the exact -plugin arguments fph passes
    wl.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["log={d}/a.bin", "ram=32M"], "nbits does not match|created for another guest size"),
        (["log={d}/a.bin", "ram=12X"], "bad ram=12X"),
        (["log={d}/a.bin"], "needs log=<file>,ram=<GPA span>"),
        (["log={d}/a.bin", "ram=64M", "mode=x"], "unknown argument mode=x"),
        (["log={d}/missing/a.bin", "ram=64M"], "cannot open write log"),
    ],
)
def test_plugin_install_refuses_bad_arguments(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    create_log_file(tmp_path / "a.bin", RamLayout.flat(64 * MiB))
    assert _install([a.format(d=tmp_path) for a in args]) == -1
    assert re.search(message, capfd.readouterr().err)
