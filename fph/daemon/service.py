"""The gRPC servicers: proto <-> domain, nothing else. Every ApiError becomes its status code with its
message; a QMP connection failure becomes UNAVAILABLE; anything else INTERNAL (and is logged)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fph.api.v1 import fph_pb2 as pb
from fph.api.v1 import fph_pb2_grpc as pbg
from fph.daemon.incoming import DataPlane, IncomingSession, IncomingState, abandon_incoming
from fph.daemon.jobs import (
    FINAL_PHASES,
    JobPhase,
    MigrationJob,
    Params,
    Progress,
    Target,
    fph_migration,
    native_migration,
)
from fph.daemon.metrics import Metrics
from fph.daemon.migration_mode import MigrationMode
from fph.daemon.recovery import ABORTED, roll_back
from fph.daemon.registry import (
    Aborted,
    ApiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Registry,
    Unavailable,
    VmRecord,
    VmSpec,
    check_name,
    open_writelog,
    parse_host_port,
)
from fph.daemon.report_store import ReportStore
from fph.daemon.state_file import PersistedMigration, PersistedState, PersistedVm, StateFile
from fph.daemon.vm_state import VmState
from fph.hint_receiver import HintState
from fph.migration.convergence import OutDirtyPolicy
from fph.migration.destination import balloon_queues
from fph.migration.first_hint_run import FirstHintRun
from fph.migration.fph_mode import FphReport
from fph.qmp import QMPConnectError, QMPConnection, QMPError
from fph.ram_layout import PAGE_SIZE
from fph.transfer.security import DataPlaneSecurity

log = logging.getLogger("fph.daemon")
T = TypeVar("T")

MODES: dict[int, MigrationMode] = {
    pb.MODE_FPH: MigrationMode.FPH,
    pb.MODE_NATIVE: MigrationMode.NATIVE,
    pb.MODE_NONE: MigrationMode.NONE,
}
MODE_ENUM: dict[MigrationMode, Any] = {v: k for k, v in MODES.items()}
OUT_DIRTY_POLICIES: dict[int, OutDirtyPolicy] = {
    pb.OUT_DIRTY_POLICY_UNSPECIFIED: OutDirtyPolicy.THROTTLE,
    pb.OUT_DIRTY_POLICY_THROTTLE: OutDirtyPolicy.THROTTLE,
    pb.OUT_DIRTY_POLICY_ITERATE: OutDirtyPolicy.ITERATE,
    pb.OUT_DIRTY_POLICY_FAIL: OutDirtyPolicy.FAIL,
}
FIRST_HINT_RUNS: dict[int, FirstHintRun] = {
    pb.FIRST_HINT_RUN_UNSPECIFIED: FirstHintRun.AUTO,
    pb.FIRST_HINT_RUN_AUTO: FirstHintRun.AUTO,
    pb.FIRST_HINT_RUN_WAIT: FirstHintRun.WAIT,
    pb.FIRST_HINT_RUN_OVERLAP: FirstHintRun.OVERLAP,
}
MAX_TIME_BUDGET_S = 86400
PHASES: dict[JobPhase, Any] = {
    JobPhase.PENDING: pb.PHASE_PENDING,
    JobPhase.PREPARING_TARGET: pb.PHASE_PREPARING_TARGET,
    JobPhase.TARGET_READY: pb.PHASE_TARGET_READY,
    JobPhase.RUNNING: pb.PHASE_RUNNING,
    JobPhase.SUCCEEDED: pb.PHASE_SUCCEEDED,
    JobPhase.FAILED: pb.PHASE_FAILED,
}
STATES: dict[VmState, Any] = {
    VmState.REGISTERED: pb.VM_STATE_REGISTERED,
    VmState.MIGRATING: pb.VM_STATE_MIGRATING,
    VmState.MIGRATED: pb.VM_STATE_MIGRATED,
    VmState.INCOMING: pb.VM_STATE_INCOMING,
}
MAX_BANDWIDTH = 100 << 30
MIN_BANDWIDTH = 1 << 20
QMP_TIMEOUT_S = 5.0


def _map_error(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, ApiError):
        return e.code, str(e)
    if isinstance(e, QMPConnectError):
        return grpc.StatusCode.UNAVAILABLE, f"QEMU does not answer: {e}"
    if isinstance(e, QMPError):
        return grpc.StatusCode.FAILED_PRECONDITION, f"QEMU refused: {e}"
    log.exception("internal error")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


def _reject(fn: Callable[..., Any], context: Any, e: Exception) -> tuple[grpc.StatusCode, str]:
    """The status an exception becomes, logged as one structured line (who asked, what, why)."""
    code, msg = _map_error(e)
    peer = ""
    with contextlib.suppress(Exception):
        peer = context.peer()
    log.warning("rpc rejected", extra={"rpc": fn.__name__, "code": code.name, "reason": msg, "peer": peer})
    return code, msg


def unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except Exception as e:
            code, msg = _reject(fn, context, e)
            await context.abort(code, msg)
            raise AssertionError("unreachable") from e

    return wrapper


def streaming(fn: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as e:
            code, msg = _reject(fn, context, e)
            await context.abort(code, msg)

    return wrapper


async def qmp_query(path: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    """One QMP command on a connection of its own (the VM's monitor: QEMU accepts one client at a time
    per monitor, so this fails while a migration holds it; callers only use it when none runs)."""
    if not path.exists():
        raise Unavailable(f"QEMU's QMP socket {path} does not answer: no such socket (is QEMU running?)")
    conn = QMPConnection(str(path), "fph-daemon")
    try:
        await asyncio.wait_for(conn.connect(timeout=2.0), QMP_TIMEOUT_S)
    except (TimeoutError, OSError) as e:
        raise Unavailable(f"QEMU's QMP socket {path} does not answer: {e}") from e
    except QMPConnectError as e:
        raise Unavailable(f"QEMU's QMP socket {path} does not answer: {e}") from e
    try:
        return await asyncio.wait_for(conn.execute(command, args), QMP_TIMEOUT_S)
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


class Daemon:
    """State shared by the three services."""

    def __init__(self, state_dir: Path, socket_path: str = "", plane: DataPlane | None = None) -> None:
        self.plane = plane or DataPlane()
        """Where this host's receivers and incoming QEMUs listen, and the data plane's TLS files."""
        self.registry = Registry(state_dir)
        self.metrics = Metrics(self.registry)
        self.socket_path = socket_path
        self.jobs: dict[str, MigrationJob] = {}
        """Migrations running, and each VM's last one (the others' reports are in ``reports``)."""
        self.reports = ReportStore(self.registry.state_dir)
        """Finished migrations' reports, kept across restarts."""
        self.state_file = StateFile(self.registry.state_dir)

    def persist(self) -> None:
        """Save the VMs and the migrations in flight (after every change; atomic)."""
        vms = [
            PersistedVm(
                name=r.name,
                qmp_socket=str(r.spec.qmp_socket),
                ram_file=str(r.spec.ram_file),
                balloon_socket=str(r.spec.balloon_socket or ""),
                memory_bytes=r.spec.memory_bytes,
                write_log=str(r.spec.write_log or ""),
                state=r.state,
                free_page_reporting=r.spec.free_page_reporting,
            )
            for r in self.registry.vms.values()
        ]
        migrations = [
            PersistedMigration(
                id=j.id,
                vm=j.vm,
                mode=j.params.mode,
                source_qmp=str(self.registry.vms[j.vm].spec.qmp_socket),
                destination_vm=j.target.vm,
                destination_qmp=self._local_destination_qmp(j),
                started=j.start_time,
            )
            for j in self.jobs.values()
            if not j.finished and j.vm in self.registry.vms
        ]
        try:
            self.state_file.save(PersistedState(vms, migrations))
        except OSError as exc:
            log.error("state not saved", extra={"path": str(self.state_file.path), "error": str(exc)})

    def _local_destination_qmp(self, job: MigrationJob) -> str:
        """The destination's QMP socket if this daemon is also the destination's (one host): a restart
        must then roll that side back too. Another host's destination is its own daemon's to tear down."""
        rec = self.registry.vms.get(job.target.vm)
        session = None if rec is None else rec.incoming
        if session is not None and session.credential == job.target.credential:
            return str(session.qmp_socket)
        return ""

    async def restore(self) -> None:
        """After a restart: the VMs of the last saved state again, and every migration the previous daemon
        was running rolled back (``fph.daemon.recovery``); its report reads "aborted: back-end restarted",
        or "completed" if the guest already runs on the destination (never resumed on the source then)."""
        state = self.state_file.load()
        self.reports.load()
        for v in state.vms:
            spec = VmSpec(
                v.name,
                Path(v.qmp_socket),
                Path(v.ram_file),
                Path(v.balloon_socket) if v.balloon_socket else None,
                v.memory_bytes,
                Path(v.write_log) if v.write_log else None,
                v.free_page_reporting,
            )
            # nothing else survives a restart
            state_now = VmState.MIGRATED if v.state is VmState.MIGRATED else VmState.REGISTERED
            restored = await self.registry.restore(spec, state_now)
            # finished if it holds the guest (with a fresh balloon), else torn down
            if v.state is VmState.INCOMING:
                balloon = str(spec.balloon_socket) if restored.control is not None else ""
                restored.incoming = await abandon_incoming(
                    spec.name, spec.qmp_socket, balloon, balloon_queues(spec.free_page_reporting)
                )
            log.info(
                "vm restored",
                extra={"vm": restored.name, "state": restored.state, "degraded": restored.degraded},
            )
        for m in state.migrations:
            rec = self.registry.vms.get(m.vm)
            rb = await roll_back(
                m,
                replug=rec is not None and rec.control is not None,
                balloon_queues=balloon_queues(rec is not None and rec.spec.free_page_reporting),
                destination_running=self._abandoned_destination(m),
            )
            target = Target(m.destination_vm, "")
            job = MigrationJob.interrupted(
                m.id, m.vm, m.mode, target, m.started, rb.cleanup, ABORTED, completed=rb.completed
            )
            self.jobs[job.id] = job
            self.reports.save(report_message(job))
            if rec is not None:
                rec.job = job
                rec.state = VmState.MIGRATED if rb.completed else VmState.REGISTERED
            log.warning(
                "migration completed before the restart" if rb.completed else "migration rolled back",
                extra={"vm": m.vm, "migration": m.id, "cleanup": rb.cleanup},
            )
        self.persist()

    def _abandoned_destination(self, m: PersistedMigration) -> bool | None:
        """Whether the destination of ``m`` runs the guest, if it is a VM of this daemon that restore
        already dealt with (None: ask its QEMU)."""
        dst = self.registry.vms.get(m.destination_vm) if m.destination_vm else None
        if dst is None or dst.incoming is None or not dst.incoming.finished:
            return None
        if not m.destination_qmp or Path(m.destination_qmp) != dst.spec.qmp_socket:
            return None
        return dst.incoming.state is IncomingState.RESUMED

    @property
    def state_dir(self) -> Path:
        return self.registry.state_dir

    def vm_message(self, rec: VmRecord) -> Any:
        s = rec.spec
        link = self.registry.balloon_link(rec)
        return pb.Vm(
            spec=pb.VmSpec(
                name=s.name,
                qmp_socket=str(s.qmp_socket),
                ram_file=str(s.ram_file),
                balloon_socket=str(s.balloon_socket or ""),
                memory_bytes=s.memory_bytes,
                write_log=str(s.write_log or ""),
                free_page_reporting=s.free_page_reporting,
            ),
            state=STATES[rec.state],
            balloon_connected=link.connected,
            free_page_hint_negotiated=link.free_page_hint,
            plugin_arg=rec.plugin_arg,
            migration_id=self.last_migration_id(rec),
            degraded=rec.degraded,
            incoming=rec.incoming.summary() if rec.incoming is not None else "",
            balloon_worker_pid=rec.control.pid if rec.control is not None else 0,
        )

    def last_migration_id(self, rec: VmRecord) -> str:
        if rec.job is not None:
            return rec.job.id
        last = self.reports.latest(rec.name)
        return "" if last is None else str(last.migration_id)

    def job_ended(self, job: MigrationJob) -> None:
        """Its report kept on disk; finished jobs of the VM before it leave memory (their reports stay)."""
        self.reports.save(report_message(job))
        self._drop_finished_jobs(job.vm, keep=job)

    def forget_vm(self, name: str) -> None:
        """An unregistered VM's jobs and reports go with it."""
        self._drop_finished_jobs(name)
        self.reports.forget_vm(name)

    def _drop_finished_jobs(self, vm: str, keep: MigrationJob | None = None) -> None:
        for old in [k for k, j in self.jobs.items() if j.vm == vm and j.finished and j is not keep]:
            del self.jobs[old]

    async def close(self, timeout: float = 1.5, *, stop_workers: bool = False) -> None:
        """Cancel running migrations (each rolls back), then DONE to every guest holding hinted pages."""
        running = [j for j in self.jobs.values() if not j.finished and j.task is not None]
        for job in running:
            await job.cancel()
        if running:
            await asyncio.wait([j.task for j in running if j.task is not None], timeout=30)
        sessions = [r.incoming for r in self.registry.vms.values() if r.incoming is not None]
        for s in sessions:
            s.close()
        await asyncio.gather(*(s.wait(2.0) for s in sessions), return_exceptions=True)
        await self.registry.close(timeout, stop_workers=stop_workers)
        self.metrics.close()


