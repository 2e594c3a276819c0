"""fph mode refuses what would harm the VM before it changes anything on either QEMU (fake QMP peers)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fph.balloon.control import DeviceView
from fph.balloon.counters import BalloonCounters
from fph.migration.fph_mode import Balloon, BalloonDisconnectedError, FphMigration, FphMigrationError
from fph.ram_layout import RamLayout
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
