"""The migration report's figures under libvirt's job-stat names (``virDomainGetJobStats``), so
orchestrators read fph's numbers as they read libvirt's; QEMU's raw ``query-migrate`` answer stays beside
them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fph.migration.hooks import HookEvent

# QEMU's default max-bandwidth is 128 MiB/s; fph always sets it explicitly. "Unlimited" = 1 TiB/s.

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

JOB_STAT_FIELDS: dict[str, str] = {
    "memory_total": "ram.total",
    "memory_processed": "ram.transferred",
    "memory_remaining": "ram.remaining",
    "memory_constant": "ram.duplicate",
    "memory_normal": "ram.normal",
    "memory_normal_bytes": "ram.normal-bytes",
    "memory_dirty_rate": "ram.dirty-pages-rate",
    "memory_iteration": "ram.dirty-sync-count",
    "memory_page_size": "ram.page-size",
    "memory_postcopy_requests": "ram.postcopy-requests",
    "downtime": "downtime",
    "setup_time": "setup-time",
    "time_elapsed": "total-time",
}


def job_stats(info: Mapping[str, Any]) -> dict[str, int]:
    """libvirt job stats from a ``query-migrate`` answer; fields QEMU did not report are left out.

    ``memory_bps`` = ``ram.mbps`` × 10^6 / 8 (QEMU's mbps is megabits with M = 10^6), as libvirt does.
    """
    out: dict[str, int] = {}
    ram = info.get("ram") or {}
    for name, src in JOB_STAT_FIELDS.items():
        value = ram.get(src[4:]) if src.startswith("ram.") else info.get(src)
        if value is not None:
            out[name] = int(value)
    if ram.get("mbps") is not None:
        out["memory_bps"] = round(float(ram["mbps"]) * 1e6 / 8)
    return out


def figures_final(info: Mapping[str, Any]) -> bool:
    """True once a finished migration's figures are filled: QEMU reports ``completed`` slightly before it
    fills ``total-time`` and ``downtime`` (both 0 or absent on the first poll)."""
    status = info.get("status")
    if status not in FINAL_STATUSES:
        return False
    if status != "completed":
        return True
    return bool(info.get("total-time")) and "downtime" in info and "ram" in info


class JobStatsView:
    """Shortcuts over libvirt job stats, shared by every mode's report (QEMU-native and fph)."""

    job_stats: dict[str, int]
    hooks: list[HookEvent]

    @property
    def bytes(self) -> int:
        """Bytes on the wire (``memory_processed``; QEMU: ``ram.transferred``)."""
        return self.job_stats.get("memory_processed", 0)

    @property
    def normal_pages(self) -> int:
        return self.job_stats.get("memory_normal", 0)

    @property
    def zero_pages(self) -> int:
        return self.job_stats.get("memory_constant", 0)

    @property
    def total_ms(self) -> int:
        return self.job_stats.get("time_elapsed", 0)

    @property
    def downtime_ms(self) -> int:
        return self.job_stats.get("downtime", 0)

    @property
    def syncs(self) -> int:
        return self.job_stats.get("memory_iteration", 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        d["hooks"] = [{**asdict(h), "point": h.point.value} for h in self.hooks]
        return dict(d)


@dataclass
class MigrationReport(JobStatsView):
    """The outcome of one migration: libvirt-named stats, QEMU's raw answer, hooks, events."""

    mode: str
    status: str
    job_stats: dict[str, int]
    raw: dict[str, Any]
    hooks: list[HookEvent] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    parameters: dict[str, Any] = field(default_factory=dict)
