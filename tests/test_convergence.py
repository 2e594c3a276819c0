"""The convergence policy (sans-IO) and the vCPU throttle (a real cgroup v1 cpu group on a busy thread)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fph.migration.convergence import (
    Convergence,
    ConvergenceConfig,
    FixedCosts,
    OutDirtyPolicy,
    RoundMeasure,
    Verdict,
)
from fph.migration.throttle import CPU_V1, ThrottleUnavailableError, VcpuThrottle

MiB = 1 << 20
PAGES_PER_MIB = MiB // 4096


def measure(
    dirty_mib_s: float, wire_mib_s: float, pending_mib: float = 0.0, interval: float = 1.0
) -> RoundMeasure:
    return RoundMeasure(
        dirtied_pages=int(dirty_mib_s * interval * PAGES_PER_MIB),
        dirty_interval_s=interval,
        bytes_sent=int(wire_mib_s * interval * MiB),
        send_s=interval,
        pending_pages=int(pending_mib * PAGES_PER_MIB),
        since_harvest_s=interval,
    )


def test_idle_guest_switches_over_once_the_pages_left_are_settled() -> None:
    """An idle guest's round leaves 0.5 MiB (4 ms at the link's rate): that fits the limit, but one more
    round while the guest runs takes it out of the stop window; after a short round, switch over."""
    c = Convergence(ConvergenceConfig(downtime_limit_ms=300), FixedCosts(), bandwidth=128 * MiB)
    first = c.after_round(measure(0.5, 128), elapsed_s=2)
    assert first.verdict is Verdict.ITERATE and first.predicted_downtime_ms < 300, first.reason
    assert "still shrink" in first.reason
    d = c.after_round(measure(0.5, 128, pending_mib=0.01, interval=0.01), elapsed_s=2.01)
    assert d.verdict is Verdict.SWITCH_OVER and d.predicted_downtime_ms < FixedCosts().downtime_ms() + 2


def test_a_guest_that_keeps_its_pages_left_switches_over_when_they_stop_shrinking() -> None:
    """A guest that dirties the same small amount every round: more rounds do not lower it, so the policy
    switches over as soon as the pages left stop halving, even above the settled margin."""
    c = Convergence(ConvergenceConfig(downtime_limit_ms=300), FixedCosts(), bandwidth=128 * MiB)
    same = measure(1, 128, pending_mib=1, interval=0.5)
    verdicts = [c.after_round(same, elapsed_s=i).verdict for i in range(3)]
    assert verdicts[:2] == [Verdict.ITERATE, Verdict.SWITCH_OVER], verdicts


def test_fixed_costs_over_the_limit_switch_over_once_the_rest_is_settled() -> None:
    """The switchover check of a large guest's zero pages can alone exceed the limit: more rounds cannot
    lower it, so the limit bounds the rest (pages left, what the guest dirties until it stops); the policy
    switches over once that fits and no longer shrinks, and says why (the report then lists the actual
    downtime over the limit as an error); it neither fails nor throttles the guest for the fixed part."""
    costs = FixedCosts(unplug_ms=0, final_harvest_ms=2, recheck_ms=400, device_state_ms=15)
    c = Convergence(ConvergenceConfig(downtime_limit_ms=300), costs, bandwidth=128 * MiB)
    first = c.after_round(measure(0.5, 128, pending_mib=200), elapsed_s=2)
    assert first.verdict is Verdict.ITERATE  # 200 MiB left: 1.6 s more than the fixed costs
    d = c.after_round(measure(0.5, 128, pending_mib=0.01, interval=0.01), elapsed_s=3)
    assert d.verdict is Verdict.SWITCH_OVER and d.throttle_pct == 0
    assert "fixed costs alone" in d.reason and "400 ms" in d.reason, d.reason


def test_fixed_costs_over_the_limit_do_not_let_a_writer_through() -> None:
    """With the fixed costs over the limit, a guest that keeps 100 MiB dirty (over the limit at the link's
    rate) is still iterated and throttled, not switched over because its pages stopped shrinking."""
    costs = FixedCosts(unplug_ms=0, final_harvest_ms=2, recheck_ms=400, device_state_ms=15)
    c = Convergence(ConvergenceConfig(downtime_limit_ms=300), costs, bandwidth=128 * MiB)
    verdicts = [c.after_round(measure(60, 128, pending_mib=100), elapsed_s=2 + i).verdict for i in range(5)]
    assert Verdict.SWITCH_OVER not in verdicts and c.throttle_pct > 0, (verdicts, c.throttle_pct)


def test_prediction_counts_pending_and_what_the_guest_dirties_until_stop() -> None:
    costs = FixedCosts(unplug_ms=100, final_harvest_ms=0, recheck_ms=0, device_state_ms=0)
    c = Convergence(ConvergenceConfig(), costs, bandwidth=100 * MiB)
    m = measure(10, 100, pending_mib=10, interval=0.5)  # 10 MiB/s dirty; 0.5 s since the harvest
    # left = 10 MiB + 10 MiB/s * (0.5 + 0.1) s = 16 MiB, at 100 MiB/s = 160 ms
    assert c.predict_ms(m, 10 * PAGES_PER_MIB, 100 * PAGES_PER_MIB, 100 * MiB) == pytest.approx(160, rel=1e-3)


def test_pages_left_that_hold_data_are_predicted_at_the_wire_rate_not_the_marker_rate() -> None:
    """The measured miss: a round of zero pages runs at millions of pages/s, then the data pages left were
    predicted at that rate. The sampled mix of the pages left decides their cost."""
    costs = FixedCosts(unplug_ms=0, final_harvest_ms=0, recheck_ms=0, device_state_ms=0)
    c = Convergence(ConvergenceConfig(downtime_limit_ms=300), costs, bandwidth=100 * MiB)
    zero_round = RoundMeasure(
        dirtied_pages=15_000, dirty_interval_s=0.45, bytes_sent=4 * MiB, send_s=0.45,
        pending_pages=15_000, since_harvest_s=0.0, pages_sent=944_000,
    )  # fmt: skip
    page_pps = 944_000 / 0.45
    blind = c.predict_ms(zero_round, 0, page_pps, 100 * MiB)
    assert blind < 10  # the old prediction: 15k pages at the zero-page rate
    data = dataclasses.replace(zero_round, pending_data_fraction=1.0)
    # 15k data pages = 58.6 MiB at 100 MiB/s: 586 ms, over the limit: iterate, not switch over
    assert c.predict_ms(data, 0, page_pps, 100 * MiB) == pytest.approx(586, rel=0.01)
    assert c.after_round(data, elapsed_s=1).verdict is Verdict.ITERATE
    markers = dataclasses.replace(zero_round, pending_data_fraction=0.0)
    assert c.predict_ms(markers, 0, page_pps, 100 * MiB) == pytest.approx(blind)


def simulate(
    c: Convergence, dirty_mib_s: float, wire_mib_s: float, rounds: int = 60
) -> list[tuple[Verdict, int]]:
    """A precopy against a guest that dirties ``dirty_mib_s`` (scaled down by the throttle): each round sends
    what the previous one left, taking pending / wire; the guest dirties meanwhile, and the harvest that
    ends the round finds it."""
    seen = []
    left = 900.0  # MiB dirty when round 0 starts
    elapsed = 0.0
    for _ in range(rounds):
        send_s = max(left / wire_mib_s, 0.005)
        rate = dirty_mib_s * (100 - c.throttle_pct) / 100
        dirtied = rate * send_s
        m = RoundMeasure(
            dirtied_pages=int(dirtied * PAGES_PER_MIB),
            dirty_interval_s=send_s,
            bytes_sent=int(left * MiB),
            send_s=send_s,
            pending_pages=int(dirtied * PAGES_PER_MIB),
            since_harvest_s=0.001,
        )
        elapsed += send_s
        d = c.after_round(m, elapsed_s=elapsed)
        seen.append((d.verdict, d.throttle_pct))
        if d.verdict is not Verdict.ITERATE:
            break
        left = dirtied
    return seen


def test_a_fast_writer_is_throttled_harder_until_it_converges() -> None:
    c = Convergence(ConvergenceConfig(out_dirty_policy=OutDirtyPolicy.THROTTLE), bandwidth=128 * MiB)
    seen = simulate(c, 200, 128)
    throttles = [t for _v, t in seen]
    assert throttles[:2] == [20, 30] and throttles == sorted(throttles)
    assert seen[-1][0] is Verdict.SWITCH_OVER and c.out_dirtied


def test_a_slower_writer_converges_without_throttle() -> None:
    c = Convergence(ConvergenceConfig(out_dirty_policy=OutDirtyPolicy.THROTTLE), bandwidth=128 * MiB)
    seen = simulate(c, 40, 128)
    assert seen[-1][0] is Verdict.SWITCH_OVER and all(t == 0 for _v, t in seen) and len(seen) > 2


def test_rates_count_pages_so_marker_rounds_do_not_look_out_dirtied() -> None:
    """A poisoned guest: 200 MiB/s of pages dirtied, each one a fill marker. The round handled 1 GiB/s
    of pages while only 2 MiB went on the wire: the guest does not out-dirty the link, no throttle."""
    c = Convergence(ConvergenceConfig(out_dirty_policy=OutDirtyPolicy.FAIL), bandwidth=128 * MiB)
    m = RoundMeasure(
        dirtied_pages=200 * PAGES_PER_MIB,
        dirty_interval_s=1.0,
        bytes_sent=2 * MiB,
        send_s=0.25,
        pending_pages=200 * PAGES_PER_MIB,
        since_harvest_s=0.01,
        pages_sent=256 * PAGES_PER_MIB,
    )
    d = c.after_round(m, elapsed_s=1)
    assert d.verdict is not Verdict.FAIL and d.throttle_pct == 0
    assert d.page_rate_pps == pytest.approx(1024 * PAGES_PER_MIB)
    # the same round counted as data pages at the wire rate would have been out-dirtied
    c2 = Convergence(ConvergenceConfig(out_dirty_policy=OutDirtyPolicy.FAIL), bandwidth=128 * MiB)
    m2 = RoundMeasure(**{**m.__dict__, "pages_sent": None, "bytes_sent": 128 * MiB, "send_s": 1.0})
    assert c2.after_round(m2, elapsed_s=1).verdict is Verdict.FAIL


def test_fail_policy_fails_with_a_reason() -> None:
    c = Convergence(ConvergenceConfig(out_dirty_policy=OutDirtyPolicy.FAIL), bandwidth=128 * MiB)
    d = c.after_round(measure(200, 128), elapsed_s=1)
    assert d.verdict is Verdict.FAIL and "200 MiB/s" in d.reason and "source keeps running" in d.reason


def test_iterate_policy_gives_up_at_the_budget() -> None:
    c = Convergence(ConvergenceConfig(out_dirty_policy="iterate", time_budget_s=10), bandwidth=128 * MiB)
    assert c.after_round(measure(200, 128), elapsed_s=5).verdict is Verdict.ITERATE
    d = c.after_round(measure(200, 128), elapsed_s=10)
    assert d.verdict is Verdict.FAIL and "within 10 s" in d.reason


def test_a_stalled_migration_counts_as_out_dirtied() -> None:
    c = Convergence(ConvergenceConfig(out_dirty_policy=OutDirtyPolicy.FAIL, stalled_rounds=2))
    for r in range(2):
        assert c.after_round(measure(50, 1000, pending_mib=900), elapsed_s=r).verdict is Verdict.ITERATE
    assert c.after_round(measure(50, 1000, pending_mib=950), elapsed_s=3).verdict is Verdict.FAIL


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        ConvergenceConfig(out_dirty_policy="sometimes")
    with pytest.raises(ValueError):
        ConvergenceConfig(downtime_limit_ms=0)


def _cpu_s(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not (CPU_V1 / "cpu.cfs_quota_us").exists(), reason="no cgroup v1 cpu controller")
def test_throttle_caps_a_busy_thread_and_releases_it() -> None:
    code = "import threading,sys\nt=threading.Thread(target=lambda: [0 for _ in iter(int, 1)])\nt.start()\n"
    code += "print(t.native_id, flush=True)\nt.join()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tid = int(proc.stdout.readline())
        th = VcpuThrottle(proc.pid, [tid], "test")
        th.set(80)  # 20% of a CPU left
        group = CPU_V1 / f"fph-throttle-test-{proc.pid}"
        assert str(tid) in (group / "tasks").read_text().split()
        c0, t0 = _cpu_s(proc.pid, tid), time.monotonic()
        time.sleep(1.5)
        share = (_cpu_s(proc.pid, tid) - c0) / (time.monotonic() - t0)
        assert share < 0.3, share
        assert th.release() == []
        assert not group.exists()
        c0, t0 = _cpu_s(proc.pid, tid), time.monotonic()
        time.sleep(1.0)
        free_share = (_cpu_s(proc.pid, tid) - c0) / (time.monotonic() - t0)
        assert free_share > share * 1.5, (share, free_share)
    finally:
        proc.kill()
        proc.wait(5)


def test_throttle_without_cgroup_v1_says_so(tmp_path: Path) -> None:
    with pytest.raises(ThrottleUnavailableError, match="cgroup v1"):
        VcpuThrottle(1, [1], "x", root=tmp_path)


def test_vcpu_threads_names_qemus_pid() -> None:
    import threading

    from fph.migration.throttle import ThrottleError, vcpu_threads

    assert vcpu_threads([{"cpu-index": 0, "thread-id": threading.get_native_id()}]) == (
        os.getpid(),
        [threading.get_native_id()],
    )
    with pytest.raises(ThrottleError, match="no vCPU thread"):
        vcpu_threads([{"cpu-index": 0}])


def test_a_fitting_but_long_stop_gets_one_more_round_while_it_still_shrinks() -> None:
    """A poisoned guest re-dirties its freed memory after DONE: the prediction fits the limit, but another
    round with the guest running makes the stop short; once the pages left stop halving, switch."""
    costs = FixedCosts(unplug_ms=0, final_harvest_ms=1, recheck_ms=5, device_state_ms=10)
    c = Convergence(ConvergenceConfig(downtime_limit_ms=300), costs, bandwidth=1000 * MiB)
    d = c.after_round(measure(0, 1000, pending_mib=120, interval=0.5), elapsed_s=1)
    assert d.verdict is Verdict.ITERATE and 100 < d.predicted_downtime_ms <= 300 and "shrink" in d.reason
    d = c.after_round(measure(0, 1000, pending_mib=1, interval=0.5), elapsed_s=2)
    assert d.verdict is Verdict.SWITCH_OVER and d.predicted_downtime_ms < 30
    c = Convergence(ConvergenceConfig(downtime_limit_ms=300), costs, bandwidth=1000 * MiB)
    c.after_round(measure(0, 1000, pending_mib=120, interval=0.5), elapsed_s=1)
    d = c.after_round(measure(0, 1000, pending_mib=100, interval=0.5), elapsed_s=2)  # no longer halving
    assert d.verdict is Verdict.SWITCH_OVER
