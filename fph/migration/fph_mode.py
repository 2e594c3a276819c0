"""fph mode: fph moves the guest's RAM itself, skipping what the guest hinted free; QEMU moves device state.

Sequence::

    setup       destination receiver maps the destination RAM file; both QEMUs get x-ignore-shared;
                the destination listens (migrate-incoming); the write log is armed; every page dirty
    rounds      STOP hints, harvest the write log, issue a new hint id, send dirty pages (guest running)
    switchover  STOP hints; device_del the balloon (the guest takes back its hinted blocks) and wait for
                DEVICE_DELETED; stop the source; final harvest and send; re-read every page sent and
                resend what changed (TCG's page walker sets PTE A/D bits without a logged store);
                FINISH (the destination confirms every page landed); QEMU migrates device state only
    resume      cont on the destination; plug a fresh balloon there (chardev-add + device_add)

Every failure aborts cleanly: the data channel is told, the destination QEMU is torn down, the source
resumes (cont) and gets its balloon back (device_add) or, if the balloon is still there, DONE, so the
guest never keeps its hinted memory because fph failed. The error says which phase failed and why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fph import dirty_bitmap
from fph.balloon.spec import F_FREE_PAGE_HINT, F_REPORTING
from fph.balloon.stats import GuestStats
from fph.dirty_bitmap import DirtyBitmap
from fph.migration.convergence import ConvergenceError, Decision, Verdict
from fph.migration.destination import (
    BALLOON_CHARDEV_ID,
    BALLOON_DEVICE_ID,
    FPH_INCOMING_CAPABILITIES,
    DestinationError,
    add_balloon_device,
    capabilities_arg,
    plug_balloon,
    resume_incoming,
)
from fph.migration.hooks import HookDispatcher, HookEvent, HookListener, HookPoint
from fph.migration.job_stats import FINAL_STATUSES, JobStatsView, figures_final, job_stats
from fph.migration.precopy import HintControl, HintPolicy, Precopy, PrecopyConfig, RoundStats
from fph.migration.reporting_wait import CatchUp, ReportingWait
from fph.migration.throttle import ThrottleError, VcpuThrottle, vcpu_threads
from fph.qmp import QMPConnection, QMPError
from fph.ram_layout import PAGE_SIZE, RamLayout
from fph.transfer import pagehash
from fph.transfer.channel import ChannelError
from fph.transfer.ram_file import RamFile
from fph.transfer.receiver import RamReceiver, ReceiverResult
from fph.transfer.security import DataPlaneSecurity
from fph.transfer.sender import RamSender
from fph.writelog.base import WriteLog
from fph.writelog.device import DeviceWriteLog

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    SETUP = "setup"
    ROUNDS = "rounds"
    UNPLUG = "unplug"
    STOPPED = "stopped"
    DEVICE_STATE = "device-state"
    RESUME = "resume"
    DONE = "done"


class FphMigrationError(RuntimeError):
    """The fph migration failed in ``phase``; the source was resumed with its memory (see ``cleanup``)."""

    def __init__(self, phase: Phase, cause: BaseException, cleanup: list[str]) -> None:
        super().__init__(f"fph migration failed during {phase.value}: {type(cause).__name__}: {cause}")
        self.phase = phase
        self.cause = cause
        self.cleanup = cleanup


class BalloonDisconnectedError(RuntimeError):
    """The balloon's back-end connection dropped; unplugging it would abort QEMU (see the message)."""


class SourceNotRunningError(RuntimeError):
    """The source guest is not running and its write log can only arm while it runs (see the message)."""


class FphMigrationCancelledError(FphMigrationError):
    """``cancel()`` was asked for: the migration stopped at a round boundary and rolled back."""

    def __init__(self, phase: Phase, cleanup: list[str]) -> None:
        RuntimeError.__init__(self, f"fph migration cancelled by request during {phase.value}")
        self.phase = phase
        self.cause = InterruptedError("cancelled by request")
        self.cleanup = cleanup


@dataclass
class Balloon:
    """Where fph's balloon device lives on each side: QEMU ids and the destination back-end socket."""

    control: HintControl
    device_id: str = BALLOON_DEVICE_ID
    chardev_id: str = BALLOON_CHARDEV_ID
    ring_ranges: Callable[[], list[tuple[int, int]]] | None = None
    """GPA ranges of the device's used rings: fph writes them, no guest store logs them."""
    destination_socket: str | None = None
    """A back-end already listening for the destination's fresh balloon (None: no re-plug)."""
    queues: int = 4
    """The device's ``num_vqs`` (5 with free page reporting), for a balloon fph adds back."""


@dataclass
class FphConfig(PrecopyConfig):
    """The precopy rounds' settings plus what the QEMU side of an fph migration needs."""

    verify_sent: bool = True
    """Re-read every sent page at switchover (needed with the TCG write log)."""
    data_host: str = "127.0.0.1"
    device_deleted_timeout_s: float = 10.0
    migrate_timeout_s: float = 60.0
    receiver_prepare_timeout_s: float = 120.0
    """How long round 0 waits for the in-process receiver to allocate the destination RAM file."""


