"""fph.waiting: the bounded waits every poll loop in fph, its lab and tests goes through."""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import pytest

from fph.waiting import (
    poll_until,
    poll_until_async,
    retry_until,
    retry_until_async,
    wait_until,
    wait_until_async,
)


def test_poll_returns_the_first_accepted_value() -> None:
    n = itertools.count()
    assert poll_until(lambda: next(n), 5, 0) == 1  # 0 is falsy: asked again
    n = itertools.count()
    assert poll_until(lambda: next(n), 5, 0, until=lambda v: v >= 3) == 3


def test_poll_gives_up_with_the_last_value_and_reads_once_more_after_the_last_sleep() -> None:
    n = itertools.count()
    t0 = time.monotonic()
    last = poll_until(lambda: next(n), 0.2, 0.05, until=lambda v: v < 0)
    assert 0.2 <= time.monotonic() - t0 < 2
    assert last == next(n) - 1 >= 4  # the value read after the deadline passed


def test_poll_reads_at_least_once() -> None:
    assert poll_until(lambda: "ready", 0) == "ready"


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match=r"after 0.1 s waiting for the guest \(last: 'booting'\)$"):
        wait_until(lambda: "booting", 0.1, "the guest", 0.02, until=lambda s: s == "up")
    with pytest.raises(TimeoutError, match=r"waiting for a flag$"):  # a bool is not shown
        wait_until(lambda: False, 0.05, "a flag", 0.01)
    assert wait_until(lambda: 7, 1, "seven") == 7


def test_a_probe_error_ends_the_wait_at_once() -> None:
    def probe() -> bool:
        raise KeyError("gone")

    t0 = time.monotonic()
    with pytest.raises(KeyError):
        poll_until(probe, 10)
    assert time.monotonic() - t0 < 1


def test_retry_until_retries_only_the_listed_errors() -> None:
    calls = itertools.count()

    def connect() -> str:
        if next(calls) < 3:
            raise ConnectionRefusedError("not yet")
        return "connected"

    assert retry_until(connect, 5, (ConnectionRefusedError,), 0) == "connected"
    with pytest.raises(FileNotFoundError):  # the last error once the time is up
        retry_until(lambda: os.stat("/nonexistent/fph"), 0.05, (FileNotFoundError,), 0.01)

    def broken() -> None:
        raise ValueError("not retried")

    t0 = time.monotonic()
    with pytest.raises(ValueError):
        retry_until(broken, 10, (OSError,))
    assert time.monotonic() - t0 < 1


def test_async_twins() -> None:
    async def go() -> None:
        n = itertools.count()

        async def probe() -> int:
            return next(n)

        assert await poll_until_async(probe, 5, 0, until=lambda v: v == 2) == 2
        assert await poll_until_async(probe, 0.05, 0.01, until=lambda v: v < 0) > 2
        with pytest.raises(TimeoutError, match="waiting for minus one"):
            await wait_until_async(probe, 0.05, "minus one", 0.01, until=lambda v: v < 0)
        calls = itertools.count()

        async def connect() -> str:
            if next(calls) < 2:
                raise ConnectionRefusedError
            return "ok"

        assert await retry_until_async(connect, 5, (ConnectionRefusedError,), 0) == "ok"

    asyncio.run(go())