# ----------------------------------------------------------------------------------------------- VMs


class VmService(pbg.VmServiceServicer):
    def __init__(self, d: Daemon) -> None:
        self.d = d

    @unary
    async def RegisterVm(self, request: Any, context: Any) -> Any:
        if not request.HasField("spec"):
            raise InvalidArgument("spec is required")
        spec = VmSpec.validate(self.d.state_dir, request.spec)
        rec = await self.d.registry.register(spec)
        self.d.persist()
        return self.d.vm_message(rec)

    @unary
    async def ListVms(self, request: Any, context: Any) -> Any:
        return pb.ListVmsResponse(vms=[self.d.vm_message(r) for _, r in sorted(self.d.registry.vms.items())])

    @unary
    async def GetVm(self, request: Any, context: Any) -> Any:
        return self.d.vm_message(self.d.registry.get(request.name))

    @unary
    async def UnregisterVm(self, request: Any, context: Any) -> Any:
        done = await self.d.registry.unregister(request.name)
        self.d.forget_vm(request.name)
        self.d.persist()
        return pb.UnregisterVmResponse(done_sent=done)

    @unary
    async def UpgradeBalloonWorker(self, request: Any, context: Any) -> Any:
        t0 = time.monotonic()
        previous = await self.d.registry.upgrade_worker(request.name)
        self.d.persist()
        return pb.UpgradeBalloonWorkerResponse(
            vm=self.d.vm_message(self.d.registry.get(request.name)),
            previous_pid=previous,
            seconds=time.monotonic() - t0,
        )


