"""Migrations as daemon jobs: the migration runs as a task; progress goes to every subscriber; a report stays.

A job outlives the Migrate stream that started it: a client that goes away does not cancel the migration
(orchestrators reconnect and read the report); CancelMigration does. Phases are KubeVirt's; ``status`` uses
QEMU's MigrationStatus words; figures use libvirt's job-stat names.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fph.daemon.migration_mode import MigrationMode
from fph.migration.convergence import DEFAULT_TIME_BUDGET_S, OutDirtyPolicy
from fph.migration.first_hint_run import FirstHintRun
from fph.migration.fph_mode import Balloon, FphConfig, FphMigration, FphMigrationError, FphReport, Phase
from fph.migration.native import DEFAULT_TIMEOUT_S
from fph.migration_hook import HookEvent, HookPoint, MigrationReport, NativeMigration, job_stats
from fph.qmp import MigrationCancelledError, QMPError
from fph.ram_layout import PAGE_SIZE
from fph.transfer.security import DataPlaneSecurity

log = logging.getLogger("fph.daemon")


class JobPhase(enum.Enum):
    """A migration job's phase: KubeVirt's VirtualMachineInstanceMigration phases (the API's ``Phase``)."""

    PENDING = "pending"
    PREPARING_TARGET = "preparing-target"
    TARGET_READY = "target-ready"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


FINAL_PHASES = frozenset({JobPhase.SUCCEEDED, JobPhase.FAILED})


@dataclass(frozen=True)
class Target:
    """The destination as its daemon's PrepareIncoming described it (checked): the source drives its own
    QEMU and sends to these addresses; the destination daemon owns everything on its host."""

    vm: str
    migration_uri: str
    """tcp:HOST:PORT where the destination QEMU listens."""
    data_address: tuple[str, int] | None = None
    """The RAM receiver (fph mode)."""
    credential: str = ""
    tls: bool = False
    daemon_socket: str = ""


@dataclass(frozen=True)
class Params:
    mode: MigrationMode
    bandwidth: int | None
    downtime_limit_ms: int
    max_rounds: int
    interval_s: float
    out_dirty_policy: OutDirtyPolicy = OutDirtyPolicy.THROTTLE
    """fph mode: the convergence policy's; native and none: ``THROTTLE`` is QEMU's auto-converge, ``ITERATE``
    runs without it (``FAIL`` is refused for them: QEMU has no such policy)."""
    time_budget_s: float | None = None
    """None: the mode's default (fph: 300 s of rounds, ``ConvergenceConfig``; native and none: 600 s for
    the whole migration, ``NativeMigration.run``), after which the migration fails with the source running."""
    first_hint_run: FirstHintRun = FirstHintRun.AUTO
    """fph mode: how round 0 meets the guest's first hint run (``PrecopyConfig.first_hint_run``)."""


@dataclass
class Progress:
    phase: JobPhase
    status: str
    fph_phase: str = ""
    time_elapsed_ms: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    hinted_bytes: int = 0
    stale_hints_dropped: int = 0
    message: str = ""


class MigrationJob:
    """One outgoing migration of a registered VM."""

    def __init__(self, vm: str, params: Params, target: Target, memory_total: int) -> None:
        self.id = f"mig-{uuid.uuid4().hex[:12]}"
        self.vm = vm
        self.params = params
        self.target = target
        self.memory_total = memory_total
        self.phase = JobPhase.PENDING
        self.status = "none"
        self.start_time = time.time()
        self.end_time = 0.0
        self.error = ""
        self.cleanup: list[str] = []
        self.report: FphReport | MigrationReport | None = None
        self.migration: FphMigration | NativeMigration | None = None
        self.task: asyncio.Task[None] | None = None
        self.cancel_requested = False
        self._t0 = time.monotonic()
        self._subscribers: list[asyncio.Queue[Progress]] = []
        self._native_stats: dict[str, int] = {}
        self.last = Progress(JobPhase.PENDING, "none")
        self.on_progress: Callable[[MigrationJob, Progress], None] | None = None  # e.g. live metrics

    @classmethod
    def interrupted(
        cls,
        job_id: str,
        vm: str,
        mode: MigrationMode,
        target: Target,
        started: float,
        cleanup: list[str],
        error: str,
        *,
        completed: bool = False,
    ) -> MigrationJob:
        """The record of a migration a previous daemon ran when it died: rolled back on restart (failed with
        ``error``), or ``completed`` (the guest already ran on the destination): an orchestrator reading a
        failure would restart the guest on the source, a second running copy."""
        job = cls(vm, Params(mode, None, 0, 0, 1.0), target, 0)
        job.id, job.start_time, job.end_time = job_id, started, time.time()
        job.cleanup = list(cleanup)
        if completed:
            job.phase, job.status = JobPhase.SUCCEEDED, "completed"
        else:
            job.phase, job.status, job.error = JobPhase.FAILED, "failed", error
        job.last = job.snapshot(error if not completed else "; ".join(cleanup[:1]))
        return job

    @property
    def finished(self) -> bool:
        return self.phase in FINAL_PHASES

    # ------------------------------------------------------------------------------------------ progress

    def subscribe(self) -> asyncio.Queue[Progress]:
        """A queue of progress events; the current state first. Slow readers lose intermediate events."""
        q: asyncio.Queue[Progress] = asyncio.Queue(maxsize=64)
        q.put_nowait(self.snapshot())
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Progress]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(q)

    def publish(self, message: str = "") -> None:
        p = self.last = self.snapshot(message)
        if self.on_progress is not None:
            self.on_progress(self, p)
        for q in self._subscribers:
            if q.full():  # keep the newest: drop the oldest
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(p)

    def snapshot(self, message: str = "") -> Progress:
        p = Progress(self.phase, self.status, message=message)
        p.time_elapsed_ms = ((self.end_time or time.time()) - self.start_time) * 1e3
        mig = self.migration
        if isinstance(mig, FphMigration):
            p.fph_phase = mig.phase.value
            pc = mig.precopy
            if pc is not None:
                rounds = list(pc.result.rounds)
                wire = pc.channel.counters.bytes_on_wire
                send_s = sum(r.send_ms for r in rounds) / 1e3
                st = pc.bitmap.stats
                p.stats = {
                    "memory_total": self.memory_total,
                    "memory_processed": wire,
                    "memory_remaining": pc.bitmap.count_dirty() * PAGE_SIZE,
                    "memory_iteration": len(rounds),
                    "memory_dirty_rate": int(rounds[-1].dirty_rate_pps) if rounds else 0,
                    "memory_bps": int(wire / send_s) if send_s > 0 else 0,
                    "memory_constant": sum(r.pages_zero_sent + r.pages_zero_skipped for r in rounds),
                    "memory_normal": sum(r.pages_data for r in rounds),
                }
                p.hinted_bytes = st.hinted_pages * PAGE_SIZE
                p.stale_hints_dropped = st.hints_dropped_stale
        else:
            p.stats = dict(self._native_stats)
        if self.report is not None:
            p.stats.update(self.report.job_stats)
            if isinstance(self.report, FphReport):
                p.hinted_bytes = int(self.report.fph.get("hinted_bytes", 0))
                p.stale_hints_dropped = int(self.report.fph.get("stale_hints_dropped", 0))
        p.stats.setdefault("memory_total", self.memory_total)
        return p

    # ------------------------------------------------------------------------------------------ running

    def start(
        self,
        migration: FphMigration | NativeMigration,
        src_qmp: str,
        on_end: Callable[[MigrationJob], None],
    ) -> None:
        self.migration = migration
        self.task = asyncio.get_running_loop().create_task(self._run(src_qmp, on_end), name=self.id)

    async def _run(self, src_qmp: str, on_end: Callable[[MigrationJob], None]) -> None:
        mig = self.migration
        assert mig is not None
        self.phase, self.status = JobPhase.RUNNING, "setup"
        self.publish(f"{self.params.mode.value} migration of {self.vm} to {self.target.vm} started")
        mig.dispatcher.register(self._on_hook)
        ticker = asyncio.create_task(self._tick(isinstance(mig, NativeMigration)))
        try:
            self.report = await mig.run()
            self.status = self.report.status
            self.phase = JobPhase.SUCCEEDED
            self.end_time = time.time()
            self.publish(
                f"completed: {self.report.bytes / (1 << 20):.1f} MiB sent, "
                f"downtime {self.report.downtime_ms} ms"
            )
        except FphMigrationError as e:
            self._failed(e, e.cleanup)
        except MigrationCancelledError as e:
            self._failed(e, [])
        except Exception as e:
            self._failed(e, [])
        except asyncio.CancelledError:  # the daemon is shutting down
            self._failed(RuntimeError("the daemon shut down during the migration"), [])
            raise
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            on_end(self)

    def _failed(self, exc: BaseException, cleanup: list[str]) -> None:
        self.phase = JobPhase.FAILED
        self.status = "cancelled" if self.cancel_requested else "failed"
        self.error = str(exc)
        self.cleanup = list(cleanup)
        self.end_time = time.time()
        log.error("migration failed", extra={"vm": self.vm, "migration": self.id, "error": self.error})
        self.publish(f"{self.status}: {self.error}")

    def _on_hook(self, event: HookEvent) -> None:
        if event.point is HookPoint.SETUP:
            self.status = "setup"
        elif event.point in (HookPoint.BEFORE_SYNC, HookPoint.AFTER_SYNC):
            self.status = "active"
            if isinstance(self.migration, FphMigration) and self.migration.phase is Phase.STOPPED:
                self.status = "device"
        elif event.point is HookPoint.COMPLETE:
            self.status = "device"
        if event.point is not HookPoint.BEFORE_SYNC:
            self.publish(f"{event.point.value} (sync {event.sync})")

    async def _tick(self, native: bool) -> None:
        """Progress every interval. Native mode asks QEMU's query-migrate on the migration's own monitor
        connection (a QEMU monitor serves one client at a time: a second connection would wait)."""
        while True:
            await asyncio.sleep(self.params.interval_s)
            info = None
            if native and isinstance(self.migration, NativeMigration):
                with contextlib.suppress(QMPError, OSError):
                    info = await self.migration.query()
            if info is not None:
                self._native_stats = job_stats(info)
                if not self.finished:
                    self.status = str(info.get("status", self.status))
            self.publish()

    async def cancel(self) -> None:
        self.cancel_requested = True
        mig = self.migration
        if isinstance(mig, FphMigration):
            mig.cancel()  # aborts at the next round boundary, then rolls back
        elif isinstance(mig, NativeMigration):
            with contextlib.suppress(QMPError):
                await mig.cancel()
        self.status = "cancelling"
        self.publish("cancel requested")

    def report_dict(self) -> dict[str, Any]:
        return self.report.to_dict() if self.report is not None else {}

    def report_json(self) -> str:
        return json.dumps(self.report_dict(), default=str)