@dataclass
class FphReport(JobStatsView):
    """libvirt job-stat names (as for native migrations) plus fph's hint and sender figures."""

    mode: str
    status: str
    job_stats: dict[str, int]
    fph: dict[str, Any]
    rounds: list[dict[str, Any]]
    qemu_device_state: dict[str, Any]
    destination: dict[str, Any]
    hooks: list[HookEvent] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass
class _Resources:
    """What a running migration opened and must close, whatever happens."""

    src_ram: RamFile | None = None
    dst_ram: RamFile | None = None
    sender: RamSender | None = None
    receiver: RamReceiver | None = None
    throttle: VcpuThrottle | None = None
    connecting: concurrent.futures.Future[None] | None = None
    """The data connection being made while round 0 waits for the guest's hints."""

    def settle_connect(self) -> None:
        """Wait for a connect still in flight (bounded by the sender's socket timeout), so that nothing
        connects after the channel was aborted or closed: the channel has one owner at a time."""
        if self.connecting is not None:
            with contextlib.suppress(Exception):
                self.connecting.result()

    def release_throttle(self) -> list[str]:
        """The vCPUs back at full speed (idempotent); what could not be undone."""
        if self.throttle is None:
            return []
        problems = self.throttle.release()
        self.throttle = None
        return problems

    def close(self) -> None:
        self.release_throttle()
        self.settle_connect()
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.stop()
        for ram in (self.src_ram, self.dst_ram):
            if ram is not None:
                ram.close()


@dataclass
class _Progress:
    """How far the switchover got: what an abort must undo."""

    balloon_removed: bool = False
    src_stopped: bool = False
    dst_running: bool = False
    dst_unknown: bool = False
    """The device state went to a destination owned by another daemon that never said how it ended: the
    source must not resume (both could run), an operator decides."""


