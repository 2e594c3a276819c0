"""Migration reports side by side, as a person reads them (libvirt job-stat names, fph's own figures)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MiB = 1 << 20

ROWS: tuple[tuple[str, str, float, str], ...] = (
    ("bytes on the wire (MiB)", "memory_processed", MiB, "{:.1f}"),
    ("data pages", "memory_normal", 1, "{:.0f}"),
    ("zero pages", "memory_constant", 1, "{:.0f}"),
    ("rounds / syncs", "memory_iteration", 1, "{:.0f}"),
    ("total time (ms)", "time_elapsed", 1, "{:.0f}"),
    ("downtime (ms)", "downtime", 1, "{:.0f}"),
    ("setup (ms)", "setup_time", 1, "{:.0f}"),
)
FPH_ROWS: tuple[tuple[str, str, float, str], ...] = (
    ("hinted (MiB)", "hinted_bytes", MiB, "{:.1f}"),
    ("re-dirtied after hint (pages)", "redirtied_after_hint", 1, "{:.0f}"),
    ("hinted, unwritten, read anyway (pages)", "hinted_pages_unwritten", 1, "{:.0f}"),
    ("sent, then hinted (waste, pages)", "hint_waste_pages", 1, "{:.0f}"),
    ("stale hints dropped", "stale_hints_dropped", 1, "{:.0f}"),
    ("zero pages skipped", "zero_pages_skipped", 1, "{:.0f}"),
    ("zero pages left unread (holes)", "zero_pages_unread", 1, "{:.0f}"),
    ("holes found by rounds, unread", "hole_pages_unread_in_rounds", 1, "{:.0f}"),
    ("resent by switchover check", "pages_resent_by_check", 1, "{:.0f}"),
    ("switchover check (ms)", "switchover_check_ms", 1, "{:.1f}"),
)


def _cell(value: Any, scale: float, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value / scale)


def side_by_side(reports: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A text table, one column per mode. ``reports`` values have ``job_stats`` (and fph's ``fph``)."""
    names = list(reports)
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'':<32}" + "".join(f"{n:>{width}}" for n in names)]
    for label, key, scale, fmt in ROWS:
        cells = [_cell(reports[n].job_stats.get(key), scale, fmt) for n in names]
        lines.append(f"{label:<32}" + "".join(f"{c:>{width}}" for c in cells))
    for label, key, scale, fmt in FPH_ROWS:
        cells = [_cell(getattr(reports[n], "fph", {}).get(key), scale, fmt) for n in names]
        if any(c != "-" for c in cells):
            lines.append(f"{label:<32}" + "".join(f"{c:>{width}}" for c in cells))
    for label, values in (extra or {}).items():
        lines.append(f"{label:<32}" + "".join(f"{values.get(n, '-')!s:>{width}}" for n in names))
    return "\n".join(lines)


def rounds_table(rounds: list[Mapping[str, Any]]) -> str:
    cols = ("round", "dirty", "data", "zero", "skipped", "MiB", "hinted", "ms")
    lines = [" ".join(f"{c:>8}" for c in cols)]
    for r in rounds:
        values = (
            r["round"],
            r["dirty_at_start"],
            r["pages_data"],
            r["pages_zero_sent"],
            r["pages_zero_skipped"],
            f"{r['bytes_on_wire'] / MiB:.1f}",
            r["hinted_pages"],
            f"{r['ms']:.0f}",
        )
        lines.append(" ".join(f"{v!s:>8}" for v in values))
    return "\n".join(lines)
