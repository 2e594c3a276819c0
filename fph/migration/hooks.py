"""Hook points of a precopy migration, as QEMU's balloon sees them through its precopy notifier
(``PRECOPY_NOTIFY_SETUP``, ``BEFORE_BITMAP_SYNC``, ``AFTER_BITMAP_SYNC``, ``COMPLETE``, ``CLEANUP``).

In native mode they are *observed* from QEMU's ``MIGRATION``/``MIGRATION_PASS`` events (``MIGRATION_PASS`` is
emitted inside the bitmap sync, so each pass yields BEFORE_SYNC then AFTER_SYNC with QEMU's event
timestamp); in fph mode fph drives them itself and emits them through the same :class:`HookDispatcher`.
"""

from __future__ import annotations

import enum
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# QEMU's default max-bandwidth is 128 MiB/s; fph always sets it explicitly. "Unlimited" = 1 TiB/s.


class HookPoint(enum.Enum):
    """QEMU's precopy notifier points, as fph events."""

    SETUP = "setup"
    BEFORE_SYNC = "before-sync"
    AFTER_SYNC = "after-sync"
    COMPLETE = "complete"
    CLEANUP = "cleanup"


@dataclass(frozen=True)
class HookEvent:
    """A hook point reached. ``sync``: dirty-bitmap sync number (1 = first); ``time``: host wall clock (s);
    ``observed``: True when inferred from QEMU events (native mode), False when fph drove it."""

    point: HookPoint
    sync: int
    time: float
    observed: bool = True


HookListener = Callable[[HookEvent], Awaitable[None] | None]


class HookDispatcher:
    """Calls every registered listener, in order, for each hook event; keeps the history."""

    def __init__(self, listeners: Iterable[HookListener] = ()) -> None:
        self.listeners: list[HookListener] = list(listeners)
        self.history: list[HookEvent] = []

    def register(self, listener: HookListener) -> None:
        self.listeners.append(listener)

    async def emit(self, event: HookEvent) -> None:
        self.history.append(event)
        for listener in self.listeners:
            result = listener(event)
            if inspect.isawaitable(result):
                await result


def _event_time(event: Mapping[str, Any]) -> float:
    ts = event.get("timestamp") or {}
    if "seconds" in ts:
        return float(ts["seconds"]) + float(ts.get("microseconds", 0)) / 1e6
    return time.time()


def hooks_from_qemu_event(event: Mapping[str, Any], last_sync: int) -> list[HookEvent]:
    """Hook events implied by one QEMU event (native mode). ``last_sync``: the latest pass seen so far."""
    name = event.get("event")
    data = event.get("data") or {}
    t = _event_time(event)
    if name == "MIGRATION_PASS":
        n = int(data.get("pass", last_sync + 1))
        return [HookEvent(HookPoint.BEFORE_SYNC, n, t), HookEvent(HookPoint.AFTER_SYNC, n, t)]
    if name == "MIGRATION":
        status = data.get("status")
        if status == "setup":
            return [HookEvent(HookPoint.SETUP, 0, t)]
        if status == "active" and last_sync == 0:
            # The first bitmap sync runs inside setup; QEMU 11.1 sends no MIGRATION_PASS for it (7.2 did).
            return [HookEvent(HookPoint.BEFORE_SYNC, 1, t), HookEvent(HookPoint.AFTER_SYNC, 1, t)]
        if status == "completed":
            return [HookEvent(HookPoint.COMPLETE, last_sync, t), HookEvent(HookPoint.CLEANUP, last_sync, t)]
        if status in ("failed", "cancelled"):
            return [HookEvent(HookPoint.CLEANUP, last_sync, t)]
    return []


# libvirt job-stat name ← QEMU query-migrate field ("ram.x" = inside MigrationInfo.ram).
