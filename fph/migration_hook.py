"""fph's QEMU side of a migration: QMP driving, hook points, and the migration report.

Native mode (:class:`NativeMigration`) is QEMU's own precopy with QEMU's own free page hinting: the
baseline for every fph number, and the path on any QEMU. QEMU's balloon hooks into precopy through its
notifier (``PRECOPY_NOTIFY_SETUP``, ``BEFORE_BITMAP_SYNC``, ``AFTER_BITMAP_SYNC``, ``COMPLETE``,
``CLEANUP``); fph expresses the same points as :class:`HookPoint` events. In native mode they are
*observed* from QEMU's ``MIGRATION``/``MIGRATION_PASS`` events (``MIGRATION_PASS`` is emitted inside the
bitmap sync, so each pass yields BEFORE_SYNC then AFTER_SYNC with QEMU's event timestamp); in fph mode fph
drives them itself and emits them through the same :class:`HookDispatcher`.

The report uses libvirt's job-stat names (``virDomainGetJobStats``) so orchestrators read fph's numbers
as they read libvirt's, and keeps QEMU's raw ``query-migrate`` answer beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fph.qmp import (
    MigrationCancelledError,
    MigrationError,
    MigrationTimeoutError,
    QMPCommandError,
    QMPConnection,
    QMPError,
)

# QEMU's default max-bandwidth is 128 MiB/s; fph always sets it explicitly. "Unlimited" = 1 TiB/s.
UNLIMITED_BANDWIDTH = 1 << 40
DEFAULT_DOWNTIME_LIMIT_MS = 300
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


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
JOB_STAT_FIELDS: dict[str, str] = {
    "memory_total": "ram.total",
    "memory_processed": "ram.transferred",
    "memory_remaining": "ram.remaining",
    "memory_constant": "ram.duplicate",
    "memory_normal": "ram.normal",
    "memory_normal_bytes": "ram.normal-bytes",
    "memory_dirty_rate": "ram.dirty-pages-rate",
    "memory_iteration": "ram.dirty-sync-count",
    "memory_page_size": "ram.page-size",
    "memory_postcopy_requests": "ram.postcopy-requests",
    "downtime": "downtime",
    "setup_time": "setup-time",
    "time_elapsed": "total-time",
}


def job_stats(info: Mapping[str, Any]) -> dict[str, int]:
    """libvirt job stats from a ``query-migrate`` answer; fields QEMU did not report are left out.

    ``memory_bps`` = ``ram.mbps`` × 10^6 / 8 (QEMU's mbps is megabits with M = 10^6), as libvirt does.
    """
    out: dict[str, int] = {}
    ram = info.get("ram") or {}
    for name, src in JOB_STAT_FIELDS.items():
        value = ram.get(src[4:]) if src.startswith("ram.") else info.get(src)
        if value is not None:
            out[name] = int(value)
    if ram.get("mbps") is not None:
        out["memory_bps"] = round(float(ram["mbps"]) * 1e6 / 8)
    return out


def figures_final(info: Mapping[str, Any]) -> bool:
    """True once a finished migration's figures are filled: QEMU reports ``completed`` slightly before it
    fills ``total-time`` and ``downtime`` (both 0 or absent on the first poll)."""
    status = info.get("status")
    if status not in FINAL_STATUSES:
        return False
    if status != "completed":
        return True
    return bool(info.get("total-time")) and "downtime" in info and "ram" in info


class JobStatsView:
    """Shortcuts over libvirt job stats, shared by every mode's report (QEMU-native and fph)."""

    job_stats: dict[str, int]
    hooks: list[HookEvent]

    @property
    def bytes(self) -> int:
        """Bytes on the wire (``memory_processed``; QEMU: ``ram.transferred``)."""
        return self.job_stats.get("memory_processed", 0)

    @property
    def normal_pages(self) -> int:
        return self.job_stats.get("memory_normal", 0)

    @property
    def zero_pages(self) -> int:
        return self.job_stats.get("memory_constant", 0)

    @property
    def total_ms(self) -> int:
        return self.job_stats.get("time_elapsed", 0)

    @property
    def downtime_ms(self) -> int:
        return self.job_stats.get("downtime", 0)

    @property
    def syncs(self) -> int:
        return self.job_stats.get("memory_iteration", 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        d["hooks"] = [{**asdict(h), "point": h.point.value} for h in self.hooks]
        return dict(d)


@dataclass
class MigrationReport(JobStatsView):
    """The outcome of one migration: libvirt-named stats, QEMU's raw answer, hooks, events."""

    mode: str
    status: str
    job_stats: dict[str, int]
    raw: dict[str, Any]
    hooks: list[HookEvent] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    parameters: dict[str, Any] = field(default_factory=dict)


class NativeMigration:
    """QEMU-native precopy between two QEMUs over QMP, with QEMU's own free page hinting if the source has
    ``virtio-balloon-pci,free-page-hint=on``.

    ``await NativeMigration(src_qmp, dst_qmp, "unix:/run/x/mig.sock").run()`` → :class:`MigrationReport`;
    raises :class:`fph.qmp.MigrationError` (QEMU's ``error-desc``) when the migration fails,
    :class:`fph.qmp.MigrationCancelledError` after :meth:`cancel`, :class:`fph.qmp.MigrationTimeoutError`
    (after cancelling) on timeout, :class:`fph.qmp.QMPCommandError` when QEMU refuses a command.
    The destination must run with ``-incoming defer``.
    """

    mode = "native"

    def __init__(
        self,
        src_qmp: str,
        dst_qmp: str,
        uri: str,
        *,
        max_bandwidth: int | None = None,
        downtime_limit_ms: int = DEFAULT_DOWNTIME_LIMIT_MS,
        capabilities: Mapping[str, bool] | None = None,
        hooks: Iterable[HookListener] = (),
    ) -> None:
        self.src_qmp = src_qmp
        self.dst_qmp = dst_qmp
        self.uri = uri
        self.max_bandwidth = UNLIMITED_BANDWIDTH if max_bandwidth is None else int(max_bandwidth)
        self.downtime_limit_ms = downtime_limit_ms
        self.capabilities = {"events": True, **(capabilities or {})}
        self.dispatcher = HookDispatcher(hooks)
        self._src: QMPConnection | None = None
        self._cancel_requested = False

    async def run(self, timeout: float = 600.0) -> MigrationReport:
        """Run the migration to its end and return the report (see the class docstring for errors)."""
        src = QMPConnection(self.src_qmp, "fph-migration-src")
        dst = QMPConnection(self.dst_qmp, "fph-migration-dst")
        await src.connect()
        try:
            await dst.connect()
            self._src = src
            return await self._run(src, dst, timeout)
        finally:
            self._src = None
            await src.close()
            await dst.close()

    async def cancel(self) -> None:
        """Ask QEMU to cancel the running migration; :meth:`run` then raises MigrationCancelledError."""
        self._cancel_requested = True
        if self._src is not None:
            await self._src.execute("migrate_cancel")

    async def _run(self, src: QMPConnection, dst: QMPConnection, timeout: float) -> MigrationReport:
        caps = [{"capability": k, "state": v} for k, v in self.capabilities.items()]
        params = {"downtime-limit": self.downtime_limit_ms, "max-bandwidth": self.max_bandwidth}
        for conn in (src, dst):
            await conn.execute("migrate-set-capabilities", {"capabilities": caps})
        await src.execute("migrate-set-parameters", params)
        await dst.execute("migrate-incoming", {"uri": self.uri})
        listener = src.listener(("MIGRATION", "MIGRATION_PASS"))
        events: list[dict[str, Any]] = []
        last_sync = 0
        t0 = time.monotonic()
        deadline = t0 + timeout
        try:
            await src.execute("migrate", {"uri": self.uri})
            status = "setup"
            while status not in FINAL_STATUSES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    await self._cancel_after_timeout(src, timeout)
                try:
                    event = await asyncio.wait_for(listener.get(), min(remaining, 1.0))
                except TimeoutError:
                    # Events can be missed only if QEMU never sends them; poll as a fallback.
                    info = await src.execute("query-migrate")
                    status = str(info.get("status", status))
                    continue
                msg: dict[str, Any] = dict(event)
                ev: dict[str, Any] = {
                    "event": msg["event"],
                    "data": dict(msg.get("data") or {}),
                    "timestamp": dict(msg.get("timestamp") or {}),
                }
                events.append(ev)
                for hook in hooks_from_qemu_event(ev, last_sync):
                    last_sync = max(last_sync, hook.sync)
                    await self.dispatcher.emit(hook)
                if ev["event"] == "MIGRATION":
                    status = str(ev["data"].get("status"))
        finally:
            src.remove_listener(listener)
        wall = time.monotonic() - t0
        info = await self._final_info(src)
        status = str(info.get("status"))
        if status == "cancelled":
            raise MigrationCancelledError(status, info.get("error-desc"), info)
        if status != "completed":
            raise MigrationError(status, info.get("error-desc"), info)
        await self._wait_destination_running(dst, max(5.0, deadline - time.monotonic()))
        return MigrationReport(
            mode=self.mode,
            status=status,
            job_stats=job_stats(info),
            raw=dict(info),
            hooks=list(self.dispatcher.history),
            events=events,
            wall_s=wall,
            parameters={**params, "capabilities": dict(self.capabilities), "uri": self.uri},
        )

    async def _cancel_after_timeout(self, src: QMPConnection, timeout: float) -> None:
        # It may have just finished; the error below is still the truth about our deadline.
        with contextlib.suppress(QMPCommandError):
            await src.execute("migrate_cancel")
        info = await src.execute("query-migrate")
        raise MigrationTimeoutError(
            str(info.get("status")), f"not finished after {timeout:.0f} s; cancelled", info
        )

    async def _final_info(self, src: QMPConnection, timeout: float = 5.0) -> dict[str, Any]:
        """query-migrate until the figures are final (a 'completed' with zero times is asked again)."""
        deadline = time.monotonic() + timeout
        while True:
            info = dict(await src.execute("query-migrate"))
            if figures_final(info) or time.monotonic() > deadline:
                return info
            await asyncio.sleep(0.02)

    async def _wait_destination_running(self, dst: QMPConnection, timeout: float) -> None:
        """The destination resumes by itself after a live migration; wait until it says 'running'."""
        deadline = time.monotonic() + timeout
        while True:
            st = await dst.execute("query-status")
            if st.get("status") == "running":
                return
            if time.monotonic() > deadline:
                info = await dst.execute("query-migrate")
                raise MigrationError(
                    f"destination {st.get('status')}",
                    info.get("error-desc") or "destination did not resume",
                    info,
                )
            await asyncio.sleep(0.02)


__all__ = [
    "FINAL_STATUSES",
    "JOB_STAT_FIELDS",
    "UNLIMITED_BANDWIDTH",
    "HookDispatcher",
    "HookEvent",
    "HookListener",
    "HookPoint",
    "MigrationCancelledError",
    "MigrationError",
    "MigrationReport",
    "MigrationTimeoutError",
    "NativeMigration",
    "QMPCommandError",
    "QMPError",
    "figures_final",
    "hooks_from_qemu_event",
    "job_stats",
]
