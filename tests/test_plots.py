"""The bench plots (bench/plots.py) from a recorded policy_bench.py result, one migration's plot from a
daemon report (``fph migration report VM --plot``), and what happens without the data or without matplotlib:
a skip with a message, a one-line error, never an empty figure or a traceback."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import plots
from fph.report_plot import PlotError, plot_migration, report_plot

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "bench" / "results" / "policy_bench-quick.json"
MiB = 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return plots.load(QUICK)


def _run(doc: dict[str, Any], workload: str, mode: str) -> dict[str, Any]:
    return copy.deepcopy(next(r for r in doc["runs"] if r["workload"] == workload and r["mode"] == mode))


def assert_png(path: Path) -> None:
    """A real PNG of a plausible size: the magic bytes, then the IHDR chunk's width and height."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 400 <= width <= 2000 and 300 <= height <= 2000, (width, height)
    assert 10_000 < len(data) < 2_000_000, len(data)


def test_bytes_and_rate_plots(doc: dict[str, Any], tmp_path: Path) -> None:
    for fn, name in ((plots.plot_bytes, "b.png"), (plots.plot_rate, "r.png")):
        path = fn(doc, tmp_path / name, QUICK.name)
        assert path == tmp_path / name
        assert_png(path)


def test_fph_run_plot_completed_and_failed(doc: dict[str, Any], tmp_path: Path) -> None:
    ok = _run(doc, "memhog-exit", "fph")
    assert ok["destination_ok"] and ok["downtime_breakdown_ms"]
    assert_png(plots.plot_run(ok, tmp_path / "ok.png", QUICK.name))
    failed = _run(doc, "dirtier", "fph")  # failed at unplug: rounds, no stop window
    assert failed["error"] and failed["fph_rounds"] and not failed.get("downtime_breakdown_ms")
    m = plots.run_plot(failed, QUICK.name)
    assert not m.completed and m.live_rounds == m.rounds and "failed" in m.title
    assert_png(plots.plot_run(failed, tmp_path / "failed.png", QUICK.name))


def test_runs_without_rounds_are_skipped_with_a_message(doc: dict[str, Any], tmp_path: Path) -> None:
    native = _run(doc, "memhog-exit", "native")
    with pytest.raises(plots.NothingToPlot, match="memhog-exit native #0: QEMU's precopy: no fph rounds"):
        plots.plot_run(native, tmp_path / "native.png", QUICK.name)
    bare = _run(doc, "idle", "fph")
    del bare["fph_rounds"]
    with pytest.raises(plots.NothingToPlot, match="idle fph #0: no fph_rounds recorded"):
        plots.plot_run(bare, tmp_path / "bare.png", QUICK.name)
    assert list(tmp_path.iterdir()) == []

    # every fph run of a result, one without rounds among them: the others drawn, that one named
    small = {**doc, "runs": [bare, _run(doc, "poison", "fph"), native]}
    written, skipped = plots.plot_all(small, tmp_path, "s", "small.json", every_run=True)
    assert [p.name for p in written] == ["s-bytes.png", "s-rate.png", "s-rounds-poison-fph-r0.png"]
    assert skipped == [
        "small.json: no run has wire_samples",
        "small.json: idle fph #0: no fph_rounds recorded",
    ]
    for p in written:
        assert_png(p)

    # no rates recorded at all: the rate figure is skipped, not drawn empty
    no_rate = {"runs": [{**native, "max_window_rate_bps": None}]}
    with pytest.raises(plots.NothingToPlot, match="no run has max_window_rate_bps"):
        plots.plot_rate(no_rate, tmp_path / "rate.png", "x.json")
    assert not (tmp_path / "rate.png").exists()


