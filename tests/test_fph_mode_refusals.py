"""fph mode refuses what would harm the VM before it changes anything on either QEMU (fake QMP peers)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from fph.balloon.control import DeviceView
from fph.balloon.counters import BalloonCounters
from fph.balloon.spec import F_FREE_PAGE_HINT, F_REPORTING
from fph.balloon.stats import GuestStats
from fph.migration.fph_mode import (
    Balloon,
    BalloonDisconnectedError,
    FphConfig,
    FphMigration,
    FphMigrationError,
    SourceNotRunningError,
)
from fph.ram_layout import GiB, RamLayout
from fph.transfer.ram_file import RamFile
from tests.fake_qmp import FakeQMP

MiB = 1 << 20


class DroppedBalloon:
    """A balloon control whose QEMU connection dropped (the back-end lost its vhost-user socket)."""

    async def view_async(self) -> DeviceView:
        return DeviceView(
            acked=0, connected=False, has_channel=False, actual=0, num_pages=0, poison_val=0,
            broken=None, config_unread=False, counters=BalloonCounters(),
        )  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the migration must not touch a dropped balloon ({name})")


def test_a_balloon_whose_connection_dropped_is_never_unplugged(tmp_path: Path) -> None:
    """QEMU 11.1 aborts on device_del of a vhost-user device whose back-end connection dropped: fph must
    refuse the migration up front, with the operator's options, and send neither QEMU anything."""
    src = FakeQMP(tmp_path / "src.qmp", {"query-status": {"status": "running", "running": True}})
    dst = FakeQMP(tmp_path / "dst.qmp", {"query-status": {"status": "inmigrate", "running": False}})
    try:
        mig = FphMigration(
            src_qmp=str(src.path),
            dst_qmp=str(dst.path),
            uri=f"unix:{tmp_path / 'mig.sock'}",
            layout=RamLayout.pc(256 * MiB),
            src_ram=tmp_path / "src.ram",
            dst_ram=tmp_path / "dst.ram",
            writelog=None,  # type: ignore[arg-type]  # never reached
            balloon=Balloon(DroppedBalloon()),  # type: ignore[arg-type]
        )
        with pytest.raises(FphMigrationError) as info:
            asyncio.run(mig.run())
        assert isinstance(info.value.cause, BalloonDisconnectedError)
        message = str(info.value)
        assert "will not unplug it" in message and "shut it down from inside the guest" in message
        harmless = {"qmp_capabilities", "query-status", "query-migrate", "migrate_cancel"}  # the abort's
        assert set(src.commands) <= harmless, src.commands  # the source: untouched
        assert set(dst.commands) <= harmless | {"quit"}, dst.commands  # the abort ends the destination
    finally:
        src.close()
        dst.close()


class ViewOnly:
    """A balloon control that only answers view_async (what the hint policy reads)."""

    def __init__(self, acked: int, poison_val: int = 0) -> None:
        self.acked, self.poison_val = acked, poison_val

    async def view_async(self) -> DeviceView:
        return DeviceView(
            acked=self.acked, connected=True, has_channel=True, actual=0, num_pages=0,
            poison_val=self.poison_val, broken=None, config_unread=False, counters=BalloonCounters(),
        )  # fmt: skip


