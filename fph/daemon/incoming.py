"""The destination side of a migration, owned by the destination host's daemon (PrepareIncoming).

The source host's daemon never touches this host's QEMU: from PrepareIncoming on, this daemon has its
QEMU listening for the device state on the data network, the RAM file allocated behind a receiver that
admits only the source holding this migration's one-time credential (over mutual TLS where
configured), and a watcher that finishes the job: once every page has landed and QEMU has loaded the
device state, ``cont``, then a word to the source over the data connection (RESUMED), then a fresh balloon.
When the stream fails, the watcher tears its QEMU down (the source resumes its own) and says why.
Preparing ahead also keeps the destination's allocation off the critical path (measured: 3 s for 1 GiB
when it ran inside the migration); the receiver takes the source at once, while it allocates.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fph.daemon.migration_mode import MigrationMode
from fph.daemon.qemu_exit import ProcessExit, socket_owner_pid
from fph.daemon.recovery import ABORTED
from fph.migration.destination import (
    BALLOON_CHARDEV_ID,
    BALLOON_DEVICE_ID,
    FPH_INCOMING_CAPABILITIES,
    NATIVE_INCOMING_CAPABILITIES,
    DestinationError,
    arrived_by_fph,
    device_state_arrived,
    listen_incoming,
    plug_balloon,
    resume_incoming,
)
from fph.qmp import QMPConnection, QMPError
from fph.ram_layout import RamLayout
from fph.transfer.ram_file import RamFile
from fph.transfer.receiver import FilePrep, RamReceiver, ReceiverResult
from fph.transfer.security import DataPlaneSecurity, TlsFiles, new_credential

log = logging.getLogger(__name__)

#: A prepared destination waits this long for its source before it gives up (and frees its mapping).
ACCEPT_TIMEOUT_S = 3600.0
#: From the last page to a running QEMU: QEMU's device state must have loaded by then.
RESUME_TIMEOUT_S = 60.0
#: After a restart: a destination found loading its device state (milliseconds of it) finishes by then.
RESTART_RESUME_TIMEOUT_S = 5.0
#: After a restart: the whole of finishing one destination (resume, fresh balloon) is bounded by this.
RESTART_FINISH_TIMEOUT_S = 15.0
NATIVE_POLL_S = 0.1


class IncomingState(enum.Enum):
    PREPARED = "prepared"
    """QEMU listens, the receiver waits for the source."""
    RESUMED = "resumed"
    """The guest runs here."""
    FAILED = "failed"
    """The stream or the resume failed; this QEMU was told to quit."""
    CLOSED = "closed"
    """Given up by the daemon (unregistered, shut down) before it ended."""


@dataclass(frozen=True)
class DataPlane:
    """This host's side of the data network: where receivers and QEMU listen, and the TLS files."""

    host: str = "127.0.0.1"
    tls: TlsFiles | None = None


