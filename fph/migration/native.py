"""Native mode: QEMU's own precopy with QEMU's own free page hinting, driven over QMP.

The baseline for every fph number, and the path on any QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

# QEMU's default max-bandwidth is 128 MiB/s; fph always sets it explicitly. "Unlimited" = 1 TiB/s.
from fph.migration.hooks import HookDispatcher, HookListener, hooks_from_qemu_event
from fph.migration.job_stats import FINAL_STATUSES, MigrationReport, figures_final, job_stats
from fph.qmp import (
    MigrationCancelledError,
    MigrationError,
    MigrationTimeoutError,
    QMPCommandError,
    QMPConnection,
)
from fph.waiting import poll_until_async

UNLIMITED_BANDWIDTH = 1 << 40
DEFAULT_DOWNTIME_LIMIT_MS = 300


DEFAULT_TIMEOUT_S = 600.0


class NativeMigration:
    """QEMU-native precopy between two QEMUs over QMP, with QEMU's own free page hinting if the source has
    ``virtio-balloon-pci,free-page-hint=on``.

    ``await NativeMigration(src_qmp, dst_qmp, "unix:/run/x/mig.sock").run()`` → :class:`MigrationReport`;
    raises :class:`fph.qmp.MigrationError` (QEMU's ``error-desc``) when the migration fails,
    :class:`fph.qmp.MigrationCancelledError` after :meth:`cancel`, :class:`fph.qmp.MigrationTimeoutError`
    (after cancelling) on timeout, :class:`fph.qmp.QMPCommandError` when QEMU refuses a command.
    The destination must run with ``-incoming defer``. ``dst_qmp`` None: the destination's own daemon
    made it listen on ``uri`` (PrepareIncoming) and sees it resume; this side drives the source only.
    """

    mode = "native"

    def __init__(
        self,
        src_qmp: str,
        dst_qmp: str | None,
        uri: str,
        *,
        max_bandwidth: int | None = None,
        downtime_limit_ms: int = DEFAULT_DOWNTIME_LIMIT_MS,
        capabilities: Mapping[str, bool] | None = None,
        hooks: Iterable[HookListener] = (),
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.src_qmp = src_qmp
        self.dst_qmp = dst_qmp
        self.uri = uri
        self.max_bandwidth = UNLIMITED_BANDWIDTH if max_bandwidth is None else int(max_bandwidth)
        self.downtime_limit_ms = downtime_limit_ms
        self.capabilities = {"events": True, **(capabilities or {})}
        self.dispatcher = HookDispatcher(hooks)
        self.timeout_s = timeout_s
        """How long :meth:`run` lets the migration take before it cancels it (the source keeps running)."""
        self._src: QMPConnection | None = None
        self._cancel_requested = False

    async def run(self, timeout: float | None = None) -> MigrationReport:
        """Run the migration to its end and return the report (see the class docstring for errors).
        ``timeout``: None is the constructor's ``timeout_s``."""
        timeout = self.timeout_s if timeout is None else timeout
        src = QMPConnection(self.src_qmp, "fph-migration-src")
        dst = None if self.dst_qmp is None else QMPConnection(self.dst_qmp, "fph-migration-dst")
        await src.connect()
        try:
            if dst is not None:
                await dst.connect()
            self._src = src
            return await self._run(src, dst, timeout)
        finally:
            self._src = None
            await src.close()
            if dst is not None:
                await dst.close()

    async def query(self) -> dict[str, Any] | None:
        """QEMU's ``query-migrate`` on this migration's own monitor connection (a QEMU monitor serves one
        client at a time: a second connection would wait); None when no migration runs."""
        if self._src is None:
            return None
        return dict(await self._src.execute("query-migrate"))

    async def cancel(self) -> None:
        """Ask QEMU to cancel the running migration; :meth:`run` then raises MigrationCancelledError."""
        self._cancel_requested = True
        if self._src is not None:
            await self._src.execute("migrate_cancel")

    async def _run(self, src: QMPConnection, dst: QMPConnection | None, timeout: float) -> MigrationReport:
        caps = [{"capability": k, "state": v} for k, v in self.capabilities.items()]
        params = {"downtime-limit": self.downtime_limit_ms, "max-bandwidth": self.max_bandwidth}
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        await src.execute("migrate-set-parameters", params)
        if dst is not None:
            await dst.execute("migrate-set-capabilities", {"capabilities": caps})
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
        if dst is not None:
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

        async def query() -> dict[str, Any]:
            return dict(await src.execute("query-migrate"))

        return await poll_until_async(query, timeout, 0.02, until=figures_final)

    async def _wait_destination_running(self, dst: QMPConnection, timeout: float) -> None:
        """The destination resumes by itself after a live migration; wait until it says 'running'."""

        def running(st: Any) -> bool:
            return bool(st.get("status") == "running")

        st = await poll_until_async(lambda: dst.execute("query-status"), timeout, 0.02, until=running)
        if not running(st):
            info = await dst.execute("query-migrate")
            raise MigrationError(
                f"destination {st.get('status')}",
                info.get("error-desc") or "destination did not resume",
                info,
            )
