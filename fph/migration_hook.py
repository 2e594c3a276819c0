"""fph's QEMU-facing side of a migration: the two modes, their hook points and their report.

* fph mode (:class:`FphMigration`, fph.migration.fph_mode): fph moves guest RAM itself in precopy rounds,
  skipping what the guest hinted free; QEMU migrates device state only (``x-ignore-shared``).
* native mode (:class:`NativeMigration`, fph.migration.native): QEMU's own precopy with QEMU's own free page
  hinting, driven over QMP: the baseline for every fph figure, and the path on any QEMU.

Both express QEMU's balloon precopy notifier points as :class:`HookPoint` events (fph.migration.hooks) and
report under libvirt's job-stat names (fph.migration.job_stats).
"""

from fph.migration.fph_mode import Balloon, FphConfig, FphMigration, FphMigrationError, FphReport, Phase
from fph.migration.hooks import HookDispatcher, HookEvent, HookListener, HookPoint, hooks_from_qemu_event
from fph.migration.job_stats import (
    FINAL_STATUSES,
    JOB_STAT_FIELDS,
    JobStatsView,
    MigrationReport,
    figures_final,
    job_stats,
)
from fph.migration.native import DEFAULT_DOWNTIME_LIMIT_MS, UNLIMITED_BANDWIDTH, NativeMigration
from fph.qmp import MigrationCancelledError, MigrationError, MigrationTimeoutError, QMPCommandError, QMPError

__all__ = [
    "DEFAULT_DOWNTIME_LIMIT_MS",
    "FINAL_STATUSES",
    "JOB_STAT_FIELDS",
    "UNLIMITED_BANDWIDTH",
    "Balloon",
    "FphConfig",
    "FphMigration",
    "FphMigrationError",
    "FphReport",
    "HookDispatcher",
    "HookEvent",
    "HookListener",
    "HookPoint",
    "JobStatsView",
    "MigrationCancelledError",
    "MigrationError",
    "MigrationReport",
    "MigrationTimeoutError",
    "NativeMigration",
    "Phase",
    "QMPCommandError",
    "QMPError",
    "figures_final",
    "hooks_from_qemu_event",
    "job_stats",
]