class FphMigration:
    """One fph-mode migration between two QEMUs whose RAM lives in files both fph and QEMU map.

    The destination QEMU runs with ``-incoming defer`` and the same devices as the source minus the
    balloon (the balloon is unmigratable: it is unplugged before switchover and re-plugged after).

    ``dst_qmp``: the destination QEMU, driven from here (one host). None: the destination's own daemon
    prepared it (PrepareIncoming: QEMU listening on ``uri``, a receiver at ``receiver_address`` asking for
    ``security``) and resumes it and plugs its balloon itself, and says so over the data channel.
    """

    mode = "fph"

    def __init__(
        self,
        *,
        src_qmp: str,
        dst_qmp: str | None,
        uri: str,
        layout: RamLayout,
        src_ram: Path,
        dst_ram: Path | None = None,
        receiver_address: tuple[str, int] | None = None,
        writelog: WriteLog,
        balloon: Balloon | None = None,
        config: FphConfig | None = None,
        hooks: Iterable[HookListener] = (),
        security: DataPlaneSecurity | None = None,
    ) -> None:
        self.src_qmp, self.dst_qmp, self.uri = src_qmp, dst_qmp, uri
        self.security = security
        if dst_qmp is None and receiver_address is None:
            raise ValueError("a destination owned by its daemon (dst_qmp None) needs its receiver_address")
        self.layout = layout
        if (dst_ram is None) == (receiver_address is None):
            raise ValueError(
                "give either dst_ram (fph runs the receiver here) or receiver_address (a remote one)"
            )
        self.src_ram_path = Path(src_ram)
        self.dst_ram_path = None if dst_ram is None else Path(dst_ram)
        self.receiver_address = receiver_address
        self.writelog = writelog
        self.balloon = balloon
        self.config = config or FphConfig()
        self.dispatcher = HookDispatcher(hooks)
        self.device_log = DeviceWriteLog(layout)
        self.phase = Phase.SETUP
        self.precopy: Precopy | None = None
        self._cancel = False
        self._rings: list[tuple[int, int]] = []
        self._res = _Resources()
        self._sync = 0
        self._src_before: _MigrationSettings | None = None

    # -------------------------------------------------------------------------------------- helpers

    def _harvest(self) -> npt.NDArray[np.uint64]:
        """Atomic fetch-and-clear of the guest's write log, OR the pages fph itself wrote (used rings)."""
        if self.balloon is not None and self.balloon.ring_ranges is not None:
            with contextlib.suppress(Exception):  # device gone: keep the last known rings
                self._rings = self.balloon.ring_ranges() or self._rings
        for gpa, length in self._rings:
            self.device_log.mark(gpa, length)
        words = self.writelog.harvest(vcpus_stopped=self.phase is Phase.STOPPED)
        return words | self.device_log.harvest()

    async def _hook(self, point: HookPoint) -> None:
        if point is HookPoint.BEFORE_SYNC:
            self._sync += 1
        await self.dispatcher.emit(HookEvent(point, self._sync, time.time(), observed=False))

    @property
    def receiver(self) -> RamReceiver | None:
        """The destination receiver while the migration runs (fault injection in tests)."""
        return self._res.receiver

    def cancel(self) -> None:
        """Ask the migration to stop at the next round boundary (it then aborts cleanly)."""
        self._cancel = True

    # ------------------------------------------------------------------------------------------ run

    async def run(self) -> FphReport:
        src = QMPConnection(self.src_qmp, "fph-engine-src")
        dst = None if self.dst_qmp is None else QMPConnection(self.dst_qmp, "fph-engine-dst")
        await src.connect()
        res = self._res
        progress = _Progress()
        try:
            if dst is not None:
                await dst.connect()
            return await self._run(src, dst, progress, res)
        except BaseException as exc:
            cleanup = await self._abort(src, dst, progress, res.sender, res.receiver, exc)
            if not isinstance(exc, Exception):  # the task was cancelled (or ^C): restored, and it goes on
                raise
            if self._cancel and isinstance(exc, InterruptedError):
                raise FphMigrationCancelledError(self.phase, cleanup) from exc
            raise FphMigrationError(self.phase, exc, cleanup) from exc
        finally:
            res.close()
            await src.close()
            if dst is not None:
                await dst.close()

    async def _run(
        self, src: QMPConnection, dst: QMPConnection | None, progress: _Progress, res: _Resources
    ) -> FphReport:
        cfg = self.config
        t_start = time.monotonic()
        self.phase = Phase.SETUP
        setup_ms: dict[str, float] = {}
        t_lap = [t_start]

        def lap(step: str) -> None:
            """Setup is on the critical path before round 0: each step's time goes in the report."""
            now = time.monotonic()
            setup_ms[step] = round((now - t_lap[0]) * 1e3, 1)
            t_lap[0] = now

        await self._refuse_a_disconnected_balloon()  # before anything on either QEMU changes
        await self._refuse_a_source_that_cannot_arm(src)
        await self._hook(HookPoint.SETUP)
        self.writelog.prepare()  # the TCG plugin retranslates the guest's code meanwhile; start() waits
        await self._wake_guest()
        lap("checks_and_hooks")
        receiver: RamReceiver | None = None
        if self.dst_ram_path is not None:
            dst_ram = res.dst_ram = RamFile(self.dst_ram_path, self.layout, writable=True)
            receiver = res.receiver = RamReceiver(dst_ram, cfg.data_host)  # prepares the RAM file first
            address = receiver.start()
        else:
            assert self.receiver_address is not None
            address = self.receiver_address  # a receiver on the destination host (fph.transfer.receiver)
        lap("receiver")
        self._src_before = await _migration_settings(src, FPH_INCOMING_CAPABILITIES)
        await src.execute("migrate-set-capabilities", capabilities_arg(FPH_INCOMING_CAPABILITIES))
        await src.execute("migrate-set-parameters", {"downtime-limit": int(cfg.downtime_limit_ms)})
        if dst is not None:  # else its daemon made it listen at PrepareIncoming
            await dst.execute("migrate-set-capabilities", capabilities_arg(FPH_INCOMING_CAPABILITIES))
            await dst.execute("migrate-incoming", {"uri": self.uri})
        lap("qemu_capabilities")
        src_ram = res.src_ram = RamFile(self.src_ram_path, self.layout, writable=False)
        channel = res.sender = RamSender(address, src_ram, bandwidth=cfg.bandwidth, security=self.security)
        # The TLS handshake completes once the destination has prepared its RAM file (seconds for GiBs,
        # when Migrate follows PrepareIncoming at once): connect while round 0 waits for the guest's hints.
        connecting = res.connecting = _in_thread(channel.connect, f"fph-connect-{address[0]}:{address[1]}")
        lap("data_connection_started")
        await asyncio.to_thread(warm_kernels)  # nothing compiles or loads later, inside the stop window
        lap("warm_kernels")
        bitmap = DirtyBitmap(self.layout)
        unavailable = await self._hinting_unavailable()
        skipped = None if unavailable is not None else await self._hinting_skipped(src_ram)
        lap("bitmap_and_balloon_view")
        if self.balloon is not None and unavailable is None and skipped is None:
            self.balloon.control.set_sink(bitmap)
        await asyncio.to_thread(self.writelog.start)
        self.device_log.start()
        lap("write_logs")

        def ready() -> None:
            """Round 0 sends once the data connection is up and, with a local receiver, its file ready."""
            connecting.result()
            if receiver is not None:
                receiver.wait_prepared(cfg.receiver_prepare_timeout_s)

        pc = self.precopy = Precopy(
            bitmap, src_ram, channel, self._harvest, self._hints(), cfg, ready,
            hints_unavailable=unavailable, hints_skipped=skipped,
        )  # fmt: skip
        lap("precopy")
        t_setup = time.monotonic()

        # ---- rounds, guest running, until the policy says a switchover now fits the downtime limit
        self.phase = Phase.ROUNDS
        pc.start()
        t_rounds = time.monotonic()
        unplug_ms = 0.0
        live_checked = False
        while True:
            await self._hook(HookPoint.BEFORE_SYNC)
            await asyncio.to_thread(pc.run_round)
            await self._hook(HookPoint.AFTER_SYNC)
            if self._cancel:
                raise InterruptedError("cancelled by request")
            if (
                pc.round == 1
                and cfg.hint_policy is HintPolicy.RELEASE_EARLY
                and self.balloon is not None
                and not progress.balloon_removed
            ):
                # release-early is done with the balloon after round 0 (DONE was read): unplug it now,
                # while the guest runs unthrottled and answers the ACPI eject at once. The guest frees its
                # blocks meanwhile (with page_poison, re-poisons each one): decide only after the next
                # round's harvest has seen that, never on the figures from before the unplug.
                self.phase = Phase.UNPLUG
                unplug_ms = await self._unplug(src, pc, progress, res)
                self.phase = Phase.ROUNDS
                continue
            # the decision reads guest RAM (the pages left's mix, the check's timed sample) and the RAM
            # file's holes: on a thread, as the round, so the daemon's loop keeps serving meanwhile
            decision = await asyncio.to_thread(pc.decide, time.monotonic() - t_rounds)
            if decision.throttle_pct != (res.throttle.pct if res.throttle else 0):
                await self._throttle(src, res, decision.throttle_pct)
            if decision.verdict is Verdict.FAIL:
                raise ConvergenceError(decision.reason)
            if decision.verdict is Verdict.SWITCH_OVER:
                # Every-round policy: the guest takes its blocks back now, while it runs; one more round
                # sends what that changed. Then the unplug finds nothing held.
                if await asyncio.to_thread(pc.release_before_switchover):
                    continue
                # The unplug runs with the guest running too, and one more round sends what the guest
                # wrote meanwhile: a slow unplug (a busy or throttled guest answers ACPI late) must not
                # land in the stop window.
                if self.balloon is not None and not progress.balloon_removed:
                    self.phase = Phase.UNPLUG
                    unplug_ms = await self._unplug(src, pc, progress, res)
                    self.phase = Phase.ROUNDS
                    continue
                # Device writes (DMA) are in no log: the switchover check's reads, once while the guest
                # runs, so what they find goes in one more live round, not in the stop window.
                if cfg.verify_sent and cfg.live_check_min_pages and not live_checked:
                    live_checked = True
                    if await asyncio.to_thread(pc.live_check) >= cfg.live_check_min_pages:
                        continue
                break

        # ---- switchover
        self.phase = Phase.UNPLUG
        if self.balloon is not None and not progress.balloon_removed:
            unplug_ms = await self._unplug(src, pc, progress, res)
        predicted_ms = pc.result.decisions[-1].predicted_downtime_ms if pc.result.decisions else None
        stop_window = _StopWindow()
        await src.execute("stop")
        t_stop = stop_window.mark("stop")
        progress.src_stopped = True
        self.phase = Phase.STOPPED
        log.info("source stopped for the final round", extra={"sync": self._sync + 1})
        await self._hook(HookPoint.BEFORE_SYNC)
        # the switchover check reads what the final round does not send, on a thread of its own meanwhile
        final = await asyncio.to_thread(pc.final_round, check_beside=cfg.verify_sent)
        await self._hook(HookPoint.AFTER_SYNC)
        final_ms = (stop_window.mark("final_round") - t_stop) * 1e3
        if cfg.verify_sent:
            await asyncio.to_thread(pc.verify_and_resend)
            stop_window.mark("recheck")
        ack = await asyncio.to_thread(channel.finish, {"rounds": pc.round})
        rx = None
        if receiver is not None:
            rx = await asyncio.to_thread(receiver.wait, 30.0)
            if not rx.ok:
                raise RuntimeError(f"destination receiver: {rx.error}")
        t_pages_done = stop_window.mark("destination_ack")

        self.phase = Phase.DEVICE_STATE
        device_state = await self._migrate_device_state(src)
        stop_window.mark("qemu_device_state")
        await self._hook(HookPoint.COMPLETE)
        self.phase = Phase.RESUME
        destination_word: dict[str, Any] | None = None
        if dst is not None:
            await resume_incoming(dst, self.config.migrate_timeout_s)
        else:
            destination_word = await self._destination_word(channel, progress)
        t_resumed = stop_window.mark("cont")
        progress.dst_running = True
        res.release_throttle()
        replug_ms = None
        b = self.balloon
        if dst is not None and b is not None and b.destination_socket:
            t = time.monotonic()
            await plug_balloon(dst, b.device_id, b.chardev_id, b.destination_socket, b.queues)
            replug_ms = (time.monotonic() - t) * 1e3
        await self._hook(HookPoint.CLEANUP)
        self.phase = Phase.DONE
        return self._report(
            pc=pc,
            final=final,
            ack=ack,
            rx=rx,
            device_state=device_state,
            times={
                "start": t_start,
                "setup": t_setup,
                "stop": t_stop,
                "pages_done": t_pages_done,
                "resumed": t_resumed,
            },
            extra={
                "hinting": pc.result.hinting,
                "predicted_downtime_ms": None if predicted_ms is None else round(predicted_ms, 1),
                "downtime_limit_ms": cfg.downtime_limit_ms,
                "downtime_breakdown_ms": stop_window.breakdown_ms(),
                "setup_breakdown_ms": setup_ms,
                "throttle_max_pct": max((d.throttle_pct for d in pc.result.decisions), default=0),
                "out_dirtied": pc.convergence.out_dirtied,
                "decisions": [_decision_dict(d) for d in pc.result.decisions],
                "bandwidth_cap_bps": cfg.bandwidth or 0,
                "max_window_rate_bps": round(channel.meter.max_window_rate()),
                "unplug_ms": round(unplug_ms, 1),
                "final_round_ms": round(final_ms, 1),
                "replug_ms": None if replug_ms is None else round(replug_ms, 1),
                "destination_prepare_s": None if receiver is None else round(receiver.prepare_s, 3),
                "destination_daemon": destination_word,
                "data_plane_tls": bool(self.security and self.security.tls),
            },
        )

    async def _destination_word(self, channel: RamSender, progress: _Progress) -> dict[str, Any]:
        """The destination daemon's RESUMED frame: it resumed its QEMU (and says what else it did), or it
        could not and has torn its QEMU down (the source may resume), or silence (nobody can tell)."""
        try:
            word = await asyncio.to_thread(channel.wait_resumed, self.config.migrate_timeout_s)
        except ChannelError as exc:
            progress.dst_unknown = True
            raise DestinationError(
                f"the destination daemon did not say whether its QEMU runs: {exc}"
            ) from exc
        if not word.get("resumed"):
            raise DestinationError(f"the destination daemon could not resume its QEMU: {word.get('error')}")
        return word

    def _hints(self) -> HintControl | None:
        return self.balloon.control if self.balloon is not None else None

    async def _unplug(self, src: QMPConnection, pc: Precopy, progress: _Progress, res: _Resources) -> float:
        """Close the hint epoch for good and device_del the balloon (unmigratable); returns how long it
        took. After it no hint can arrive: the rounds go on without hints. A throttle is lifted meanwhile:
        the guest needs its CPU to answer the ACPI eject (at 99% a 10 s wait ran out)."""
        assert self.balloon is not None
        t = time.monotonic()
        pc.detach_hints()
        throttled = res.throttle.pct if res.throttle is not None else 0
        if throttled:
            await self._throttle(src, res, 0)
        await self._refuse_a_disconnected_balloon()
        await self._device_del(src, self.balloon.device_id)
        progress.balloon_removed = True
        if throttled:
            await self._throttle(src, res, throttled)
        pc.convergence.costs.unplug_ms = 0.0  # done: the stop no longer waits for it
        return (time.monotonic() - t) * 1e3

    async def _refuse_a_disconnected_balloon(self) -> None:
        """QEMU 11.1 aborts on any config access to a vhost-user device whose back-end connection dropped
        (device_del included): such a balloon is never unplugged, so the VM cannot be migrated by fph."""
        view = getattr(self.balloon.control, "view_async", None) if self.balloon is not None else None
        if view is None:
            return
        v = await view()
        if not v.connected:
            raise BalloonDisconnectedError(
                "the balloon's vhost-user connection to QEMU dropped: QEMU 11.1 aborts on device_del of "
                "such a device, so fph will not unplug it and cannot migrate this VM. The VM keeps running; "
                "shut it down from inside the guest when convenient and start it again with its balloon "
                "(QEMU cannot re-attach a back-end to a running vhost-user device)"
            )

    async def _refuse_a_source_that_cannot_arm(self, src: QMPConnection) -> None:
        """The TCG write-log plugin arms at the next block a vCPU runs: a paused guest never arms it, and
        ``start()`` would give up after its timeout. Say so at once, with the options."""
        if not self.writelog.arms_on_guest_code:
            return
        status = (await src.execute("query-status")).get("status")
        if status != "running":
            raise SourceNotRunningError(
                f"the source guest is {status}: fph's TCG write log arms only while the guest runs code, so "
                "fph mode cannot migrate it now. Nothing was changed; resume it (QMP cont) and migrate, or "
                "migrate it in native mode, which moves a paused guest"
            )

    async def _hinting_skipped(self, ram: RamFile | None = None) -> str | None:
        """Why hinting would not pay for this guest (see ``PrecopyConfig.hint_poisoned_guests`` and
        ``hint_reporting_guests``), or None."""
        view = getattr(self.balloon.control, "view_async", None) if self.balloon is not None else None
        if view is None:
            return None
        v = await view()
        if v.acked & F_REPORTING and not self.config.hint_reporting_guests:
            t0 = time.monotonic()
            behind = await self._reporting_behind(ram)
            if behind is None or behind > self._reporting_lag_bytes():
                log.info("free page reporting behind or unknown: hinting", extra={"unreported_bytes": behind})
                return None  # freed memory not (known to be) reported yet (the guest reports every 2 s)
            seen = f", {behind >> 20} MiB of its free memory not yet punched"
            return (
                "the guest reports its free memory (free page reporting): fph punched it out of the RAM "
                "file, and round 0 skips those holes unread; a hint run would take the blocks back from "
                f"the host{seen}, "
                f"after {time.monotonic() - t0:.1f} s"
            )
        if v.poison_val and not self.config.hint_poisoned_guests:
            return (
                f"the guest poisons its free pages (value {v.poison_val:#x}): each is a FILL marker on the "
                "wire, cheaper than a hint run and the re-poisoning of every block the guest gets back"
            )
        return None

    def _reporting_lag_bytes(self) -> int:
        """Guest free memory not yet a hole in the RAM file that still skips the hint run: memory in runs
        smaller than 2 MiB is never reported, so a little always stays."""
        return max(128 << 20, self.layout.ram_bytes // 16)

    async def _reporting_behind(self, ram: RamFile | None) -> int | None:
        """The guest's free memory (fresh stats) that is not yet a hole in the source RAM file, once
        reporting caught up or ``reporting_wait_s`` passed; None where it cannot be known."""
        if ram is None:
            return None
        ctl = self.balloon.control if self.balloon is not None else None
        stats = await self._fresh_guest_stats(ctl)
        free = None if stats is None else stats.values.get("free_memory")
        if free is None:
            return None

        async def behind_now() -> int:
            extents = await asyncio.to_thread(ram.data_extents)
            return max(0, free - (self.layout.ram_bytes - sum(length for _, length in extents)))

        t0 = time.monotonic()
        behind = await behind_now()
        wait = ReportingWait(behind, self._reporting_lag_bytes(), self.config.reporting_wait_s)
        while True:
            verdict, why = wait.verdict(behind, time.monotonic() - t0)
            if verdict is not CatchUp.WAIT:
                log.info(
                    "free page reporting wait",
                    extra={"verdict": verdict.value, "why": why, "guest_free_bytes": free},
                )
                return behind
            await asyncio.sleep(0.25)
            behind = await behind_now()

    @staticmethod
    async def _fresh_guest_stats(ctl: Any, timeout_s: float = 2.0) -> GuestStats | None:
        """Stats the guest wrote after this call began (it refills its buffer once the device hands it
        back), or None if none came within ``timeout_s``. Older figures can predate what the guest just
        freed: a 1 GiB guest's stats said 767 MiB free where ~880 MiB were, so the wait saw reporting
        caught up, skipped the hint run and sent 200 MB of stale free memory (twohost_bench-ioa0)."""
        request = getattr(ctl, "request_stats_async", None)
        read = getattr(ctl, "guest_stats_async", None)
        if request is None or read is None:
            return None
        t0 = time.monotonic()
        requested = False
        while True:
            if not requested:  # False while the guest still holds the buffer of an earlier request
                requested = await request()
            stats: GuestStats = await read()
            if stats.updated is not None and stats.updated > t0:
                return stats
            if time.monotonic() - t0 >= timeout_s:
                log.warning("the guest sent no fresh stats", extra={"timeout_s": timeout_s})
                return None
            await asyncio.sleep(0.02)

    async def _wake_guest(self) -> None:
        """Hand the guest its stats buffer back: an interrupt it answers at once, so a halted vCPU runs code
        and the TCG write-log plugin arms now, not at the guest's next timer interrupt (an idle 1 GiB
        guest's arming took 37-373 ms without this; twohost_bench-s20). Nothing else depends on it."""
        control = self.balloon.control if self.balloon is not None else None
        request = getattr(control, "request_stats_async", None)
        if request is None:
            return
        try:
            await request()
        except Exception as exc:  # a wake-up only: the plugin arms at the guest's next interrupt anyway
            log.info("could not hand the guest its stats buffer back", extra={"error": str(exc)})

    async def _hinting_unavailable(self) -> str | None:
        """Why this guest cannot hint (it is then migrated without hints), or None if it can."""
        if self.balloon is None:
            return "no balloon device"
        view = getattr(self.balloon.control, "view_async", None)
        if view is None:
            return None  # a control without a view (tests): the request itself will tell
        v = await view()
        if v.broken:
            return f"the balloon device is broken ({v.broken})"
        if not v.connected:
            return "no front-end (QEMU) is connected to the balloon socket"
        if not v.acked:
            return "the guest has no virtio_balloon driver bound to the device"
        if not v.acked & F_FREE_PAGE_HINT:
            return "the guest's driver did not negotiate FREE_PAGE_HINT"
        if not v.has_channel:
            return "no back-end channel to raise a config interrupt on"
        return None

    async def _throttle(self, src: QMPConnection, res: _Resources, pct: int) -> None:
        """The vCPUs get (100 - pct)% of their CPU time; a host that cannot throttle is logged, and the
        policy's time budget then ends the migration."""
        try:
            if res.throttle is None:
                pid, tids = vcpu_threads(list(await src.execute("query-cpus-fast")))
                res.throttle = VcpuThrottle(pid, tids, "vm")
            await asyncio.to_thread(res.throttle.set, pct)
        except ThrottleError as exc:
            log.error("cannot throttle the guest's vCPUs: %s", exc)

    async def _device_del(self, conn: QMPConnection, device_id: str) -> None:
        listener = conn.listener(("DEVICE_DELETED",))
        try:
            await conn.execute("device_del", {"id": device_id})
            log.info("balloon unplug requested", extra={"device": device_id})  # QEMU and the guest eject it
            deadline = time.monotonic() + self.config.device_deleted_timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no DEVICE_DELETED for {device_id} in {self.config.device_deleted_timeout_s} s"
                    )
                ev = await asyncio.wait_for(listener.get(), remaining)
                if _event_data(ev).get("device") == device_id:
                    return
        finally:
            conn.remove_listener(listener)

    async def _migrate_device_state(self, src: QMPConnection) -> dict[str, Any]:
        listener = src.listener(("MIGRATION",))
        try:
            await src.execute("migrate", {"uri": self.uri})
            deadline = time.monotonic() + self.config.migrate_timeout_s
            status = "setup"
            while status not in FINAL_STATUSES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"device-state migration not finished in {self.config.migrate_timeout_s} s"
                    )
                try:
                    ev = await asyncio.wait_for(listener.get(), min(remaining, 0.5))
                    status = str(_event_data(ev).get("status", status))
                except TimeoutError:
                    status = str((await src.execute("query-migrate")).get("status", status))
        finally:
            src.remove_listener(listener)
        info: dict[str, Any] = {}
        for _ in range(100):
            info = dict(await src.execute("query-migrate"))
            if figures_final(info):
                break
            await asyncio.sleep(0.02)
        if info.get("status") != "completed":
            raise RuntimeError(f"QEMU device-state migration {info.get('status')}: {info.get('error-desc')}")
        return info

    # ---------------------------------------------------------------------------------------- abort

    async def _abort(
        self,
        src: QMPConnection,
        dst: QMPConnection | None,
        progress: _Progress,
        channel: RamSender | None,
        receiver: RamReceiver | None,
        exc: BaseException,
    ) -> list[str]:
        """Undo what can be undone; every step is attempted, and each one's outcome is reported."""
        done: list[str] = []

        async def attempt(what: str, action: Callable[[], Awaitable[Any]]) -> None:
            try:
                await action()
                done.append(what)
            except Exception as e:
                done.append(f"{what} FAILED: {e}")

        log.error("fph migration failed during %s: %s", self.phase.value, exc)
        await asyncio.to_thread(self._res.settle_connect)
        if channel is not None:
            channel.abort(f"source aborted during {self.phase.value}: {exc}")
            done.append("data channel aborted")
        if receiver is not None:
            receiver.stop()
        if progress.dst_running:
            return done  # the guest runs on the destination: nothing to undo on the source
        if progress.dst_unknown:
            done.append(
                "source left stopped: its device state reached a destination whose daemon never said whether "
                "it runs; resume the source (cont) only once the destination QEMU is known to be gone"
            )
            return done
        with contextlib.suppress(Exception):
            await src.execute("migrate_cancel")
        if dst is None:
            done.append("destination left to its daemon (it tears its QEMU down when the stream fails)")
        else:
            try:
                await dst.execute("quit")
                done.append("destination QEMU quit")
            except QMPError:  # already gone (killed, or it failed first)
                done.append("destination QEMU already gone")
        for problem in self._res.release_throttle():
            done.append(f"vCPU throttle release FAILED: {problem}")
        before = self._src_before
        if before is not None:  # the source migrates again later, maybe natively: x-ignore-shared must go
            await attempt("source migration capabilities restored", lambda: before.restore(src))
        if progress.src_stopped:
            await attempt("source resumed (cont)", lambda: src.execute("cont"))
        if self.balloon is not None:
            if progress.balloon_removed:  # device_del keeps the chardev: add the device back on it
                await attempt("balloon re-added on the source", lambda: self._readd(src))
            else:
                ctl = self.balloon.control
                await attempt("DONE sent to the guest", lambda: asyncio.to_thread(ctl.done))
        await self._hook(HookPoint.CLEANUP)
        return done

    async def _readd(self, src: QMPConnection) -> None:
        assert self.balloon is not None
        await add_balloon_device(src, self.balloon.device_id, self.balloon.chardev_id, self.balloon.queues)

    # --------------------------------------------------------------------------------------- report

    def _report(
        self,
        *,
        pc: Precopy,
        final: RoundStats,
        ack: dict[str, Any],
        rx: ReceiverResult | None,
        device_state: dict[str, Any],
        times: dict[str, float],
        extra: dict[str, Any],
    ) -> FphReport:
        rounds = [*pc.result.rounds, final]
        data_pages = sum(r.pages_data for r in rounds) + pc.result.verify_pages_resent
        zero_sent = sum(r.pages_zero_sent for r in rounds)
        zero_skipped = sum(r.pages_zero_skipped for r in rounds)
        wire = pc.channel.counters.bytes_on_wire
        qemu = job_stats(device_state)
        qemu_bytes = qemu.get("memory_processed", 0)
        elapsed_ms = (times["resumed"] - times["start"]) * 1e3
        send_s = max(1e-6, sum(r.send_ms for r in rounds) / 1e3)
        st = pc.bitmap.stats
        stats = {
            "memory_total": self.layout.ram_bytes,
            "memory_processed": wire + qemu_bytes,
            "memory_remaining": 0,
            "memory_constant": zero_sent + zero_skipped + pc.result.pages_unread_holes,
            "memory_normal": data_pages,
            "memory_normal_bytes": data_pages * PAGE_SIZE,
            "memory_dirty_rate": int(pc.result.rounds[-1].dirty_rate_pps) if pc.result.rounds else 0,
            "memory_iteration": len(rounds),
            "memory_page_size": PAGE_SIZE,
            "memory_bps": int(wire / send_s),
            "downtime": round((times["resumed"] - times["stop"]) * 1e3),
            "setup_time": round((times["setup"] - times["start"]) * 1e3),
            "time_elapsed": round(elapsed_ms),
        }
        fph = {
            "hinted_bytes": st.hinted_pages * PAGE_SIZE,
            "hint_bits_cleared": st.hint_bits_cleared,
            "stale_hints_dropped": st.hints_dropped_stale,
            "hints_rejected_invalid": st.hints_rejected_invalid,
            "redirtied_after_hint": st.redirtied_after_hint,
            "hinted_pages_unwritten": st.hinted_unwritten,
            "hint_waste_pages": sum(r.hint_waste_pages for r in rounds),
            "first_hint_run": self.config.first_hint_run.value,
            "log_pages_marked": st.log_pages_marked,
            "zero_pages_sent": zero_sent,
            "zero_pages_skipped": zero_skipped,
            "zero_pages_unread": pc.result.pages_unread_holes,
            "hole_pages_unread_in_rounds": sum(r.pages_hole_unread for r in rounds),
            "holes_filled": pc.result.holes_filled,
            "pages_changed_found_live": pc.result.live_check_pages_changed,
            "live_check_ms": round(pc.result.live_check_ms, 1),
            "pages_resent_by_check": pc.result.verify_pages_resent,
            "pages_zeroed_by_check": pc.result.verify_pages_zeroed,
            "pages_checked_at_switchover": pc.result.verify_pages_checked,
            "switchover_check_ms": round(pc.result.verify_ms, 1),
            "switchover_check_beside_final_round_ms": round(pc.result.verify_beside_final_ms, 1),
            "bytes_on_wire": wire,
            "qemu_device_state_bytes": qemu_bytes,
            "converged": pc.result.converged,
            "writelog": self.writelog.describe(),
            **extra,
        }
        errors = []
        if stats["downtime"] > self.config.downtime_limit_ms:
            errors.append(
                f"downtime {stats['downtime']} ms exceeded the limit {self.config.downtime_limit_ms:g} ms "
                f"(predicted {extra.get('predicted_downtime_ms')} ms)"
            )
        fph["errors"] = errors
        return FphReport(
            mode=self.mode,
            status="completed",
            job_stats=stats,
            fph=fph,
            rounds=[asdict(r) for r in rounds],
            qemu_device_state=device_state,
            destination={"ack": ack, "receiver": None if rx is None else asdict(rx)},
            hooks=list(self.dispatcher.history),
            wall_s=elapsed_ms / 1e3,
        )