def test_wire_plot_needs_samples_and_draws_one_run_per_mode(doc: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(plots.NothingToPlot, match="no run has wire_samples"):
        plots.plot_wire(doc, tmp_path / "w.png", QUICK.name)
    runs = []
    for mode, rate in (("fph", 100 * MiB), ("native", 110 * MiB)):
        run = _run(doc, "memhog-exit", mode)
        # twohost_bench's form: [seconds from Migrate, bytes since the first sample], every 100 ms
        run["wire_samples"] = [[i / 10, int(i * rate / 10)] for i in range(30)]
        run["max_window_rate_source"] = "source veth tx counter, 100 ms windows"
        runs.append(run)
    path = plots.plot_wire({**doc, "runs": runs}, tmp_path / "w.png", "twohost.json")
    assert_png(path)


def test_representative_run_is_the_median_good_one() -> None:
    def run(n: int, b: int | None, ok: bool) -> dict[str, Any]:
        return {
            "workload": "w",
            "mode": "fph",
            "run": n,
            "bytes": b,
            "destination_ok": ok,
            "fph_rounds": [{}],
        }

    runs = [run(0, None, False), run(1, 300, True), run(2, 100, True), run(3, 200, True)]
    assert [r["run"] for r in plots.representative_runs(runs)] == [3]
    assert [r["run"] for r in plots.representative_runs(runs[:1])] == [0]  # only a failed one: still shown


def test_cli_writes_beside_the_json_and_prints_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = json.loads(QUICK.read_text())
    d["runs"] = [r for r in d["runs"] if r["workload"] == "idle"]
    src = tmp_path / "res.json"
    src.write_text(json.dumps(d))
    assert plots.main([str(src)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / n) for n in ("res-bytes.png", "res-rate.png", "res-rounds-idle-fph-r0.png")]
    for p in out:
        assert_png(Path(p))


def _round(n: int, pages: int, overhead: int, **more: float) -> dict[str, Any]:
    return {"round": n, "pages_data": pages, "bytes_on_wire": pages * 4096 + overhead, **more}


def _report(**over: Any) -> dict[str, Any]:
    """GetMigrationReport as the client sees it (protobuf JSON names: int64 as strings, the full report in
    ``json``)."""
    full = {
        "mode": "fph",
        "status": "completed",
        "job_stats": {"memory_processed": 120 << 20, "time_elapsed": 900, "downtime": 31},
        "fph": {
            "unplug_ms": 40.0,
            "downtime_breakdown_ms": {"final_round": 5.0, "recheck": 12.0, "device_state": 9.0, "cont": 4.0},
            "decisions": [{"verdict": "switch-over", "predicted_downtime_ms": 30.0}],
        },
        "rounds": [
            _round(0, 25000, 9000, pages_fill=300, pages_zero_sent=0, pages_zero_skipped=200000,
                   hint_wait_ms=0.0, ready_wait_ms=20.0, send_ms=600.0, harvest_ms=3.0, ms=650.0),
            _round(1, 500, 400, pages_zero_skipped=10, send_ms=15.0, harvest_ms=1.0, ms=17.0),
            _round(2, 40, 80, send_ms=1.0, harvest_ms=0.5, ms=2.0),
        ],
    }  # fmt: skip
    rep = {
        "migration_id": "m-1",
        "vm": "a",
        "mode": "MODE_FPH",
        "status": "completed",
        "job_stats": {k: str(v) for k, v in full["job_stats"].items()},
        "rounds": [{"round": 0, "pages_data": "25000", "bytes_on_wire": "102409000", "ms": 650.0}],
        "error": "",
        "json": json.dumps(full),
    }
    return {**rep, **over}


def test_report_plot_from_the_daemon_report(tmp_path: Path) -> None:
    m = report_plot(_report())
    assert m.completed and len(m.live_rounds) == 2 and m.unplug_ms == 40.0 and m.total_ms == 900.0
    assert "a: migration m-1 (fph), completed" in m.title
    assert_png(plot_migration(m, tmp_path / "sub" / "report.png"))

    # no engine report (an older daemon, or the json field empty): the message's own rounds, no timing parts
    m = report_plot(_report(json=""))
    assert not m.completed and m.rounds[0]["pages_data"] == "25000" and m.total_ms == 900.0
    assert "json field is empty" in m.no_stop_window
    assert_png(plot_migration(m, tmp_path / "fallback.png"))


def test_report_without_rounds_is_an_error_not_an_empty_plot(tmp_path: Path) -> None:
    with pytest.raises(PlotError, match=r"migration m-2 of a \(native, completed\) has no fph rounds") as e:
        report_plot(_report(migration_id="m-2", mode="MODE_NATIVE", rounds=[], json="{}"))
    assert e.value.status == 1


def test_report_plot_without_matplotlib_is_one_line_and_status_2(tmp_path: Path) -> None:
    """Checked before the daemon is called: no daemon is needed to see it (the socket does not exist)."""
    argv = [
        "migration",
        "report",
        "a",
        "--plot",
        str(tmp_path / "p.png"),
        "--socket",
        str(tmp_path / "no.sock"),
    ]
    code = (
        "import sys\nsys.modules['matplotlib'] = None  # what an install without it looks like to import\n"
        f"from fph.cli import main\nsys.exit(main({argv!r}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("fph: --plot needs matplotlib") and "fph[bench]" in r.stderr
    assert r.stdout == "" and not (tmp_path / "p.png").exists()


def test_policy_bench_plot_option(
    doc: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--plot after a suite: the runs are the recorded ones (no guest is booted), the plots land beside the
    JSON; --plot without --json is refused before anything runs."""
    from bench import policy_bench as pb

    lab = SimpleNamespace(kernel_version="6.1", qemu=SimpleNamespace(package_version="test"))

    def run_one(lab: Any, w: Any, mode: str, index: int, bandwidth: Any, logs: Any) -> dict[str, Any]:
        return _run(doc, w.name, mode)

    monkeypatch.setattr(pb, "provision", lambda log: lab)
    monkeypatch.setattr(pb, "run_one", run_one)
    with pytest.raises(SystemExit) as e:
        pb.main(["--plot"])
    assert e.value.code == 2
    out = tmp_path / "suite.json"
    argv = ["--quick", "--workloads", "idle", "--modes", "fph,native", "--json", str(out), "--plot"]
    assert pb.main(argv) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["suite-bytes.png", "suite-rate.png", "suite-rounds-idle-fph-r0.png"]
    capsys.readouterr()
