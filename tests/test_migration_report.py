"""The libvirt job-stat mapping, final-figure detection and hook inference (no guest needed)."""

from __future__ import annotations

from typing import Any

from fph.migration_hook import (
    JOB_STAT_FIELDS,
    HookPoint,
    figures_final,
    hooks_from_qemu_event,
    job_stats,
)

# A real query-migrate answer from QEMU 11.1.2 (no-hint migration of a 1 GiB TCG guest, 2026-11-27).
QEMU_11_1_COMPLETED: dict[str, Any] = {
    "status": "completed",
    "setup-time": 1,
    "downtime": 11,
    "total-time": 2902,
    "ram": {
        "total": 1074274304,
        "postcopy-requests": 0,
        "dirty-sync-count": 2,
        "multifd-bytes": 0,
        "pages-per-second": 55941,
        "downtime-bytes": 2727252,
        "page-size": 4096,
        "remaining": 0,
        "postcopy-bytes": 0,
        "mbps": 2373.105894519131,
        "transferred": 860547525,
        "dirty-sync-missed-zero-copy": 0,
        "precopy-bytes": 857709326,
        "duplicate": 52853,
        "dirty-pages-rate": 0,
        "normal-bytes": 858284032,
        "normal": 209542,
    },
}


def test_job_stats_use_libvirt_names_and_qemu_values() -> None:
    s = job_stats(QEMU_11_1_COMPLETED)
    assert s["memory_total"] == 1074274304
    assert s["memory_processed"] == 860547525
    assert s["memory_remaining"] == 0
    assert s["memory_constant"] == 52853
    assert s["memory_normal"] == 209542
    assert s["memory_normal_bytes"] == 858284032
    assert s["memory_dirty_rate"] == 0
    assert s["memory_iteration"] == 2
    assert s["memory_page_size"] == 4096
    assert s["downtime"] == 11
    assert s["setup_time"] == 1
    assert s["time_elapsed"] == 2902
    # mbps is megabits with M = 10^6; libvirt's memory_bps is bytes/s.
    assert s["memory_bps"] == round(2373.105894519131 * 1_000_000 / 8)


def test_every_required_libvirt_name_is_mapped() -> None:
    required = {
        "memory_total", "memory_processed", "memory_remaining", "memory_constant", "memory_normal",
        "memory_normal_bytes", "memory_dirty_rate", "memory_iteration", "memory_page_size", "memory_bps",
        "downtime", "setup_time", "time_elapsed",
    }  # fmt: skip
    assert required <= set(job_stats(QEMU_11_1_COMPLETED))
    assert required - {"memory_bps"} <= set(JOB_STAT_FIELDS)


def test_missing_fields_are_left_out_not_zeroed() -> None:
    s = job_stats({"status": "active", "ram": {"transferred": 5}})
    assert s == {"memory_processed": 5}


def test_completed_with_zero_times_is_not_final() -> None:
    early = {**QEMU_11_1_COMPLETED, "total-time": 0}
    early.pop("downtime")
    assert not figures_final(early)
    assert figures_final(QEMU_11_1_COMPLETED)
    assert figures_final({"status": "failed", "error-desc": "x"})
    assert not figures_final({"status": "active", "total-time": 5, "downtime": 1, "ram": {}})


def _ev(name: str, t: int, **data: Any) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": {"seconds": 1795796912, "microseconds": t}}


def test_hooks_from_qemu_11_1_event_sequence() -> None:
    # QEMU 11.1 sends no MIGRATION_PASS for the setup sync: sync 1 is inferred at "active".
    seq = [
        _ev("MIGRATION", 1, status="setup"),
        _ev("MIGRATION", 2, status="active"),
        _ev("MIGRATION_PASS", 3, **{"pass": 2}),
        _ev("MIGRATION_PASS", 4, **{"pass": 3}),
        _ev("MIGRATION", 5, status="device"),
        _ev("MIGRATION", 6, status="completed"),
    ]
    last = 0
    got = []
    for e in seq:
        for h in hooks_from_qemu_event(e, last):
            last = max(last, h.sync)
            got.append((h.point, h.sync))
            assert h.observed
            assert h.time == 1795796912 + e["timestamp"]["microseconds"] / 1e6
    assert got == [
        (HookPoint.SETUP, 0),
        (HookPoint.BEFORE_SYNC, 1),
        (HookPoint.AFTER_SYNC, 1),
        (HookPoint.BEFORE_SYNC, 2),
        (HookPoint.AFTER_SYNC, 2),
        (HookPoint.BEFORE_SYNC, 3),
        (HookPoint.AFTER_SYNC, 3),
        (HookPoint.COMPLETE, 3),
        (HookPoint.CLEANUP, 3),
    ]


def test_hooks_with_qemu_7_2_pass_1_event_do_not_duplicate_sync_1() -> None:
    last = 0
    got = []
    for e in (
        _ev("MIGRATION", 1, status="setup"),
        _ev("MIGRATION_PASS", 2, **{"pass": 1}),
        _ev("MIGRATION", 3, status="active"),
    ):
        for h in hooks_from_qemu_event(e, last):
            last = max(last, h.sync)
            got.append((h.point, h.sync))
    assert got == [(HookPoint.SETUP, 0), (HookPoint.BEFORE_SYNC, 1), (HookPoint.AFTER_SYNC, 1)]


def test_failed_migration_only_cleans_up() -> None:
    hooks = hooks_from_qemu_event(_ev("MIGRATION", 1, status="failed"), 2)
    assert [(h.point, h.sync) for h in hooks] == [(HookPoint.CLEANUP, 2)]