@dataclass
class _StopWindow:
    """Times of the steps between ``stop`` and ``cont``: the downtime, phase by phase."""

    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, step: str) -> float:
        t = time.monotonic()
        self.marks.append((step, t))
        return t

    def breakdown_ms(self) -> dict[str, float]:
        return {b[0]: round((b[1] - a[1]) * 1e3, 2) for a, b in itertools.pairwise(self.marks)}


def _decision_dict(d: Decision) -> dict[str, Any]:
    return {
        "verdict": d.verdict.value,
        "predicted_downtime_ms": round(d.predicted_downtime_ms, 1),
        "dirty_rate_bps": round(d.dirty_rate_bps),
        "wire_rate_bps": round(d.wire_rate_bps),
        "page_rate_pps": round(d.page_rate_pps),
        "throttle_pct": d.throttle_pct,
        "reason": d.reason,
    }


@dataclass(frozen=True)
class _MigrationSettings:
    """The source QEMU's migration settings fph changes, as they were before (restored on an abort)."""

    capabilities: dict[str, bool]
    downtime_limit_ms: int | None

    async def restore(self, conn: QMPConnection) -> None:
        await conn.execute("migrate-set-capabilities", capabilities_arg(self.capabilities))
        if self.downtime_limit_ms is not None:
            await conn.execute("migrate-set-parameters", {"downtime-limit": self.downtime_limit_ms})


async def _migration_settings(conn: QMPConnection, changed: dict[str, bool]) -> _MigrationSettings:
    caps = {str(c["capability"]): bool(c["state"]) for c in await conn.execute("query-migrate-capabilities")}
    params = dict(await conn.execute("query-migrate-parameters"))
    limit = params.get("downtime-limit")
    return _MigrationSettings(
        {k: caps[k] for k in changed if k in caps}, None if limit is None else int(limit)
    )


def _in_thread(fn: Callable[[], None], name: str) -> concurrent.futures.Future[None]:
    """Run ``fn`` on a thread of its own; its outcome as a future any thread can wait on."""
    fut: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


def warm_kernels() -> None:
    """Compile (or load from numba's cache) every kernel a migration runs. Each migration calls it before its
    rounds (cheap once done); a daemon also calls it at start, so its first migration does not spend ~0.4 s
    loading them (twohost_bench: ``warm_kernels`` 426 ms in the setup of a daemon's first fph run)."""
    dirty_bitmap.warm_up()
    pagehash.warm_up()


def _event_data(event: Any) -> dict[str, Any]:
    data = event.get("data")
    return dict(data) if isinstance(data, dict) else {}
