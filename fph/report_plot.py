"""One migration's report drawn (``fph migration report VM --plot PATH``): bytes and pages per round, the
timeline of rounds, hint wait and unplug, and the stop window phase by phase. matplotlib is an optional
extra, imported only when drawing; ``bench/plots.py`` draws its fph runs with the same code (fph itself
never imports the bench).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MiB = 1 << 20

PAGE_BYTES = 4096
ROUND_PARTS = (
    ("hint_wait_ms", "hint wait (round 0: the guest's first hint run)", "tab:purple"),
    ("ready_wait_ms", "ready wait (destination RAM prepared)", "tab:gray"),
    ("send_ms", "send", "tab:blue"),
    ("harvest_ms", "harvest (write-log sync)", "tab:orange"),
    ("other_ms", "rest of the round (round ms − the parts)", "tab:olive"),
)
"""A round's measured parts, in the order the timeline draws them (round 0 with ``first_hint_run=wait``
also syncs after its hint wait: that harvest is drawn with the round's other harvest, after the send)."""
STOP_COLORS = ("tab:red", "tab:pink", "tab:brown", "tab:cyan", "tab:green", "tab:gray")


class PlotError(RuntimeError):
    """Why no plot was drawn; ``status`` is the command's exit status (2: matplotlib is not installed)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def require_matplotlib() -> None:
    """matplotlib is an optional extra (``fph[bench]``): say so in one line instead of a traceback."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise PlotError(
            "--plot needs matplotlib, which is not installed: pip install 'fph[bench]'", 2
        ) from None


@dataclass
class MigrationPlot:
    """What one fph migration's plot needs, from a daemon report or a bench run (their fields differ)."""

    title: str
    rounds: list[dict[str, Any]]
    """Per round: bytes_on_wire, pages_* and the *_ms parts (fph's RoundStats); the last one is the final
    round, sent in the stop window, when ``downtime_breakdown_ms`` is set (the migration completed)."""
    downtime_breakdown_ms: dict[str, float] | None = None
    unplug_ms: float | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    total_ms: float | None = None
    no_stop_window: str = "the migration did not reach switchover"
    """Why there is no stop window to draw, when ``downtime_breakdown_ms`` is absent."""

    @property
    def completed(self) -> bool:
        return bool(self.downtime_breakdown_ms)

    @property
    def live_rounds(self) -> list[dict[str, Any]]:
        return self.rounds[:-1] if self.completed else self.rounds


def report_plot(report: Mapping[str, Any]) -> MigrationPlot:
    """A GetMigrationReport answer (as JSON, protobuf field names) as plot input: the engine's full report
    (its ``json`` field) when there is one, else the message's own round figures (no timing parts)."""
    full: dict[str, Any] = {}
    if report.get("json"):
        try:
            full = json.loads(report["json"])
        except ValueError:
            full = {}
    fph = full.get("fph") or {}
    rounds = list(full.get("rounds") or report.get("rounds") or [])
    vm, mid, status = report.get("vm", "?"), report.get("migration_id", "?"), report.get("status", "?")
    mode = str(report.get("mode", "")).removeprefix("MODE_").lower() or "?"
    if not rounds:
        raise PlotError(
            f"migration {mid} of {vm} ({mode}, {status}) has no fph rounds to plot (native and none "
            "migrations are QEMU's precopy; a migration that failed before its report has none)"
        )
    js = full.get("job_stats") or report.get("job_stats") or {}  # the message's int64s are JSON strings
    total = js.get("time_elapsed")
    err = f": {report['error'][:90]}" if report.get("error") else ""
    return MigrationPlot(
        title=(
            f"{vm}: migration {mid} ({mode}), {status}{err}\n"
            f"{int(js.get('memory_processed', 0)) / MiB:.1f} MiB on the wire, {int(total or 0)} ms total, "
            f"downtime {js.get('downtime', '–')} ms (from fph migration report)"
        ),
        rounds=[dict(r) for r in rounds],
        downtime_breakdown_ms=fph.get("downtime_breakdown_ms") or None,
        unplug_ms=fph.get("unplug_ms"),
        decisions=list(fph.get("decisions") or []),
        total_ms=None if total is None else float(total),
        no_stop_window=(
            "the migration did not reach switchover"
            if full
            else "this report has no engine figures (its json field is empty): per-round totals only"
        ),
    )