# ------------------------------------------------------------------------------------------- Hinting


class HintingService(pbg.HintingServiceServicer):
    def __init__(self, d: Daemon) -> None:
        self.d = d
        self._cache: dict[str, tuple[VmRecord, float, Any]] = {}
        self._pending: dict[str, asyncio.Future[Any]] = {}

    async def _status(self, rec: VmRecord) -> Any:
        st = await self.d.registry.status(rec)
        return pb.HintingStatus(
            vm=rec.name,
            state=st.state.value,
            host_cmd_id=st.host_cmd_id,
            guest_cmd_id=st.guest_cmd_id or 0,
            hinted_bytes=st.hinted_bytes,
            guest_held_bytes=st.held_bytes,
            run_seconds=st.run_seconds,
            blocks=st.blocks,
            rejected=st.rejected,
            stale_dropped=st.dropped,
            acknowledge_on_stop=rec.acknowledge_on_stop,
            broken=st.broken or "",
        )

    def _idle(self, rec: VmRecord) -> None:
        if rec.job is not None and not rec.job.finished:
            raise FailedPrecondition(
                f"VM {rec.name!r} is migrating ({rec.job.id}): the migration drives hinting; wait or cancel"
            )
        if rec.state is VmState.MIGRATED:
            raise FailedPrecondition(f"VM {rec.name!r} was migrated away; its guest runs elsewhere")

    @unary
    async def StartHinting(self, request: Any, context: Any) -> Any:
        rec = self.d.registry.get(request.vm)
        self._idle(rec)
        ctl = self.d.registry.balloon(rec)
        if not self.d.registry.connected(rec):
            raise FailedPrecondition(
                f"no QEMU is connected to {rec.spec.balloon_socket}: "
                "start the VM with its balloon chardev there"
            )
        st = await ctl.status_async()
        if st.state in (HintState.REQUESTED, HintState.START):
            raise FailedPrecondition(
                f"a hint run (id {st.host_cmd_id}) is already on for {rec.name!r}; stop it"
            )
        try:
            await ctl.request_hints_async()
        except Exception as e:  # StateError: not negotiated, broken, no back-end channel
            raise FailedPrecondition(f"cannot start hinting on {rec.name!r}: {e}") from e
        rec.acknowledge_on_stop = request.acknowledge_on_stop
        rec.hint_active = True
        rec.hint_runs += 1
        self.d.metrics.hint_runs.labels(rec.name).inc()
        log.info("hinting started", extra={"vm": rec.name, "ack_on_stop": rec.acknowledge_on_stop})
        return await self._status(rec)

    @unary
    async def StopHinting(self, request: Any, context: Any) -> Any:
        rec = self.d.registry.get(request.vm)
        self._idle(rec)
        ctl = self.d.registry.balloon(rec)
        st = await ctl.status_async()
        if not rec.hint_active:
            raise FailedPrecondition(
                f"no hint run was started on {rec.name!r} through the API (state {st.state.value})"
            )
        rec.hint_active = False
        await ctl.stop_hints_async()
        if rec.acknowledge_on_stop:
            await ctl.done_async()
        log.info("hinting stopped", extra={"vm": rec.name, "done": rec.acknowledge_on_stop})
        return await self._status(rec)

    @unary
    async def GetHintingStatus(self, request: Any, context: Any) -> Any:
        return await self._status(self.d.registry.get(request.vm))

    @streaming
    async def WatchHintingStatus(self, request: Any, context: Any) -> AsyncIterator[Any]:
        rec = self.d.registry.get(request.vm)
        self.d.registry.balloon(rec)
        interval = request.interval_ms or 1000
        if not 10 <= interval <= 60000:
            raise InvalidArgument(f"interval_ms {interval} out of range 10..60000")
        max_age = min(interval / 2e3, 0.05)
        while self.d.registry.vms.get(request.vm) is rec:
            yield await self._shared_status(rec, max_age)
            await asyncio.sleep(interval / 1e3)

    async def _shared_status(self, rec: VmRecord, max_age: float) -> Any:
        """One device query serves every stream of a VM for ``max_age`` seconds (and concurrent askers
        share one query): each query is a round trip to the balloon's thread, which competes for the GIL
        with a running migration's data plane (bench/daemon_load_bench.py measured +43% migration time
        with 100 streams at 100 ms before this)."""
        now = time.monotonic()
        cached = self._cache.get(rec.name)
        if cached is not None and cached[0] is rec and now - cached[1] <= max_age:
            return cached[2]
        pending = self._pending.get(rec.name)
        if pending is None:
            pending = self._pending[rec.name] = asyncio.ensure_future(self._status(rec))
            name = rec.name

            def forget(_f: asyncio.Future[Any]) -> None:
                self._pending.pop(name, None)

            pending.add_done_callback(forget)
            msg = await asyncio.shield(pending)  # a cancelled stream must not cancel the others' query
            self._cache[rec.name] = (rec, time.monotonic(), msg)
            return msg
        return await asyncio.shield(pending)

    @unary
    async def GetGuestStats(self, request: Any, context: Any) -> Any:
        rec = self.d.registry.get(request.vm)
        ctl = self.d.registry.balloon(rec)
        if request.refresh:
            await ctl.request_stats_async()
        gs = await ctl.guest_stats_async()
        age = -1.0 if gs.updated is None else max(0.0, time.monotonic() - gs.updated)
        return pb.GuestStats(vm=rec.name, values={k: int(v) for k, v in gs.values.items()}, age_seconds=age)

    @unary
    async def SetBalloonTarget(self, request: Any, context: Any) -> Any:
        rec = self.d.registry.get(request.vm)
        self._idle(rec)
        ctl = self.d.registry.balloon(rec)
        t = request.target_bytes
        if t % PAGE_SIZE or t > rec.spec.memory_bytes:
            raise InvalidArgument(
                f"target_bytes {t} must be a multiple of {PAGE_SIZE} and at most the guest's "
                f"{rec.spec.memory_bytes} bytes"
            )
        if not self.d.registry.connected(rec):
            raise FailedPrecondition(f"no QEMU is connected to {rec.spec.balloon_socket}")
        await ctl.set_target_async(t // PAGE_SIZE)
        return pb.BalloonTarget(vm=rec.name, target_bytes=t)


# ----------------------------------------------------------------------------------------- Migration


def _progress_message(job: MigrationJob, p: Progress) -> Any:
    s = p.stats
    return pb.MigrationProgress(
        migration_id=job.id,
        phase=PHASES[p.phase],
        status=p.status,
        fph_phase=p.fph_phase,
        time_elapsed_ms=p.time_elapsed_ms,
        memory_total=s.get("memory_total", 0),
        memory_processed=s.get("memory_processed", 0),
        memory_remaining=s.get("memory_remaining", 0),
        memory_iteration=s.get("memory_iteration", 0),
        memory_dirty_rate=s.get("memory_dirty_rate", 0),
        memory_bps=s.get("memory_bps", 0),
        memory_constant=s.get("memory_constant", 0),
        memory_normal=s.get("memory_normal", 0),
        hinted_bytes=p.hinted_bytes,
        stale_hints_dropped=p.stale_hints_dropped,
        message=p.message,
    )


class MigrationService(pbg.MigrationServiceServicer):
    def __init__(self, d: Daemon) -> None:
        self.d = d

    # -- helpers

    def _mode(self, mode: int) -> MigrationMode:
        if mode not in MODES:
            raise InvalidArgument("mode is required: MODE_FPH, MODE_NATIVE or MODE_NONE")
        return MODES[mode]

    def _target(self, msg: Any, mode: MigrationMode) -> Target:
        """The destination daemon's IncomingTarget, checked: addresses only, no path of the other host."""
        name = check_name(msg.vm, "destination vm")
        fph = mode is MigrationMode.FPH
        if msg.mode != MODE_ENUM[mode]:
            raise InvalidArgument(
                f"the destination was prepared for {pb.Mode.Name(msg.mode)}, this migration is "
                f"{pb.Mode.Name(MODE_ENUM[mode])}: call PrepareIncoming with the mode Migrate will use "
                "(QEMU's capabilities on both ends must match)"
            )
        uri = msg.migration_uri
        if not uri.startswith("tcp:"):
            raise InvalidArgument(
                f"destination.migration_uri {uri!r}: expected tcp:HOST:PORT, as the destination daemon's "
                "PrepareIncoming returns it"
            )
        parse_host_port(uri[4:], "destination.migration_uri")
        data = None
        if fph:
            if not msg.data_address or not msg.credential:
                raise InvalidArgument(
                    "destination.data_address and destination.credential are required for mode fph: pass the "
                    "IncomingTarget of the destination daemon's PrepareIncoming (with mode MODE_FPH)"
                )
            data = parse_host_port(msg.data_address, "destination.data_address")
        if msg.tls and self.d.plane.tls is None:
            raise FailedPrecondition(
                "the destination's data plane requires mutual TLS and this daemon has no TLS files: "
                "configure tls_cert, tls_key and tls_client_ca (with a certificate of the destination's CA)"
            )
        return Target(name, uri, data, msg.credential, bool(msg.tls), msg.daemon_socket)

    def _params(self, request: Any, mode: MigrationMode) -> Params:
        bw = request.bandwidth_bytes_per_second
        if bw and not MIN_BANDWIDTH <= bw <= MAX_BANDWIDTH:
            raise InvalidArgument(
                f"bandwidth_bytes_per_second {bw} out of range: "
                f"0 (unlimited) or {MIN_BANDWIDTH} .. {MAX_BANDWIDTH}"
            )
        dt = request.downtime_limit_ms
        if dt and not 1 <= dt <= 60000:
            raise InvalidArgument(f"downtime_limit_ms {dt} out of range: 0 (default 300) or 1 .. 60000")
        rounds = request.max_rounds
        if rounds and not 1 <= rounds <= 1000:
            raise InvalidArgument(f"max_rounds {rounds} out of range: 0 (default 30) or 1 .. 1000")
        iv = request.progress_interval_ms
        if iv and not 50 <= iv <= 10000:
            raise InvalidArgument(f"progress_interval_ms {iv} out of range: 0 (default 500) or 50 .. 10000")
        policy = OUT_DIRTY_POLICIES.get(request.out_dirty_policy)
        if policy is None:
            raise InvalidArgument(
                f"out_dirty_policy {request.out_dirty_policy} is not a known OutDirtyPolicy"
            )
        if policy is OutDirtyPolicy.FAIL and mode is not MigrationMode.FPH:
            raise InvalidArgument(
                f"out_dirty_policy FAIL is fph mode's: QEMU's own migration ({mode.value}) cannot tell when "
                "the guest out-dirties the link; use THROTTLE (auto-converge) or ITERATE with a time_budget_s"
            )
        first_run = FIRST_HINT_RUNS.get(request.first_hint_run)
        if first_run is None:
            raise InvalidArgument(f"first_hint_run {request.first_hint_run} is not a known FirstHintRun")
        if first_run is not FirstHintRun.AUTO and mode is not MigrationMode.FPH:
            raise InvalidArgument(
                f"first_hint_run {first_run.name} is fph mode's: QEMU's own migration ({mode.value}) always "
                "sends while the guest hints"
            )
        budget = request.time_budget_s
        if budget and not 1 <= budget <= MAX_TIME_BUDGET_S:
            raise InvalidArgument(
                f"time_budget_s {budget} out of range: 0 (the mode's default) or 1 .. {MAX_TIME_BUDGET_S}"
            )
        return Params(
            mode,
            bw or None,
            dt or 300,
            rounds or 30,
            (iv or 500) / 1e3,
            out_dirty_policy=policy,
            time_budget_s=float(budget) if budget else None,
            first_hint_run=first_run,
        )

    async def _checks(
        self, rec: VmRecord, mode: MigrationMode, target: Target | None
    ) -> list[tuple[str, bool, str]]:
        """Readiness checks; each says what was found or what to do."""
        out: list[tuple[str, bool, str]] = []
        reg = self.d.registry
        try:
            memdevs = await qmp_query(rec.spec.qmp_socket, "query-memdev")
            out.append(("qmp", True, f"{rec.spec.qmp_socket} answers"))
            shared = [m for m in memdevs if m.get("share") and int(m.get("size", 0)) == rec.spec.memory_bytes]
            if mode is MigrationMode.FPH:
                out.append(
                    (
                        "shared_ram",
                        bool(shared) and rec.spec.ram_file.exists(),
                        f"{len(shared)} shared memory backend(s) of {rec.spec.memory_bytes} bytes; "
                        f"ram_file {'exists' if rec.spec.ram_file.exists() else 'missing'}",
                    )
                )
        except Unavailable as e:
            out.append(("qmp", False, str(e)))
        except QMPError as e:
            out.append(("qmp", False, f"QEMU refused query-memdev: {e}"))
        if mode is MigrationMode.FPH:
            if rec.control is None:
                out.append(
                    ("free_page_hint", False, "registered without balloon_socket: nothing will be hinted")
                )
            elif not (link := reg.balloon_link(rec)).connected:
                out.append(("free_page_hint", False, f"no QEMU connected to {rec.spec.balloon_socket}"))
            else:
                ok = link.free_page_hint
                out.append(
                    ("free_page_hint", ok, "negotiated" if ok else "the guest driver did not negotiate it")
                )
            if rec.spec.write_log is None:
                out.append(("write_log", False, "registered without write_log: fph mode needs one"))
            else:
                out.append(await asyncio.to_thread(_writelog_check, rec))
        else:
            plugged = rec.control is not None and reg.connected(rec)
            out.append(
                (
                    "balloon",
                    not plugged,
                    "the fph balloon (vhost-user) is plugged: QEMU cannot migrate it; use mode fph"
                    if plugged
                    else "no unmigratable fph balloon plugged",
                )
            )
        if target is not None:
            out.append(self._destination_check(target))
        return out

    def _destination_check(self, target: Target) -> tuple[str, bool, str]:
        """Nothing is sent to the destination to check it (a probe of QEMU's incoming socket would be taken
        for the migration stream). A destination VM of this very daemon is checked in its registry."""
        where = f"QEMU at {target.migration_uri}" + (
            f", RAM receiver at {target.data_address[0]}:{target.data_address[1]}"
            if target.data_address
            else ""
        )
        local = self.d.registry.vms.get(target.vm)
        session = None if local is None else local.incoming
        if session is not None and session.credential == target.credential:
            ok = not session.finished
            return (
                "destination",
                ok,
                f"{where}: {session.summary()}" + ("" if ok else "; prepare it again (PrepareIncoming)"),
            )
        return (
            "destination",
            True,
            f"{where} (prepared by the destination daemon{' with TLS' if target.tls else ''})",
        )

    async def _estimate(self, rec: VmRecord, mode: MigrationMode) -> tuple[int, str]:
        total = rec.spec.memory_bytes
        if mode is MigrationMode.NONE or rec.control is None:
            return total, "all guest RAM (no hinting)"
        ctl = rec.control
        gs = await ctl.guest_stats_async()
        free = gs.values.get("free_memory")
        if free is None:
            return total, "all guest RAM (no guest stats yet)"
        return max(0, total - int(free)), "guest RAM minus the guest's free_memory from the stats queue"

    # -- RPCs

    @unary
    async def PrepareMigration(self, request: Any, context: Any) -> Any:
        rec = self.d.registry.get(request.vm)
        mode = self._mode(request.mode)
        target = self._target(request.destination, mode) if request.HasField("destination") else None
        if rec.job is not None and not rec.job.finished:
            raise FailedPrecondition(f"VM {rec.name!r} is already migrating ({rec.job.id})")
        checks = await self._checks(rec, mode, target)
        est, basis = await self._estimate(rec, mode)
        return pb.PrepareMigrationResponse(
            ready=all(ok for _, ok, _ in checks),
            checks=[pb.Check(name=n, ok=ok, detail=d) for n, ok, d in checks],
            memory_total=rec.spec.memory_bytes,
            estimated_bytes=est,
            estimate_basis=basis,
        )

    @unary
    async def PrepareIncoming(self, request: Any, context: Any) -> Any:
        rec = self.d.registry.get(request.vm)
        mode = self._mode(request.mode)
        if rec.state is not VmState.REGISTERED or (rec.job is not None and not rec.job.finished):
            raise FailedPrecondition(
                f"VM {rec.name!r} is {rec.state.value}: only an idle registered VM can be a target"
            )
        st = await qmp_query(rec.spec.qmp_socket, "query-status")
        if st.get("status") != "inmigrate":
            raise FailedPrecondition(
                f"VM {rec.name!r}: QEMU status {st.get('status')!r}; a target runs with -incoming defer "
                "and has not received a migration yet"
            )
        if mode is MigrationMode.FPH and rec.control is not None and self.d.registry.connected(rec):
            raise FailedPrecondition(
                f"VM {rec.name!r} already has a QEMU on its balloon socket: an fph target is started "
                "without the balloon (this daemon plugs a fresh one once the guest runs here)"
            )
        # The destination RAM file is mapped and pre-faulted now, while the orchestrator is still on its way
        # to Migrate: round 0 then never waits for it.
        await asyncio.to_thread(rec.drop_incoming)

        def ended(s: IncomingSession) -> None:
            if rec.incoming is s and rec.state is VmState.INCOMING:
                rec.state = VmState.REGISTERED
                self.d.persist()

        try:
            session = await IncomingSession.prepare(
                vm=rec.name,
                mode=mode,
                qmp_socket=rec.spec.qmp_socket,
                ram_file=rec.spec.ram_file,
                layout=rec.layout,
                balloon_socket=str(rec.spec.balloon_socket or ""),
                balloon_queues=balloon_queues(rec.spec.free_page_reporting),
                plane=self.d.plane,
                on_end=ended,
            )
        except (QMPError, OSError, RuntimeError) as e:
            raise FailedPrecondition(f"VM {rec.name!r}: cannot prepare it as a destination: {e}") from e
        rec.incoming = session
        rec.state = VmState.INCOMING
        self.d.persist()  # a restarted daemon tears down what this one prepared (abandon_incoming)
        return pb.IncomingTarget(
            daemon_socket=self.d.socket_path,
            vm=rec.name,
            qmp_socket=str(rec.spec.qmp_socket),
            ram_file=str(rec.spec.ram_file),
            balloon_socket=str(rec.spec.balloon_socket or ""),
            migration_uri=session.migration_uri,
            data_address=session.data_address,
            credential=session.credential,
            tls=session.tls,
            mode=request.mode,
        )

    async def _start(self, request: Any) -> MigrationJob:
        rec = self.d.registry.get(request.vm)
        mode = self._mode(request.mode)
        if not request.HasField("destination"):
            raise InvalidArgument(
                "destination is required: the IncomingTarget from the destination daemon's PrepareIncoming"
            )
        target = self._target(request.destination, mode)
        params = self._params(request, mode)
        if rec.job is not None and not rec.job.finished:
            raise FailedPrecondition(f"VM {rec.name!r} is already migrating ({rec.job.id})")
        if rec.state is not VmState.REGISTERED:
            raise FailedPrecondition(f"VM {rec.name!r} is {rec.state.value}: it cannot be migrated from here")
        if rec.degraded:
            raise FailedPrecondition(f"VM {rec.name!r} is degraded: {rec.degraded}")
        checks = await self._checks(rec, mode, target)
        for name, ok, detail in checks:
            if not ok and name in ("qmp", "destination") and "does not answer" in detail:
                raise Unavailable(f"{name}: {detail}")
            if not ok and not (name == "free_page_hint" and rec.control is None):
                raise FailedPrecondition(f"not ready ({name}): {detail}")
        job = MigrationJob(rec.name, params, target, rec.spec.memory_bytes)
        if mode is MigrationMode.FPH:
            assert rec.spec.write_log is not None
            wl = await asyncio.to_thread(open_writelog, rec.spec.write_log, rec.layout)
            reg = self.d.registry
            security = DataPlaneSecurity(target.credential, self.d.plane.tls if target.tls else None)
            migration: Any = fph_migration(
                security=security,
                src_qmp=rec.spec.qmp_socket,
                src_ram=rec.spec.ram_file,
                layout=rec.layout,
                writelog=wl,
                control=rec.control,
                ring_ranges=(lambda: reg.ring_ranges(rec)) if rec.control else None,
                target=target,
                params=params,
                balloon_queues=balloon_queues(rec.spec.free_page_reporting),
            )
        else:
            wl = None
            migration = native_migration(src_qmp=rec.spec.qmp_socket, target=target, params=params)
        rec.job = job
        rec.state = VmState.MIGRATING
        self.d.jobs[job.id] = job

        def on_end(j: MigrationJob) -> None:
            if wl is not None:
                with contextlib.suppress(Exception):
                    wl.close()
            if rec.control is not None:
                rec.control.set_sink(rec.sink)  # the migration made its bitmap the sink
            rec.state = VmState.MIGRATED if j.report is not None else VmState.REGISTERED
            self.d.metrics.ended(j)
            self.d.job_ended(j)
            self.d.persist()
            log.info(
                "migration ended",
                extra={"vm": j.vm, "migration": j.id, "phase": j.phase.value, "status": j.status},
            )

        job.on_progress = lambda j, p: self.d.metrics.live(j, p.stats)
        job.start(migration, str(rec.spec.qmp_socket), on_end)
        self.d.persist()
        log.info("migration started", extra={"vm": rec.name, "migration": job.id, "mode": mode.value})
        return job

    @streaming
    async def Migrate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        job = await self._start(request)
        q = job.subscribe()
        try:
            while True:
                p = await q.get()
                yield _progress_message(job, p)
                if p.phase in FINAL_PHASES:
                    break
        finally:
            job.unsubscribe(q)
        if job.phase is JobPhase.FAILED:
            what = "cancelled" if job.cancel_requested else "failed"
            raise Aborted(
                f"migration {job.id} {what}: {job.error}; "
                f"rolled back: {'; '.join(job.cleanup) or 'nothing to undo'}"
            )

    @unary
    async def CancelMigration(self, request: Any, context: Any) -> Any:
        rec = self.d.registry.get(request.vm)
        job = rec.job
        if job is None or job.finished:
            raise FailedPrecondition(f"no migration of {rec.name!r} is running; nothing to cancel")
        await job.cancel()
        return pb.CancelMigrationResponse(migration_id=job.id)

    @unary
    async def GetMigrationReport(self, request: Any, context: Any) -> Any:
        rec = self.d.registry.get(request.vm)
        mid = request.migration_id
        job = self.d.jobs.get(mid) if mid else rec.job
        if job is not None and job.vm == rec.name:
            return report_message(job)
        kept = self.d.reports.get(mid) if mid else self.d.reports.latest(rec.name)  # finished before
        if kept is not None and kept.vm == rec.name:
            return kept
        if mid:
            raise NotFound(f"no migration {mid!r} of VM {rec.name!r}")
        raise NotFound(f"VM {rec.name!r} has not been migrated by this daemon")


def report_message(job: MigrationJob) -> Any:
    p = job.snapshot()
    rep = job.report
    fph: dict[str, float] = {}
    rounds = []
    if isinstance(rep, FphReport):
        fph = {
            k: float(v) for k, v in rep.fph.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        fph["converged"] = float(bool(rep.fph.get("converged")))
        for r in rep.rounds:
            rounds.append(
                pb.RoundStats(
                    round=int(r["round"]),
                    pages_data=int(r["pages_data"]),
                    pages_zero_skipped=int(r["pages_zero_skipped"]),
                    bytes_on_wire=int(r["bytes_on_wire"]),
                    hinted_pages=int(r["hinted_pages"]),
                    ms=float(r["ms"]),
                )
            )
    return pb.MigrationReport(
        migration_id=job.id,
        vm=job.vm,
        mode=MODE_ENUM[job.params.mode],
        phase=PHASES[job.phase],
        status="active" if not job.finished else job.status,
        job_stats={k: int(v) for k, v in p.stats.items()},
        fph=fph,
        rounds=rounds,
        error=job.error,
        cleanup=job.cleanup,
        destination_vm=job.target.vm,
        start_time=job.start_time,
        end_time=job.end_time,
        json=job.report_json(),
    )


def _writelog_check(rec: VmRecord) -> tuple[str, bool, str]:
    assert rec.spec.write_log is not None
    try:
        wl = open_writelog(rec.spec.write_log, rec.layout)
    except Exception as e:
        return ("write_log", False, f"{e}")
    try:
        attached = wl.header().attach_count
    finally:
        wl.close()
    if not attached:
        return (
            "write_log",
            False,
            f"no QEMU plugin attached to {rec.spec.write_log}: start QEMU with -plugin {rec.plugin_arg}",
        )
    return ("write_log", True, f"TCG write log attached ({attached} attach)")


SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[n].full_name for n in pb.DESCRIPTOR.services_by_name)
"""fph's own services (``fph.api.v1.VmService`` ...), as health and reflection name them."""


def add_services(server: Any, d: Daemon) -> health.HealthServicer:
    """fph's services, the standard health service (``grpc.health.v1``: what Kubernetes probes and
    grpc-health-probe call; "" and every fph service SERVING) and server reflection (generic clients such
    as grpcurl list and call the API without the .proto). Returns the health servicer: set NOT_SERVING
    on shutdown."""
    pbg.add_VmServiceServicer_to_server(VmService(d), server)
    pbg.add_HintingServiceServicer_to_server(HintingService(d), server)
    pbg.add_MigrationServiceServicer_to_server(MigrationService(d), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return health_servicer