class ReportingGuest(ViewOnly):
    """A reporting guest's balloon with a stats queue: ``free`` bytes free, fresh figures on request
    unless ``answers`` is False (the guest still holds the buffer of an earlier request: old figures)."""

    def __init__(self, free: int, answers: bool) -> None:
        super().__init__(F_FREE_PAGE_HINT | F_REPORTING)
        self.free, self.answers = free, answers
        self.stats = GuestStats({"free_memory": free // 2}, time.monotonic() - 30)  # before the guest freed

    async def request_stats_async(self) -> bool:
        if self.answers:
            self.stats = GuestStats({"free_memory": self.free}, time.monotonic())
        return self.answers

    async def guest_stats_async(self) -> GuestStats:
        return self.stats


@pytest.mark.parametrize(
    ("free_mib", "answers", "skipped"),
    [
        (200, True, True),  # 192 MiB of holes: 8 MiB behind, within the lag that always stays
        (600, True, False),  # 408 MiB not reported yet: the wait gives up and the run hints
        (600, False, False),  # no fresh figures: the old ones (300 MiB free) would say caught up
    ],
)
def test_the_reporting_wait_trusts_only_stats_the_guest_sent_after_it_began(
    tmp_path: Path, free_mib: int, answers: bool, skipped: bool
) -> None:
    layout = RamLayout.pc(256 * MiB)
    path = tmp_path / "src.ram"
    path.write_bytes(b"")
    os.truncate(path, layout.ram_bytes)
    with RamFile(path, layout, writable=True) as ram:
        ram.buf[: 64 * MiB] = 1  # 64 MiB of data, 192 MiB of holes (reported and punched)
        mig = FphMigration(
            src_qmp=str(tmp_path / "src.qmp"),
            dst_qmp=None,
            uri="tcp:127.0.0.1:1",
            layout=layout,
            src_ram=path,
            receiver_address=("127.0.0.1", 1),
            writelog=None,  # type: ignore[arg-type]  # never reached
            balloon=Balloon(ReportingGuest(free_mib * MiB, answers)),  # type: ignore[arg-type]
            config=FphConfig(reporting_wait_s=1.0),
        )
        reason = asyncio.run(mig._hinting_skipped(ram))
    assert (reason is not None and "reports its free memory" in reason) if skipped else reason is None, reason


@pytest.mark.parametrize(
    ("acked", "poison", "hint_reporting", "expected"),
    [
        (F_FREE_PAGE_HINT, 0, False, None),
        (F_FREE_PAGE_HINT | F_REPORTING, 0, False, None),  # no stats to judge reporting by: hint
        (F_FREE_PAGE_HINT | F_REPORTING, 0, True, None),
        (F_FREE_PAGE_HINT, 0xAA, False, "poisons its free pages"),
    ],
)
def test_a_guest_that_reports_or_poisons_is_migrated_without_a_hint_run(
    tmp_path: Path, acked: int, poison: int, hint_reporting: bool, expected: str | None
) -> None:
    mig = FphMigration(
        src_qmp=str(tmp_path / "src.qmp"),
        dst_qmp=None,
        uri="tcp:127.0.0.1:1",
        layout=RamLayout.pc(256 * MiB),
        src_ram=tmp_path / "src.ram",
        receiver_address=("127.0.0.1", 1),
        writelog=None,  # type: ignore[arg-type]  # never reached
        balloon=Balloon(ViewOnly(acked, poison)),  # type: ignore[arg-type]
        config=FphConfig(hint_reporting_guests=hint_reporting),
    )
    reason = asyncio.run(mig._hinting_skipped())
    assert (reason is None) if expected is None else (reason is not None and expected in reason), reason


def test_the_migration_wakes_the_guest_with_its_stats_buffer_and_shrugs_off_a_control_without_one(
    tmp_path: Path,
) -> None:
    """The TCG plugin arms at the next block a vCPU runs: handing the guest its stats buffer back wakes a
    halted vCPU (an interrupt). Only a wake-up: a control that cannot, or fails, changes nothing."""

    class Failing(ViewOnly):
        async def request_stats_async(self) -> bool:
            raise ConnectionError("the worker is gone")

    guest = ReportingGuest(100 * MiB, answers=True)
    for control, woken in ((guest, True), (ViewOnly(F_FREE_PAGE_HINT), False), (Failing(0), False)):
        mig = FphMigration(
            src_qmp=str(tmp_path / "src.qmp"), dst_qmp=None, uri="tcp:127.0.0.1:1", layout=RamLayout.pc(GiB),
            src_ram=tmp_path / "src.ram", receiver_address=("127.0.0.1", 1),
            writelog=None,  # type: ignore[arg-type]  # never reached
            balloon=Balloon(control),  # type: ignore[arg-type]
        )  # fmt: skip
        before = guest.stats.updated
        asyncio.run(mig._wake_guest())
        assert (guest.stats.updated != before) is woken


def test_a_paused_source_is_refused_at_once_when_its_write_log_arms_only_on_guest_code(
    tmp_path: Path,
) -> None:
    """The TCG plugin arms at the next block a vCPU runs: a paused guest never would. fph says so before it
    changes anything, and names what the operator can do."""

    class PluginLog:
        arms_on_guest_code = True

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the migration must not use the write log of a paused guest ({name})")

    src = FakeQMP(tmp_path / "src.qmp", {"query-status": {"status": "paused", "running": False}})
    dst = FakeQMP(tmp_path / "dst.qmp", {"query-status": {"status": "inmigrate", "running": False}})
    try:
        mig = FphMigration(
            src_qmp=str(src.path), dst_qmp=str(dst.path), uri=f"unix:{tmp_path / 'mig.sock'}",
            layout=RamLayout.pc(256 * MiB), src_ram=tmp_path / "src.ram", dst_ram=tmp_path / "dst.ram",
            writelog=PluginLog(),  # type: ignore[arg-type]
        )  # fmt: skip
        with pytest.raises(FphMigrationError) as info:
            asyncio.run(mig.run())
        assert isinstance(info.value.cause, SourceNotRunningError)
        assert "is paused" in str(info.value) and "native mode" in str(info.value)
        harmless = {"qmp_capabilities", "query-status", "query-migrate", "migrate_cancel"}
        assert set(src.commands) <= harmless, src.commands
    finally:
        src.close()
        dst.close()
