"""Finished reports survive a restart of the daemon, stay bounded per VM and go with their VM."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fph.api.v1 import fph_pb2 as pb
from fph.daemon.report_store import ReportStore


def report(mid: str, vm: str, end: float, error: str = "") -> pb.MigrationReport:
    return pb.MigrationReport(
        migration_id=mid,
        vm=vm,
        phase=pb.PHASE_FAILED if error else pb.PHASE_SUCCEEDED,
        status="failed" if error else "completed",
        error=error,
        cleanup=["source resumed (was paused)"] if error else [],
        job_stats={"memory_total": 1 << 30, "memory_processed": 123_456_789},
        rounds=[pb.RoundStats(round=0, pages_data=7, bytes_on_wire=28_672, ms=1.5)],
        start_time=end - 3.0,
        end_time=end,
        json='{"bytes": 28672}',
    )


def test_a_report_comes_back_whole_after_a_restart(tmp_path: Path) -> None:
    first = ReportStore(tmp_path)
    a = report("mig-000000000001", "vm1", 10.0, error="aborted: back-end restarted")
    first.save(a)
    later = ReportStore(tmp_path)
    assert later.get("mig-000000000001") is None
    later.load()
    assert later.get("mig-000000000001") == a
    assert later.latest("vm1") == a and later.latest("vm2") is None
    assert oct((tmp_path / "reports").stat().st_mode & 0o777) == "0o700"


def test_latest_is_by_end_time_and_each_vm_keeps_its_newest(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, keep_per_vm=3)
    for i in (5, 1, 4, 2, 3):
        store.save(report(f"mig-a{i}", "vm1", float(i)))
    store.save(report("mig-b1", "vm2", 0.5))
    assert store.latest("vm1") is not None and store.latest("vm1").migration_id == "mig-a5"
    kept = sorted(p.stem for p in (tmp_path / "reports").glob("*.json"))
    assert kept == ["mig-a3", "mig-a4", "mig-a5", "mig-b1"]
    assert store.get("mig-a2") is None and store.get("mig-b1") is not None
    store.forget_vm("vm1")
    assert store.latest("vm1") is None
    assert sorted(p.stem for p in (tmp_path / "reports").glob("*.json")) == ["mig-b1"]


def test_an_unreadable_report_is_skipped_and_left_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ReportStore(tmp_path)
    store.save(report("mig-good", "vm1", 1.0))
    bad = tmp_path / "reports" / "mig-bad.json"
    bad.write_text("{not json")
    renamed = tmp_path / "reports" / "mig-renamed.json"
    renamed.write_bytes((tmp_path / "reports" / "mig-good.json").read_bytes())
    later = ReportStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fph.daemon"):
        later.load()
    assert later.get("mig-good") is not None
    assert later.get("mig-bad") is None and later.get("mig-renamed") is None
    assert bad.exists() and renamed.exists()
    assert sum("not loaded" in r.getMessage() for r in caplog.records) == 2


def test_an_id_that_is_no_file_name_is_not_written(tmp_path: Path) -> None:
    store = ReportStore(tmp_path)
    store.save(report("../escape", "vm1", 1.0))
    assert not (tmp_path / "escape.json").exists()
    assert store.get("../escape") is None
