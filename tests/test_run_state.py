"""fph_lab.run_state: the stop window as QEMU's STOP and RESUME events give it (the events themselves are
recorded by tests/test_twohost_guest.py's migrations and bench/twohost_bench.py)."""

from __future__ import annotations

from fph_lab.run_state import RunStateEvent, stop_to_resume_ms


def ev(name: str, t: float, status: str = "") -> RunStateEvent:
    return RunStateEvent(name, t, status)


def test_the_destinations_first_resume_minus_the_sources_last_stop_before_it() -> None:
    src = [ev("MIGRATION", 0.0, "active"), ev("STOP", 5.0), ev("RESUME", 5.5), ev("STOP", 9.0)]
    dst = [ev("MIGRATION", 0.0, "active"), ev("RESUME", 9.25), ev("STOP", 20.0), ev("RESUME", 21.0)]
    assert stop_to_resume_ms(src, dst) == 250.0  # the earlier stop (a pause) and later events do not count


def test_missing_events_give_none() -> None:
    assert stop_to_resume_ms([ev("STOP", 1.0)], []) is None  # the destination never ran
    assert stop_to_resume_ms([], [ev("RESUME", 2.0)]) is None
    assert stop_to_resume_ms([ev("STOP", 3.0)], [ev("RESUME", 2.0)]) is None  # a resume before any stop
