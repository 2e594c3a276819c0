"""Bounded waits: the one loop behind every "until this holds, or until a deadline" in fph, its lab and tests.

``poll_until`` reads a value until ``until(value)`` holds or the time is up, and returns the last value read
(the caller decides what a timeout means: an error of its own, a problem in a report, nothing at all);
``wait_until`` does the same and raises :class:`TimeoutError` naming what it waited for; ``retry_until``
calls an action until it stops raising one of the given errors (connecting to a socket that may not exist
yet) and lets the last error through once the time is up. Each has an ``_async`` twin whose probe is a
coroutine function and which sleeps with ``asyncio.sleep``.

The probe always runs at least once, and once more after the last sleep, so a condition that comes true
at the very end of the time is still seen. A probe that raises (an error not retried) ends the wait at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _accepted(value: T, until: Callable[[T], object], what: str, timeout: float) -> T:
    """``value`` if ``until`` accepts it, else TimeoutError (with the value, unless it is a bool or None)."""
    if until(value):
        return value
    shown = "" if isinstance(value, bool) or value is None else f" (last: {value!r})"
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}{shown}")


def poll_until(
    probe: Callable[[], T], timeout: float, interval: float = 0.05, *, until: Callable[[T], object] = bool
) -> T:
    """Call ``probe`` every ``interval`` seconds until ``until`` accepts its value or ``timeout`` seconds
    have passed; return the last value (one ``until`` rejects if the time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(
    probe: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.05,
    *,
    until: Callable[[T], object] = bool,
) -> T:
    """:func:`poll_until`, raising ``TimeoutError("timed out after <timeout> s waiting for <what>")`` (with
    the last value read, unless it is a bool) if the time runs out; returns the accepted value."""
    return _accepted(poll_until(probe, timeout, interval, until=until), until, what, timeout)


def retry_until(
    action: Callable[[], T],
    timeout: float,
    retry_on: tuple[type[BaseException], ...],
    interval: float = 0.05,
) -> T:
    """Call ``action`` until it returns without raising one of ``retry_on``; return what it returned. Once
    ``timeout`` seconds have passed, the error of the last call propagates."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except retry_on:
            if time.monotonic() >= deadline:
                raise
        time.sleep(interval)


async def poll_until_async(
    probe: Callable[[], Awaitable[T]],
    timeout: float,
    interval: float = 0.05,
    *,
    until: Callable[[T], object] = bool,
) -> T:
    """:func:`poll_until` with a coroutine probe."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if until(value) or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(interval)


async def wait_until_async(
    probe: Callable[[], Awaitable[T]],
    timeout: float,
    what: str,
    interval: float = 0.05,
    *,
    until: Callable[[T], object] = bool,
) -> T:
    """:func:`wait_until` with a coroutine probe."""
    return _accepted(await poll_until_async(probe, timeout, interval, until=until), until, what, timeout)


async def retry_until_async(
    action: Callable[[], Awaitable[T]],
    timeout: float,
    retry_on: tuple[type[BaseException], ...],
    interval: float = 0.05,
) -> T:
    """:func:`retry_until` with a coroutine action."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await action()
        except retry_on:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(interval)