@dataclass
class IncomingSession:
    """One incoming migration: QEMU listening on ``migration_uri``, for fph mode a receiver at
    ``data_address`` (None for native/none, where QEMU moves RAM itself)."""

    vm: str
    mode: MigrationMode | None
    """None: a destination a dead daemon had prepared, re-adopted after a restart (``abandon_incoming``)."""
    qmp_socket: Path
    migration_uri: str
    credential: str
    tls: bool
    ram: RamFile | None = None
    receiver: RamReceiver | None = None
    balloon_socket: str = ""
    balloon_queues: int = 4
    """``num_vqs`` of the fresh balloon (5 when this VM's worker offers free page reporting)."""
    state: IncomingState = IncomingState.PREPARED
    error: str = ""
    note: str = ""
    """How a session the dead daemon left was finished by its successor (resumed after a restart)."""
    events: list[str] = field(default_factory=list)
    """What the watcher did, in order: for GetVm and the logs."""
    started: float = field(default_factory=time.time)
    qemu_pid: int | None = None
    """This QEMU's PID (from its QMP socket): its exit fails the session while pages still arrive."""
    on_end: Callable[[IncomingSession], None] | None = None
    """Called once the session has ended (resumed, failed or closed), on the daemon's loop."""
    _closed: threading.Event = field(default_factory=threading.Event)
    _task: asyncio.Task[None] | None = None

    @property
    def data_address(self) -> str:
        return "" if self.receiver is None else f"{self.receiver.address[0]}:{self.receiver.address[1]}"

    @classmethod
    async def prepare(
        cls,
        *,
        vm: str,
        mode: MigrationMode,
        qmp_socket: Path,
        ram_file: Path,
        layout: RamLayout,
        balloon_socket: str,
        plane: DataPlane,
        balloon_queues: int = 4,
        on_end: Callable[[IncomingSession], None] | None = None,
    ) -> IncomingSession:
        """Listen (QEMU, and the receiver for fph mode) and start the watcher; on any failure nothing stays
        open here (QEMU may be left listening: its migrate-incoming cannot be taken back)."""
        credential = new_credential()
        ram = receiver = None
        if mode is MigrationMode.FPH:
            ram = await asyncio.to_thread(RamFile, ram_file, layout, writable=True)
            try:
                receiver = RamReceiver(
                    ram,
                    plane.host,
                    accept_timeout=ACCEPT_TIMEOUT_S,
                    security=DataPlaneSecurity(credential, plane.tls),
                    hold_for_resume=True,
                    prepare=FilePrep.ALLOCATE,  # the source may send at once: no populate under it
                )
                receiver.start()  # allocates the file in a thread of its own; listens meanwhile
            except Exception:
                ram.close()
                raise
        try:
            caps = FPH_INCOMING_CAPABILITIES if mode is MigrationMode.FPH else NATIVE_INCOMING_CAPABILITIES
            conn = QMPConnection(str(qmp_socket), "fph-daemon-incoming")
            await conn.connect(timeout=5.0)
            try:
                uri = await listen_incoming(conn, caps, plane.host)
            finally:
                await conn.close()
            qemu_pid = await asyncio.to_thread(socket_owner_pid, qmp_socket)
        except BaseException:
            if receiver is not None:
                receiver.stop()
            if ram is not None:
                ram.close()
            raise
        session = cls(
            vm, mode, qmp_socket, uri, credential, plane.tls is not None, ram, receiver, balloon_socket,
            balloon_queues, qemu_pid=qemu_pid, on_end=on_end,
        )  # fmt: skip
        session._task = asyncio.create_task(session._watch(), name=f"fph-incoming-{vm}")
        log.info(
            "incoming prepared",
            extra={
                "vm": vm,
                "mode": mode.value,
                "uri": uri,
                "data_address": session.data_address,
                "tls": session.tls,
            },
        )
        return session

    # ----------------------------------------------------------------------------------- the watcher

    def _note(self, what: str) -> None:
        self.events.append(what)
        log.info("incoming: %s", what, extra={"vm": self.vm})

    async def _watch(self) -> None:
        try:
            if self.receiver is not None:
                rx = await self._receive(self.receiver)
                if self._closed.is_set():
                    return
                if not rx.ok:
                    raise DestinationError(f"RAM stream: {rx.error}")
                self._note(f"every page landed ({rx.counters.get('pages', 0)} with data)")
                await self._resume(RESUME_TIMEOUT_S, 0.001)
            else:
                await self._resume(ACCEPT_TIMEOUT_S, NATIVE_POLL_S)
            if self._closed.is_set():
                return
            self.state = IncomingState.RESUMED
            self._note("QEMU resumed: the guest runs here")
            if self.receiver is not None:
                self.receiver.send_resumed({"resumed": True, "status": "running", "vm": self.vm})
            # QEMU's own migrations carry their devices
            if self.balloon_socket and self.mode is MigrationMode.FPH:
                await self._replug()
        except Exception as exc:
            await self._fail(exc)
        finally:
            self._release()
            if self.on_end is not None:
                self.on_end(self)

    async def _receive(self, receiver: RamReceiver) -> ReceiverResult:
        """The RAM stream's outcome; if this QEMU exits first, the stream is cut at once, so the source
        rolls back now rather than after sending every round to a destination that cannot resume."""
        stream = asyncio.ensure_future(asyncio.to_thread(receiver.wait, None))
        exit_watch = None
        if self.qemu_pid is not None:
            try:
                exit_watch = ProcessExit(self.qemu_pid)
            except OSError:  # already gone
                receiver.stop()
                raise DestinationError(f"QEMU (pid {self.qemu_pid}) exited before the RAM stream") from None
        if exit_watch is None:
            return await stream
        try:
            exited = asyncio.ensure_future(exit_watch.wait())
            await asyncio.wait({stream, exited}, return_when=asyncio.FIRST_COMPLETED)
            if stream.done():
                exited.cancel()
                return stream.result()
            receiver.stop()
            with contextlib.suppress(Exception):
                await stream
            raise DestinationError(f"QEMU (pid {self.qemu_pid}) exited while the RAM stream was open")
        finally:
            exit_watch.close()

    async def _resume(self, timeout: float, poll_s: float) -> None:
        """Wait until QEMU has loaded the device state, then make sure it runs (cont if it came paused)."""
        deadline = time.monotonic() + timeout
        while not self._closed.is_set():
            conn = QMPConnection(str(self.qmp_socket), "fph-daemon-incoming")
            await conn.connect(timeout=5.0)
            try:
                if poll_s < 0.01:  # fph: the device state follows the last page within seconds
                    await resume_incoming(conn, max(0.0, deadline - time.monotonic()))
                    return
                status = str((await conn.execute("query-status")).get("status"))
                if status != "inmigrate":
                    await resume_incoming(conn, RESUME_TIMEOUT_S)
                    return
            finally:
                await conn.close()
            if time.monotonic() > deadline:
                raise DestinationError(f"no migration arrived in {timeout:.0f} s")
            await asyncio.sleep(poll_s)

    async def _replug(self) -> None:
        conn = QMPConnection(str(self.qmp_socket), "fph-daemon-incoming")
        try:
            await conn.connect(timeout=5.0)
            try:
                log.info("balloon re-plug requested", extra={"vm": self.vm, "socket": self.balloon_socket})
                await plug_balloon(
                    conn, BALLOON_DEVICE_ID, BALLOON_CHARDEV_ID, self.balloon_socket, self.balloon_queues
                )
            finally:
                await conn.close()
            self._note(f"fresh balloon plugged on {self.balloon_socket}")
        except (QMPError, OSError, DestinationError) as exc:
            self._note(f"balloon re-plug FAILED: {exc} (the guest runs without fph's balloon)")

    async def _fail(self, exc: BaseException) -> None:
        """Tear this side down first, then tell the source: it resumes its own guest only once this QEMU
        cannot run it any more (a QEMU that runs the guest after all is left running, and the source is
        told so: two running copies would corrupt the guest's disks)."""
        self.error = f"{type(exc).__name__}: {exc}"
        log.error("incoming migration failed: %s", self.error, extra={"vm": self.vm})
        running = await self._tear_down()
        if self.receiver is not None:
            with contextlib.suppress(Exception):
                self.receiver.send_resumed({"resumed": running, "error": self.error})
        self.state = IncomingState.FAILED

    async def _tear_down(self) -> bool:
        """``quit`` this QEMU unless it runs the guest; True if it does."""
        try:
            conn = QMPConnection(str(self.qmp_socket), "fph-daemon-incoming")
            await conn.connect(timeout=5.0)
            try:
                status = str((await conn.execute("query-status")).get("status"))
                if status == "running":
                    self._note("QEMU runs the guest after all: left running")
                    return True
                await conn.execute("quit")
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()
            self._note("QEMU told to quit (the source keeps the guest)")
        except (QMPError, OSError) as e:
            self._note(f"QEMU already gone ({type(e).__name__})")
        return False

    async def _finish_after_restart(self, conn: QMPConnection) -> None:
        """``abandon_incoming``'s decision, on this QEMU's monitor."""
        status = str((await conn.execute("query-status")).get("status"))
        if status == "running":
            self._note("QEMU runs the guest: the migration had completed before the restart")
        elif await device_state_arrived(conn):
            await resume_incoming(conn, RESTART_RESUME_TIMEOUT_S)
            self._note(f"QEMU held the device state ({status}): resumed, the source had handed over")
        else:
            with contextlib.suppress(QMPError, OSError):  # it may exit before it answers
                await conn.execute("quit")
            self._note("QEMU told to quit (the source keeps the guest)")
            self.state, self.error = IncomingState.FAILED, ABORTED
            return
        self.state = IncomingState.RESUMED
        self.note = "finished by the restarted daemon"
        if not self.balloon_socket or not await arrived_by_fph(conn):
            return  # no fph balloon here, or QEMU's own migration carried its devices
        children = await conn.execute("qom-list", {"path": "/machine/peripheral"})
        if any(c.get("name") == BALLOON_DEVICE_ID for c in children):
            self._note("the fresh balloon was already plugged")
            return
        try:
            await plug_balloon(
                conn, BALLOON_DEVICE_ID, BALLOON_CHARDEV_ID, self.balloon_socket, self.balloon_queues
            )
            self._note(f"fresh balloon plugged on {self.balloon_socket}")
        except (QMPError, DestinationError) as exc:
            self._note(f"balloon re-plug FAILED: {exc} (the guest runs without fph's balloon)")

    def _release(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    # ------------------------------------------------------------------------------------ life cycle

    @property
    def finished(self) -> bool:
        return self.state is not IncomingState.PREPARED

    def summary(self) -> str:
        """One line for GetVm: the state and, if it failed, why (or how a restarted daemon finished it)."""
        detail = self.error or self.note
        return self.state.value + (f": {detail}" if detail else "")

    def close(self) -> None:
        """Give up (thread-safe): the receiver stops, the watcher ends without touching QEMU."""
        if not self.finished:
            self.state = IncomingState.CLOSED
        self._closed.set()
        if self.receiver is not None:
            self.receiver.stop()

    async def wait(self, timeout: float | None = None) -> IncomingState:
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return self.state


async def abandon_incoming(
    vm: str, qmp_socket: Path, balloon_socket: str = "", balloon_queues: int = 4
) -> IncomingSession:
    """After a restart: a destination the dead daemon had prepared lost its receiver with it. Its QEMU's own
    word decides. Still waiting for the device state: the data connection broke, so its source keeps the
    guest; this QEMU is told to quit. Already holding the device state (the source handed over: it sends it
    only after every page landed, and stays stopped): the switchover is finished here, never undone: cont,
    then the fresh balloon the dead daemon may not have plugged (``balloon_socket``: its worker listens
    there; "" when this VM has none). Already running the guest: only that balloon."""
    s = IncomingSession(
        vm, None, qmp_socket, "", "", False, balloon_socket=balloon_socket, balloon_queues=balloon_queues
    )
    s._closed.set()
    try:
        conn = QMPConnection(str(qmp_socket), "fph-daemon-incoming")
        await conn.connect(timeout=5.0)
    except (QMPError, OSError) as e:
        s._note(f"QEMU already gone ({type(e).__name__})")
        s.state, s.error = IncomingState.FAILED, ABORTED
        return s
    try:
        async with asyncio.timeout(RESTART_FINISH_TIMEOUT_S):  # a hung QEMU must not hold the restart
            await s._finish_after_restart(conn)
    except (QMPError, OSError, DestinationError) as e:  # (TimeoutError is an OSError)
        s._note(f"QEMU failed while the restarted daemon finished it ({type(e).__name__}: {e})")
        if s.state is not IncomingState.RESUMED:  # it does not run the guest: quit, the source keeps it
            with contextlib.suppress(QMPError, OSError):
                async with asyncio.timeout(2.0):
                    await conn.execute("quit")
            s.state, s.error = IncomingState.FAILED, ABORTED
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
    return s
