"""The wait for a reporting guest's free memory to become holes: only while the passes seen could close
the gap in the time left (replays of what the 1 GiB and 4 GiB bench guests showed, and edges)."""

from __future__ import annotations

from fph.migration.reporting_wait import CatchUp, ReportingWait

MiB = 1 << 20


def replay(wait: ReportingWait, samples: list[tuple[float, int]]) -> tuple[CatchUp, float]:
    """The first verdict that is not WAIT over (elapsed s, bytes behind) samples, and when it came."""
    for t, behind in samples:
        verdict, why = wait.verdict(behind, t)
        assert why
        if verdict is not CatchUp.WAIT:
            return verdict, t
    return CatchUp.WAIT, samples[-1][0]


def every_quarter_second(
    start: int, per_pass: int, first_pass_s: float, until_s: float
) -> list[tuple[float, int]]:
    """A guest that reports ``per_pass`` bytes every 2 s from ``first_pass_s`` on."""
    out = []
    t = 0.0
    while t <= until_s:
        passes = 0 if t < first_pass_s else 1 + int((t - first_pass_s) // 2.0)
        out.append((t, max(0, start - passes * per_pass)))
        t += 0.25
    return out


def test_a_gap_one_pass_closes_is_waited_for() -> None:
    wait = ReportingWait(400 * MiB, 128 * MiB, 3.0)
    verdict, t = replay(wait, every_quarter_second(400 * MiB, 300 * MiB, 1.2, 3.0))
    assert verdict is CatchUp.CAUGHT_UP and t == 1.25


def test_a_gap_the_wait_cannot_close_gives_up_at_the_first_pass() -> None:
    """The 4 GiB guest: 1.1 GiB behind, ~256 MiB per pass: it used to wait the whole 3 s, then hint.
    Now it hints at the first whole pass."""
    wait = ReportingWait(1400 * MiB, 256 * MiB, 3.0)
    verdict, t = replay(wait, every_quarter_second(1400 * MiB, 256 * MiB, 0.6, 3.0))
    assert verdict is CatchUp.GIVE_UP and t == 1.0  # the sample after the pass: it was whole


def test_two_passes_that_will_close_it_are_waited_for() -> None:
    wait = ReportingWait(500 * MiB, 128 * MiB, 3.0)
    verdict, t = replay(wait, every_quarter_second(500 * MiB, 200 * MiB, 0.2, 3.0))
    assert verdict is CatchUp.CAUGHT_UP and t == 2.25


def test_no_pass_at_all_gives_up_before_the_wait_ends() -> None:
    wait = ReportingWait(900 * MiB, 128 * MiB, 3.0)
    verdict, t = replay(wait, [(t / 4, 900 * MiB) for t in range(13)])
    assert verdict is CatchUp.GIVE_UP and t == 2.5


def test_caught_up_at_once_and_the_wait_ending() -> None:
    assert ReportingWait(100 * MiB, 128 * MiB, 3.0).verdict(100 * MiB, 0.0)[0] is CatchUp.CAUGHT_UP
    assert ReportingWait(900 * MiB, 128 * MiB, 3.0).verdict(800 * MiB, 3.0)[0] is CatchUp.GIVE_UP


def test_a_pass_is_judged_once_it_is_whole() -> None:
    wait = ReportingWait(900 * MiB, 128 * MiB, 3.0)
    assert wait.verdict(700 * MiB, 0.01)[0] is CatchUp.WAIT  # right at the start, maybe not all of it
    verdict, why = wait.verdict(700 * MiB, 0.26)
    assert verdict is CatchUp.GIVE_UP and "~200 MiB per 2 s pass" in why and "1 pass(es) left" in why, why


def test_a_pass_seen_over_two_samples_counts_once() -> None:
    wait = ReportingWait(600 * MiB, 128 * MiB, 3.0)
    assert wait.verdict(600 * MiB, 0.0)[0] is CatchUp.WAIT
    assert wait.verdict(500 * MiB, 0.25)[0] is CatchUp.WAIT  # under way
    assert wait.verdict(350 * MiB, 0.5)[0] is CatchUp.WAIT  # the same pass, 250 MiB
    assert wait.verdict(350 * MiB, 0.75)[0] is CatchUp.WAIT  # whole: 250 MiB per pass closes 222 MiB
    assert wait.verdict(100 * MiB, 2.5)[0] is CatchUp.CAUGHT_UP
