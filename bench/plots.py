"""Plots of a ``policy_bench.py --json`` or ``twohost_bench.py --json`` result, as PNG files beside it or in
``--out``:

``STEM-bytes.png``   bytes on the wire per workload and mode: median bars, every run as a dot, the lower bound
``STEM-rate.png``    the max 100 ms window wire rate per run against the cap, and capped fph runs' per-round
                     average rate
``STEM-wire.png``    wire rate over time against the cap, one run per workload and mode (runs that carry
                     ``wire_samples``: twohost_bench's source veth counter, read every 100 ms)
``STEM-rounds-WORKLOAD-MODE-rN.png``  one fph run (the median-bytes run of its workload and mode, or every
                     run with ``--every-run``): bytes and pages per round, the timeline, the stop window

    python bench/plots.py bench/results/policy_bench.json --out bench/results/plots
    python bench/plots.py bench/results/twohost_bench.json

matplotlib (``pip install -e '.[bench]'``) is imported inside the functions: importing the bench modules stays
fast and a suite that does not plot never needs it. The per-run plot is fph's own
(``fph.report_plot.plot_migration``, what ``fph migration report VM --plot`` draws), fed from the run.
Nothing is drawn that the JSON does not hold: a run or figure without its data is skipped with a message.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fph.report_plot import MigrationPlot

MIB = 1 << 20
MODE_ORDER = ("fph", "fph-wait", "native", "none")
MODE_COLORS = {"fph": "tab:blue", "fph-wait": "tab:cyan", "native": "tab:orange", "none": "tab:gray"}
FPH_MODES = ("fph", "fph-wait")


class NothingToPlot(ValueError):
    """The JSON lacks what a figure needs (a native run has no rounds, an old run no rates): skip it."""


def load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise ValueError(f"{path}: not a policy_bench.py or twohost_bench.py --json result (no 'runs' list)")
    return doc


def _workloads(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["workload"] for r in runs))


def _modes(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    seen = {r["mode"] for r in runs}
    return [m for m in MODE_ORDER if m in seen] + sorted(seen - set(MODE_ORDER))


def _median(vals: Sequence[float | None]) -> float | None:
    got = [v for v in vals if v is not None]
    return statistics.median(got) if got else None


def _host_line(doc: Mapping[str, Any]) -> str:
    h = doc.get("host") or {}
    bits = [
        f"QEMU {h['qemu']}" if h.get("qemu") else "",
        f"guest {h['guest_kernel']}" if h.get("guest_kernel") else "",
        h.get("accel", ""),
        f"{h['cpus']} host CPUs" if h.get("cpus") else "",
        f"started {h['started']}" if h.get("started") else "",
    ]
    return ", ".join(b for b in bits if b)


def plot_bytes(doc: Mapping[str, Any], path: Path, source: str) -> Path:
    """Grouped bars of the median bytes per workload and mode (runs with a good destination, as the
    suite's summary), each run as a dot (x: destination check failed), the lower bound as a line."""
    from matplotlib.figure import Figure

    runs = [r for r in doc["runs"] if r.get("bytes") is not None]
    if not runs:
        raise NothingToPlot(f"{source}: no run has a byte count")
    workloads, modes = _workloads(doc["runs"]), _modes(doc["runs"])
    width = 0.8 / len(modes)
    fig = Figure(figsize=(min(16.0, max(9.0, 0.7 * len(workloads) * len(modes))), 6.5), layout="constrained")
    ax = fig.subplots()
    for j, mode in enumerate(modes):
        xs, meds = [], []
        for i, w in enumerate(workloads):
            rs = [r for r in doc["runs"] if r["workload"] == w and r["mode"] == mode]
            if not rs:
                continue
            x = i - 0.4 + width * (j + 0.5)
            med = _median([r["bytes"] for r in rs if r.get("destination_ok") and r.get("bytes") is not None])
            if med is not None:
                xs.append(x)
                meds.append(med / MIB)
            for k, r in enumerate(rs):
                dx = (k - (len(rs) - 1) / 2) * width / 6
                if r.get("bytes") is None:
                    continue
                ok = bool(r.get("destination_ok"))
                ax.plot(
                    x + dx,
                    r["bytes"] / MIB,
                    "o" if ok else "x",
                    color="black" if ok else "red",
                    ms=4,
                    zorder=3,
                )
            failed = sum(1 for r in rs if r.get("bytes") is None or not r.get("destination_ok"))
            if failed:
                ax.annotate(
                    f"{failed}/{len(rs)}\nfailed",
                    (x, 0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="red",
                )
        ax.bar(xs, meds, width * 0.95, color=MODE_COLORS.get(mode, "tab:purple"), label=f"{mode} (median)")
    for i, w in enumerate(workloads):
        lb = _median([r.get("lower_bound_bytes") for r in doc["runs"] if r["workload"] == w])
        if lb is not None:
            ax.hlines(
                lb / MIB,
                i - 0.45,
                i + 0.45,
                colors="black",
                linestyles="--",
                lw=1.2,
                label="lower bound (pages allocated at start, median)" if i == 0 else "_nolegend_",
            )
    ax.plot([], [], "o", color="black", ms=4, label="one run")
    if any(r.get("destination_ok") is False for r in runs):
        ax.plot([], [], "x", color="red", ms=4, label="one run, destination check failed")
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_xlabel("workload")
    ax.set_ylabel("MiB on the wire (log scale)")
    ax.set_title(
        f"Bytes on the wire per workload and mode ({source})\n"
        "fph: data plane + QEMU device state; native/none: QEMU ram.transferred. Medians over runs with a "
        f"good destination.\n{_host_line(doc)}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def _caps_label(caps: set[int]) -> str:
    capped = sorted(caps - {0})
    if not capped:
        return "no cap"
    return (
        "cap " + ", ".join(f"{c / MIB:.0f}" for c in capped) + " MiB/s" + (" (and none)" if 0 in caps else "")
    )


MIN_SEND_MS = 100.0
"""A round's average rate is shown only when it sent for at least the cap's window (100 ms): a 2 ms round
is one burst, which the pacer allows and which says nothing about the cap."""


def _round_rates(run: Mapping[str, Any]) -> list[tuple[int, float]]:
    """(round, bytes_on_wire / send_ms) of a run's rounds that sent for at least MIN_SEND_MS."""
    return [
        (int(r["round"]), r["bytes_on_wire"] / (r["send_ms"] / 1e3))
        for r in run.get("fph_rounds") or []
        if r.get("send_ms", 0) >= MIN_SEND_MS and r.get("bytes_on_wire") is not None
    ]


def plot_rate(doc: Mapping[str, Any], path: Path, source: str) -> Path:
    """Each run's max 100 ms window rate (and 1 s window where recorded) against its cap; capped fph runs'
    per-round average rate as a second panel. The JSON holds one maximum per run: no per-window series."""
    from matplotlib.figure import Figure

    runs = [r for r in doc["runs"] if r.get("max_window_rate_bps") is not None]
    if not runs:
        raise NothingToPlot(f"{source}: no run has max_window_rate_bps")
    workloads, modes = _workloads(doc["runs"]), _modes(doc["runs"])
    capped_fph = [
        r for r in doc["runs"] if r["mode"] in FPH_MODES and r.get("bandwidth_cap_bps") and _round_rates(r)
    ]
    fig = Figure(figsize=(11, 9 if capped_fph else 5.5), layout="constrained")
    axes = fig.subplots(2 if capped_fph else 1, 1, squeeze=False)[:, 0]
    ax = axes[0]
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        color = MODE_COLORS.get(mode, "tab:purple")
        for i, w in enumerate(workloads):
            x = i - 0.4 + width * (j + 0.5)
            for r in (r for r in runs if r["workload"] == w and r["mode"] == mode):
                approx = "approx" in str(r.get("max_window_rate_source") or "")
                ax.plot(
                    x, r["max_window_rate_bps"] / MIB, "o", ms=5, color=color, mfc="none" if approx else color
                )
                if r.get("max_window_rate_1s_bps"):
                    ax.plot(x, r["max_window_rate_1s_bps"] / MIB, "v", ms=5, color=color, mfc="none")
        ax.plot([], [], "o", color=color, label=mode)
    caps = {
        w: {r.get("bandwidth_cap_bps") or 0 for r in doc["runs"] if r["workload"] == w} for w in workloads
    }
    for i, w in enumerate(workloads):
        for cap in caps[w] - {0}:
            ax.hlines(cap / MIB, i - 0.45, i + 0.45, colors="red", lw=1.5)
            ax.hlines(1.05 * cap / MIB, i - 0.45, i + 0.45, colors="red", lw=0.8, linestyles=":")
    ax.plot([], [], "-", color="red", label="cap (bandwidth_cap_bps)")
    ax.plot([], [], ":", color="red", label="1.05 × cap (fph_cap_held target)")
    ax.plot([], [], "o", color="black", mfc="none", label="hollow: native/none approximation (polled)")
    ax.plot([], [], "v", color="black", mfc="none", label="max 1 s window (where recorded)")
    labels = [w + "\n" + _caps_label(caps[w]) for w in workloads]
    ax.set_xticks(range(len(workloads)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("MiB/s (log scale)")
    sources = sorted({str(r["max_window_rate_source"]) for r in runs if r.get("max_window_rate_source")})
    where = (
        "; ".join(sources)
        if sources
        else "fph: at its sender's socket; native/none: query-migrate polled every 50 ms"
    )
    ax.set_title(
        f"Max wire rate over a 100 ms window, one figure per run ({source})\nMeasured: {where}",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower left", ncols=2)
    if capped_fph:
        ax2 = axes[1]
        for r in capped_fph:
            pts = _round_rates(r)
            ax2.plot(
                [p[0] for p in pts],
                [p[1] / MIB for p in pts],
                "o-",
                ms=3,
                lw=1,
                label=f"{r['workload']} {r['mode']} #{r['run']}"
                + ("" if r.get("destination_ok") else " (failed)"),
            )
        for cap in sorted({r["bandwidth_cap_bps"] for r in capped_fph}):
            ax2.axhline(cap / MIB, color="red", lw=1.5)
        ax2.set_xlabel("round")
        ax2.set_ylabel("MiB/s (round average)")
        ax2.set_title(
            "Capped fph runs: each round's bytes_on_wire / send_ms, rounds that sent for at least "
            f"{MIN_SEND_MS:.0f} ms (an average over the round, not a 100 ms window); red: the cap",
            fontsize=9,
        )
        ax2.legend(fontsize=7, ncols=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def _representative(runs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The median-bytes run of those with a good destination, else the first (a failed run still shows)."""
    ok = sorted(
        (r for r in runs if r.get("destination_ok") and r.get("bytes") is not None), key=lambda r: r["bytes"]
    )
    if ok:
        return ok[(len(ok) - 1) // 2]
    return runs[0] if runs else None


def plot_wire(doc: Mapping[str, Any], path: Path, source: str) -> Path:
    """Per workload, the wire rate over time (100 ms windows of the veth counter) of one run per mode, with
    the cap and 1.05 x cap: the cap held at the wire, and how long each mode kept the link busy."""
    from matplotlib.figure import Figure

    runs = [r for r in doc["runs"] if r.get("wire_samples")]
    if not runs:
        raise NothingToPlot(f"{source}: no run has wire_samples")
    workloads, modes = _workloads(runs), _modes(runs)
    fig = Figure(figsize=(11, 3.6 * len(workloads)), layout="constrained")
    axes = fig.subplots(len(workloads), 1, squeeze=False)[:, 0]
    for ax, w in zip(axes, workloads, strict=True):
        for mode in modes:
            run = _representative([r for r in runs if r["workload"] == w and r["mode"] == mode])
            if run is None:
                continue
            pts = run["wire_samples"]
            windows = [
                (b[0], (b[1] - a[1]) / (b[0] - a[0]) / MIB) for a, b in itertools.pairwise(pts) if b[0] > a[0]
            ]
            ok = "" if run.get("destination_ok") else ", destination check failed"
            ax.step(
                [t for t, _ in windows],
                [r for _, r in windows],
                where="post",
                lw=1,
                color=MODE_COLORS.get(mode, "tab:purple"),
                label=f"{mode} #{run['run']}: {(run.get('wire_bytes') or 0) / MIB:.0f} MiB at the wire, "
                f"running after {run.get('resumed_wall_s')} s{ok}",
            )
        caps = {r.get("bandwidth_cap_bps") or 0 for r in runs if r["workload"] == w} - {0}
        for cap in sorted(caps):
            ax.axhline(cap / MIB, color="red", lw=1.2)
            ax.axhline(1.05 * cap / MIB, color="red", lw=0.8, ls=":")
        ax.plot([], [], "-", color="red", label="cap (bandwidth_cap_bps); dotted: 1.05 x cap")
        ax.set_title(f"{w}: wire rate, 100 ms windows, from Migrate to the destination running", fontsize=9)
        ax.set_xlabel("seconds from Migrate")
        ax.set_ylabel("MiB/s at the wire")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"Wire rate against the cap ({source}): {runs[0].get('max_window_rate_source', '')}", fontsize=10
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def run_plot(run: Mapping[str, Any], source: str) -> MigrationPlot:
    """A bench run as the input of fph's per-migration plot (the daemon report's fields, from the run's)."""
    from fph.report_plot import MigrationPlot

    name = f"{run['workload']} {run['mode']} #{run['run']}"
    if not run.get("fph_rounds"):
        why = "QEMU's precopy: no fph rounds" if run["mode"] not in FPH_MODES else "no fph_rounds recorded"
        raise NothingToPlot(f"{source}: {name}: {why}")
    fph = run.get("fph") or {}
    if run.get("error"):
        outcome = f"failed: {run['error'][:100]}"
    else:
        outcome = (
            f"{(run.get('bytes') or 0) / MIB:.1f} MiB on the wire in {run.get('total_s')} s, downtime "
            f"{run.get('downtime_ms')} ms (predicted {run.get('predicted_downtime_ms')})"
        )
    cap = run.get("bandwidth_cap_bps") or 0
    return MigrationPlot(
        title=(
            f"{name} ({source}): {outcome}\n{run.get('mem_mib')} MiB guest, cap "
            f"{f'{cap / MIB:.0f} MiB/s' if cap else 'none'}, hinting {run.get('hinting')}, "
            f"first hint run {fph.get('first_hint_run', 'not recorded')}"
        ),
        rounds=[dict(r) for r in run["fph_rounds"]],
        downtime_breakdown_ms=run.get("downtime_breakdown_ms") or None,
        unplug_ms=fph.get("unplug_ms"),
        decisions=list(run.get("decisions") or []),
        total_ms=None if run.get("total_s") is None else float(run["total_s"]) * 1e3,
    )


def plot_run(run: Mapping[str, Any], path: Path, source: str) -> Path:
    from fph.report_plot import plot_migration

    return plot_migration(run_plot(run, source), path)


def representative_runs(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Per workload and fph mode, one run: the median-bytes one of those with a good destination, else the
    first with rounds (a failed run is still worth seeing)."""
    out = []
    for w in _workloads(runs):
        for mode in FPH_MODES:
            run = _representative(
                [r for r in runs if r["workload"] == w and r["mode"] == mode and r.get("fph_rounds")]
            )
            if run is not None:
                out.append(run)
    return out


def plot_all(
    doc: Mapping[str, Any], out: Path, stem: str, source: str, every_run: bool = False
) -> tuple[list[Path], list[str]]:
    """Every figure of a result: the paths written and, for each figure skipped, why."""
    written: list[Path] = []
    skipped: list[str] = []
    jobs: list[tuple[Any, Any, Path]] = [
        (plot_bytes, doc, out / f"{stem}-bytes.png"),
        (plot_rate, doc, out / f"{stem}-rate.png"),
        (plot_wire, doc, out / f"{stem}-wire.png"),
    ]
    runs = (
        [r for r in doc["runs"] if r["mode"] in FPH_MODES] if every_run else representative_runs(doc["runs"])
    )
    jobs += [(plot_run, r, out / f"{stem}-rounds-{r['workload']}-{r['mode']}-r{r['run']}.png") for r in runs]
    for fn, data, path in jobs:
        try:
            written.append(fn(data, path, source))
        except NothingToPlot as e:
            skipped.append(str(e))
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path, help="a policy_bench.py or twohost_bench.py --json result")
    ap.add_argument(
        "--out", type=Path, default=None, help="directory for the PNGs (default: beside the JSON)"
    )
    ap.add_argument(
        "--every-run",
        action="store_true",
        help="a rounds plot for every fph run, not one per workload and mode",
    )
    args = ap.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print("plots: matplotlib is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    try:
        doc = load(args.json)
    except (OSError, ValueError) as e:
        print(f"plots: {e}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else args.json.parent
    written, skipped = plot_all(doc, out, args.json.stem, args.json.name, args.every_run)
    for path in written:
        print(path)
    for why in skipped:
        print(f"plots: skipped: {why}", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