def plot_migration(m: MigrationPlot, path: Path) -> Path:
    """One PNG: bytes and pages per round, the timeline of the rounds, the unplug and the stop window,
    and the stop window phase by phase. matplotlib's Figure alone (Agg, no pyplot: no display, no global
    state)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    if not m.rounds:
        raise PlotError(f"{m.title.splitlines()[0]}: no rounds to plot")
    fig = Figure(figsize=(11, 14), layout="constrained")
    ax_bytes, ax_pages, ax_time, ax_stop = fig.subplots(4, 1, height_ratios=[3, 2.5, 3, 1.3])
    fig.suptitle(m.title, fontsize=11)
    labels = _round_labels(m)
    _round_bytes(ax_bytes, m.rounds, labels)
    _round_pages(ax_pages, m.rounds, labels)
    _timeline(ax_time, m)
    _stop_window(ax_stop, m.downtime_breakdown_ms, m.no_stop_window)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def _round_labels(m: MigrationPlot) -> list[str]:
    labels = [str(r.get("round", i)) for i, r in enumerate(m.rounds)]
    if m.completed:
        labels[-1] += "\nfinal"
    return labels


def _f(r: Mapping[str, Any], key: str) -> float:
    return float(r.get(key) or 0.0)


def _round_bytes(ax: Axes, rounds: Sequence[Mapping[str, Any]], labels: list[str]) -> None:
    x = list(range(len(rounds)))
    wire = [_f(r, "bytes_on_wire") / MiB for r in rounds]
    data = [_f(r, "pages_data") * PAGE_BYTES / MiB for r in rounds]
    rest = [max(0.0, w - d) for w, d in zip(wire, data, strict=True)]
    ax.bar(x, data, color="tab:blue", label="page data (pages_data × 4 KiB)")
    ax.bar(x, rest, bottom=data, color="tab:orange", label="frame headers, FILL and ZERO markers (the rest)")
    if len(rounds) <= 16:
        for i, w in enumerate(wire):
            ax.annotate(f"{w:.2f}", (i, w), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8 if len(rounds) <= 20 else 6)
    ax.set_xlabel("round")
    ax.set_ylabel("MiB on the wire")
    ax.set_title(
        "Bytes on the wire per round (bytes_on_wire; the final round is sent with the guest stopped)"
    )
    ax.legend(fontsize=8)


def _round_pages(ax: Axes, rounds: Sequence[Mapping[str, Any]], labels: list[str]) -> None:
    x = list(range(len(rounds)))
    kinds = (
        ("pages_data", "data (whole pages)", "tab:blue"),
        ("pages_fill", "FILL markers (one 8-byte value per run of pages)", "tab:red"),
        ("pages_zero_sent", "ZERO markers", "tab:green"),
        ("pages_zero_skipped", "zero, skipped (not sent)", "tab:gray"),
    )
    bottom = [0.0] * len(rounds)
    for key, label, color in kinds:
        if not any(key in r for r in rounds):
            continue  # an older report without this figure: left out, not drawn as zeros
        vals = [_f(r, key) for r in rounds]
        ax.bar(x, vals, bottom=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(x, labels, fontsize=8 if len(rounds) <= 20 else 6)
    ax.set_xlabel("round")
    ax.set_ylabel("pages (4 KiB)")
    ax.set_title("Pages per round, by how they went")
    ax.legend(fontsize=8)


def _unplug_after(m: MigrationPlot) -> tuple[int | None, str]:
    """After which live round the balloon was unplugged, as far as the decisions tell: the report has the
    unplug's duration, not its start. A round with no policy decision after it is round 0 of release-early
    (unplugged at once); else the unplug came after the first switch-over that was followed by more rounds,
    or (older fph) right before the stop."""
    live = len(m.live_rounds)
    if len(m.decisions) == live - 1 and live >= 1:
        return 0, "after round 0 (no decision followed it)"
    verdicts = [d.get("verdict") for d in m.decisions]
    if "switch-over" in verdicts[:-1]:
        k = verdicts.index("switch-over")
        return k, f"after round {k} (its switch-over decision was followed by another round)"
    return None, "before the stop (where the decisions put it)"


def _timeline(ax: Axes, m: MigrationPlot) -> None:
    rows = [label for _, label, _ in ROUND_PARTS] + ["balloon unplug", "stop window (downtime)"]
    spans: dict[str, list[tuple[float, float]]] = {r: [] for r in rows}
    starts: list[tuple[float, str]] = []
    t = 0.0
    after, where = _unplug_after(m) if m.unplug_ms else (None, "")
    unplug_s = (m.unplug_ms or 0.0) / 1e3
    for i, r in enumerate(m.live_rounds):
        starts.append((t, str(r.get("round", i))))
        parts = {key: _f(r, key) for key, _, _ in ROUND_PARTS[:-1]}
        parts["other_ms"] = max(0.0, _f(r, "ms") - sum(parts.values()))
        for key, label, _ in ROUND_PARTS:
            if parts[key] > 0:
                spans[label].append((t, parts[key] / 1e3))
                t += parts[key] / 1e3
        if after == i and unplug_s:
            spans["balloon unplug"].append((t, unplug_s))
            t += unplug_s
    if m.unplug_ms and after is None:
        spans["balloon unplug"].append((t, unplug_s))
        t += unplug_s
    stop_ms = sum((m.downtime_breakdown_ms or {}).values())
    if m.completed:
        spans["stop window (downtime)"].append((t, stop_ms / 1e3))
        t += stop_ms / 1e3
    colors = [c for _, _, c in ROUND_PARTS] + ["tab:cyan", "tab:red"]
    for y, (row, color) in enumerate(zip(rows, colors, strict=True)):
        if spans[row]:
            ax.broken_barh(spans[row], (len(rows) - 1 - y - 0.4, 0.8), facecolors=color)
    ax.set_yticks(range(len(rows)), list(reversed(rows)), fontsize=8)
    step = max(1, len(starts) // 12)
    for j, (t0, name) in enumerate(starts):
        ax.axvline(t0, color="0.85", lw=0.8, zorder=0)
        if j % step == 0:
            ax.text(t0, 1.0, f"r{name}", transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")
    ax.set_xlim(0, max(t, 1e-3) * 1.01)
    ax.set_xlabel("time from round 0 (s), measured phases laid end to end")
    note = []
    if m.unplug_ms:
        note.append(f"unplug {m.unplug_ms:.0f} ms drawn {where}")
    if m.total_ms:
        gap = m.total_ms / 1e3 - t
        note.append(
            f"{t:.2f} s drawn of {m.total_ms / 1e3:.2f} s total; the {max(gap, 0):.2f} s left is setup "
            "and time between phases (decisions, throttling), not measured per phase"
        )
    if not any(key in r for r in m.rounds for key, _, _ in ROUND_PARTS):
        note.append("the rounds' parts are not recorded: each round is drawn whole, as its rest")
    if not m.completed:
        note.append(f"no stop window: {m.no_stop_window}")
    ax.set_title("\n".join(["Timeline of the migration", *note]), fontsize=9, pad=14)


def _stop_window(ax: Axes, breakdown: Mapping[str, float] | None, why_not: str) -> None:
    if not breakdown:
        msg = f"no stop window: {why_not} (downtime_breakdown_ms absent)"
        ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    left = 0.0
    for (phase, ms), color in zip(breakdown.items(), STOP_COLORS * 4, strict=False):
        ax.barh(0, ms, left=left, color=color, label=f"{phase}: {ms:.1f} ms")
        left += ms
    ax.set_yticks([])
    ax.set_xlabel("ms from QMP stop on the source to cont answered on the destination")
    ax.set_title(f"Stop window, phase by phase: {left:.1f} ms (downtime_breakdown_ms)", fontsize=9)
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.45))