def fph_migration(
    *,
    src_qmp: Path,
    src_ram: Path,
    layout: Any,
    writelog: Any,
    control: Any,
    ring_ranges: Callable[[], list[tuple[int, int]]] | None,
    target: Target,
    params: Params,
    security: DataPlaneSecurity,
    balloon_queues: int = 4,
) -> FphMigration:
    """The source half: the destination daemon resumes its QEMU and plugs its balloon itself."""
    assert target.data_address is not None
    balloon = None if control is None else Balloon(control, ring_ranges=ring_ranges, queues=balloon_queues)
    return FphMigration(
        src_qmp=str(src_qmp),
        dst_qmp=None,
        uri=target.migration_uri,
        layout=layout,
        src_ram=src_ram,
        receiver_address=target.data_address,
        security=security,
        writelog=writelog,
        balloon=balloon,
        config=FphConfig(
            max_rounds=params.max_rounds,
            downtime_limit_ms=float(params.downtime_limit_ms),
            bandwidth=params.bandwidth,
            out_dirty_policy=params.out_dirty_policy,
            time_budget_s=params.time_budget_s or DEFAULT_TIME_BUDGET_S,
            first_hint_run=params.first_hint_run,
        ),
    )


def native_migration(*, src_qmp: Path, target: Target, params: Params) -> NativeMigration:
    return NativeMigration(
        str(src_qmp),
        None,  # the destination daemon made its QEMU listen and sees it resume
        target.migration_uri,
        max_bandwidth=params.bandwidth,
        downtime_limit_ms=params.downtime_limit_ms,
        # A VM that arrived by an fph migration keeps x-ignore-shared on (fph sets it on both ends): left on,
        # its RAM would not be sent and a plain destination fails loading device state (measured).
        # auto-converge (the default policy, THROTTLE): a guest that out-dirties the link is throttled, as in
        # fph mode; without it a churning 1 GiB guest did not converge in 600 s over 1 Gbit/s (twohost_bench
        # churn).
        capabilities={
            "x-ignore-shared": False,
            "auto-converge": params.out_dirty_policy is OutDirtyPolicy.THROTTLE,
        },
        timeout_s=params.time_budget_s or DEFAULT_TIMEOUT_S,
    )
