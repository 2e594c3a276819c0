"""A VM whose write-log plugin refuses to start fails with QEMU's own words, not a serial-socket error."""

from __future__ import annotations

from pathlib import Path

import pytest

from fph.ram_layout import RamLayout
from fph.writelog.tcg import TcgWriteLog
from fph_lab.errors import VMError
from fph_lab.provision import Lab
from fph_lab.vm import VM, VMConfig

pytestmark = pytest.mark.guest
MiB = 1 << 20


def test_plugin_refusal_is_reported_with_qemus_message(lab: Lab, tmp_path: Path) -> None:
    wrong = TcgWriteLog(tmp_path / "wlog.bin", RamLayout.pc(512 * MiB))  # a log made for a 512 MiB guest
    arg = f"{wrong.plugin},log={wrong.path},ram={256 * MiB}"  # ... handed to a 256 MiB one
    vm = VM(lab, VMConfig(mem_mib=256, balloon="none", ram_backend="file", plugins=(arg,)), name="bad")
    try:
        with pytest.raises(VMError, match="QEMU exited at start") as info:
            vm.start()
        assert "wlog" in str(info.value) or "plugin" in str(info.value).lower()
    finally:
        vm.stop()
        wrong.close()
