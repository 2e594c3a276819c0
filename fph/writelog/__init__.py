"""Write logs: which guest pages were written since the last harvest (issue 5).

Providers (all :class:`WriteLog`, harvests in fph's DirtyBitmap word layout):

- :class:`TcgWriteLog`: QEMU TCG plugin (``tcg_writelog.c``), atomic per-word fetch-and-clear, no pause.
- :class:`SoftDirtyWriteLog`: KVM hosts; soft-dirty is not atomic, so the vCPUs are paused around each
  harvest; refuses kernels without soft-dirty.
- :class:`DeviceWriteLog`: writes fph itself makes to guest memory (its vhost-user rings).
- :class:`CombinedWriteLog`: the OR of several providers' harvests.

Engine sequence per migration: ``start()`` before the first command id; per round: close the hint epoch,
``bitmap.merge_write_log(log.harvest())``, open the next epoch; at switch-over ``stop`` the VM, then
``harvest(vcpus_stopped=True)``; ``close()``.
"""

from fph.writelog.base import HarvestStats, WriteLog
from fph.writelog.combined import CombinedWriteLog
from fph.writelog.device import DeviceWriteLog
from fph.writelog.errors import (
    PluginBuildError,
    PluginNotAttachedError,
    RamMappingNotFoundError,
    SoftDirtyUnavailableError,
    VcpuControlError,
    WriteLogError,
    WriteLogFormatError,
    WriteLogStateError,
)
from fph.writelog.softdirty import SoftDirtyWriteLog, qmp_vcpu_control
from fph.writelog.tcg import PluginNotBuiltError, TcgWriteLog, build_plugin, plugin_path

__all__ = [
    "CombinedWriteLog",
    "DeviceWriteLog",
    "HarvestStats",
    "PluginBuildError",
    "PluginNotAttachedError",
    "PluginNotBuiltError",
    "RamMappingNotFoundError",
    "SoftDirtyUnavailableError",
    "SoftDirtyWriteLog",
    "TcgWriteLog",
    "VcpuControlError",
    "WriteLog",
    "WriteLogError",
    "WriteLogFormatError",
    "WriteLogStateError",
    "build_plugin",
    "plugin_path",
    "qmp_vcpu_control",
]
