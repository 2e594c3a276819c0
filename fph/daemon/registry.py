"""The VMs a daemon serves, the checks on what an orchestrator sends, and the error tree.

Every path an orchestrator names must be absolute and resolve (symlinks followed) inside the daemon's state
directory: the daemon listens on balloon sockets, creates write logs and maps RAM files, so a path outside
it could make the daemon clobber or map any file root can reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from fph.balloon.worker_client import BalloonWorkers, WorkerBalloon, WorkerError
from fph.daemon.incoming import IncomingSession
from fph.daemon.vm_state import VmState
from fph.hint_receiver import F_FREE_PAGE_HINT, CountingSink, HintState, HintStatus
from fph.qmp import QMPConnection, QMPError
from fph.ram_layout import RamLayout

if TYPE_CHECKING:
    from fph.daemon.jobs import MigrationJob
    from fph.writelog.tcg import TcgWriteLog

log = logging.getLogger("fph.daemon")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
"""A VM name, matched whole (``fullmatch``: ``$`` would let a trailing newline through)."""
MIN_MEMORY = 64 << 20
MAX_MEMORY = 1 << 40
MEMORY_ALIGN = 2 << 20
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL


class ApiError(Exception):
    """An error the orchestrator can act on; ``code`` is the gRPC status it becomes."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ApiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ApiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ApiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ApiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ApiError):
    code = grpc.StatusCode.ABORTED


class Unavailable(ApiError):
    code = grpc.StatusCode.UNAVAILABLE


def check_name(name: str, what: str = "vm") -> str:
    if not name:
        raise InvalidArgument(f"{what} name is required")
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{what} name {name!r} is invalid: 1-63 characters of a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def parse_host_port(raw: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` with an IP address (v4, or v6 in brackets) and a port 1..65535."""
    host, sep, port = raw.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise InvalidArgument(f"{what} {raw!r}: expected IP:PORT (port 1..65535)")
    return host, int(port)


def check_path(
    state_dir: Path, raw: str, what: str, *, required: bool = True, socket: bool = False
) -> Path | None:
    """``raw`` as an absolute path inside ``state_dir`` (resolved), or None if empty and not required."""
    if not raw:
        if required:
            raise InvalidArgument(f"{what} is required (an absolute path inside {state_dir})")
        return None
    if "\0" in raw or len(raw) > 4096:
        raise InvalidArgument(f"{what} is not a usable path")
    p = Path(raw)
    if not p.is_absolute():
        raise InvalidArgument(f"{what} {raw!r} must be an absolute path inside {state_dir}")
    root = Path(os.path.realpath(state_dir))
    resolved = Path(os.path.realpath(p))
    if root not in resolved.parents:
        raise InvalidArgument(
            f"{what} {raw!r} resolves to {resolved}, outside the daemon's state directory {root}; "
            "put it under the state directory (state_dir in the config, --state-dir)"
        )
    if socket and len(os.fsencode(resolved)) > SUN_PATH_MAX:
        raise InvalidArgument(f"{what} {resolved} is longer than {SUN_PATH_MAX} bytes, too long for a socket")
    return resolved


def trusted_uids(state_dir: Path) -> set[int]:
    """Who may own the files a VM's paths name: root, the daemon's user, the state directory's owner."""
    return {0, os.geteuid(), os.stat(state_dir).st_uid}


def check_existing(
    path: Path | None, what: str, is_kind: Callable[[int], bool], kind: str, *, trusted_uids: set[int]
) -> None:
    """A path that already exists must be of the kind the daemon will use it as, owned by a trusted user
    (root, the daemon's user, the state directory's owner: the user an orchestrator runs QEMU as), and
    not writable by others. A path that does not exist yet is fine: QEMU or the daemon creates it."""
    if path is None:
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not is_kind(st.st_mode):
        raise InvalidArgument(f"{what} {path} exists and is not {kind}")
    if st.st_uid not in trusted_uids:
        raise InvalidArgument(
            f"{what} {path} is owned by uid {st.st_uid}: not root, the daemon's user or the state "
            "directory's owner"
        )
    if st.st_mode & stat.S_IWOTH:
        raise InvalidArgument(f"{what} {path} is writable by every user (mode {stat.S_IMODE(st.st_mode):o})")


@dataclass(frozen=True)
class VmSpec:
    name: str
    qmp_socket: Path
    ram_file: Path
    balloon_socket: Path | None
    memory_bytes: int
    write_log: Path | None
    free_page_reporting: bool = False
    """The balloon offers free page reporting (its worker runs with ``--reporting``)."""

    @classmethod
    def validate(cls, state_dir: Path, msg: Any) -> VmSpec:
        """From a ``fph_pb2.VmSpec``: every field checked, every path inside ``state_dir``."""
        name = check_name(msg.name)
        mem = int(msg.memory_bytes)
        if not MIN_MEMORY <= mem <= MAX_MEMORY or mem % MEMORY_ALIGN:
            raise InvalidArgument(
                f"memory_bytes {mem} out of range: {MIN_MEMORY >> 20} MiB .. {MAX_MEMORY >> 40} TiB, "
                f"a multiple of {MEMORY_ALIGN >> 20} MiB (the guest's RAM size, QEMU's -m)"
            )
        qmp = check_path(state_dir, msg.qmp_socket, "qmp_socket", socket=True)
        ram = check_path(state_dir, msg.ram_file, "ram_file")
        balloon = check_path(state_dir, msg.balloon_socket, "balloon_socket", required=False, socket=True)
        wlog = check_path(state_dir, msg.write_log, "write_log", required=False)
        assert qmp is not None and ram is not None
        paths = [p for p in (qmp, ram, balloon, wlog) if p is not None]
        if len(set(paths)) != len(paths):
            raise InvalidArgument("qmp_socket, ram_file, balloon_socket and write_log must be distinct paths")
        uids = trusted_uids(state_dir)
        check_existing(qmp, "qmp_socket", stat.S_ISSOCK, "a socket", trusted_uids=uids)
        check_existing(ram, "ram_file", stat.S_ISREG, "a regular file", trusted_uids=uids)
        check_existing(wlog, "write_log", stat.S_ISREG, "a regular file", trusted_uids=uids)
        if msg.free_page_reporting and balloon is None:
            raise InvalidArgument("free_page_reporting needs balloon_socket (fph's balloon reports)")
        return cls(name, qmp, ram, balloon, mem, wlog, bool(msg.free_page_reporting))


@dataclass(frozen=True)
class BalloonLink:
    connected: bool
    """QEMU is connected to the VM's balloon socket."""
    free_page_hint: bool
    """The guest's driver negotiated FREE_PAGE_HINT."""


@dataclass
class VmRecord:
    spec: VmSpec
    layout: RamLayout
    control: WorkerBalloon | None = None
    """The VM's balloon worker (``fph.balloon.worker``): it holds QEMU's connection, so it outlives this
    daemon."""
    sink: CountingSink = field(default_factory=CountingSink)
    plugin_arg: str = ""
    state: VmState = VmState.REGISTERED
    acknowledge_on_stop: bool = False
    hint_active: bool = False  # started through the API and not stopped through it
    hint_runs: int = 0
    job: MigrationJob | None = None
    registered_at: float = field(default_factory=time.time)
    incoming: IncomingSession | None = None
    """As a migration destination: what PrepareIncoming started (kept after it ended, for its outcome)."""
    degraded: str = ""
    """Why fph cannot serve this VM's balloon (restored after a restart while its QEMU ran), or ""."""

    @property
    def name(self) -> str:
        return self.spec.name

    def drop_incoming(self) -> None:
        """Give up a destination that has not ended (thread-safe); a finished one's outcome is kept."""
        if self.incoming is not None and not self.incoming.finished:
            self.incoming.close()


async def balloon_plugged(qmp_socket: Path, device_id: str = "bal0") -> bool | None:
    """Whether the VM's QEMU has the balloon ``device_id`` plugged; None if no QEMU listens on its monitor
    (the socket is gone or refuses). A QEMU that is there but does not answer counts as plugged: serving the
    balloon socket again could let it reconnect, and QEMU 11.1 aborts on that."""
    if _nothing_listens(qmp_socket):
        return None
    try:
        async with asyncio.timeout(5.0), QMPConnection(str(qmp_socket), "fph-restore") as conn:
            children = await conn.execute("qom-list", {"path": "/machine/peripheral"})
    except (QMPError, OSError, TimeoutError):
        return True
    return any(c.get("name") == device_id for c in children)


async def _release(ctl: WorkerBalloon, timeout: float = 2.0) -> None:
    """DONE (bounded wait) if the guest may hold hinted blocks; a worker that does not answer is left as is
    (its VM shows why at the next call)."""
    with contextlib.suppress(WorkerError):
        st = await ctl.status_async()
        if st.held_bytes or st.state in (HintState.REQUESTED, HintState.START):
            await ctl.done_and_wait_async(timeout)


def _nothing_listens(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return True
        except OSError:
            return False
    return False


class Registry:
    """VMs by name, their balloon workers (one process per VM, in ``<state dir>/workers``), and the state
    dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(os.path.realpath(state_dir))
        self.vms: dict[str, VmRecord] = {}
        self.workers = BalloonWorkers(self.state_dir / "workers")
        self._lock = asyncio.Lock()

    def get(self, name: str) -> VmRecord:
        check_name(name)
        rec = self.vms.get(name)
        if rec is None:
            known = ", ".join(sorted(self.vms)) or "none"
            raise NotFound(f"no VM {name!r} registered with this daemon (registered: {known})")
        return rec

    async def register(self, spec: VmSpec) -> VmRecord:
        async with self._lock:
            if spec.name in self.vms:
                raise AlreadyExists(f"VM {spec.name!r} is already registered; unregister it first")
            for other in self.vms.values():
                mine = {spec.qmp_socket, spec.ram_file, spec.balloon_socket, spec.write_log} - {None}
                theirs = {
                    other.spec.qmp_socket,
                    other.spec.ram_file,
                    other.spec.balloon_socket,
                    other.spec.write_log,
                } - {None}
                if mine & theirs:
                    raise AlreadyExists(
                        f"VM {other.name!r} already uses {sorted(map(str, mine & theirs))}; paths are per VM"
                    )
            for p in (spec.qmp_socket, spec.ram_file, spec.balloon_socket, spec.write_log):
                if p is not None and not p.parent.is_dir():
                    raise FailedPrecondition(f"directory {p.parent} does not exist; create it first")
            if spec.balloon_socket is not None and spec.balloon_socket.exists():
                raise AlreadyExists(
                    f"{spec.balloon_socket} exists: another back-end may listen there; remove it if stale"
                )
            rec = VmRecord(spec, RamLayout.pc(spec.memory_bytes))
            if spec.write_log is not None:
                wl = await asyncio.to_thread(
                    open_writelog, spec.write_log, rec.layout, not spec.write_log.exists()
                )
                rec.plugin_arg = wl.plugin_arg
                wl.close()
            if spec.balloon_socket is not None:
                try:
                    rec.control = await asyncio.to_thread(
                        self.workers.start,
                        spec.name,
                        str(spec.balloon_socket),
                        rec.sink,
                        reporting=spec.free_page_reporting,
                    )
                except WorkerError as e:
                    raise FailedPrecondition(f"cannot serve the balloon on {spec.balloon_socket}: {e}") from e
            self.vms[spec.name] = rec
            log.info("vm registered", extra={"vm": spec.name, "balloon": str(spec.balloon_socket)})
            return rec

    async def restore(self, spec: VmSpec, state: VmState) -> VmRecord:
        """A VM of the previous daemon's saved state. Its balloon worker normally still runs (it outlives
        the daemon) and is adopted: QEMU's connection never dropped. Without a worker: if its QEMU runs
        and still has the balloon plugged, the connection dropped with the worker and QEMU 11.1 cannot
        re-attach a back-end (it aborts), so fph does not listen again and the VM is degraded (never
        unplugged by fph, see fph.migration.fph_mode); a VM whose QEMU is not running gets a new worker."""
        rec = VmRecord(spec, RamLayout.pc(spec.memory_bytes), state=state)
        if spec.write_log is not None and spec.write_log.exists():
            with contextlib.suppress(Exception):
                wl = await asyncio.to_thread(open_writelog, spec.write_log, rec.layout, False)
                rec.plugin_arg = wl.plugin_arg
                if wl.disarm_any():  # the dead daemon's migration had armed it: no migration runs now
                    log.info("write-log plugin disarmed", extra={"vm": spec.name})
                wl.close()
        if spec.balloon_socket is not None:
            try:
                rec.control = await asyncio.to_thread(
                    self.workers.adopt, spec.name, str(spec.balloon_socket), rec.sink
                )
            except WorkerError as exc:
                rec.degraded = f"its balloon worker could not be adopted: {exc}"
            if rec.control is not None:
                await _release(rec.control)  # what the dead daemon's hint run left held goes back now
            if rec.control is not None or rec.degraded:
                self.vms[spec.name] = rec
                return rec
            plugged = await balloon_plugged(spec.qmp_socket)
            if plugged is None or not plugged:
                try:
                    rec.control = await asyncio.to_thread(
                        self.workers.start,
                        spec.name,
                        str(spec.balloon_socket),
                        rec.sink,
                        reporting=spec.free_page_reporting,
                    )
                except Exception as exc:  # e.g. its directory is gone: this VM only, never the restart
                    rec.degraded = (
                        f"its balloon socket could not be served again after the restart: {exc}; "
                        "unregister the VM and register it again"
                    )
            else:
                rec.degraded = (
                    "the balloon's connection to QEMU dropped (its worker is gone); QEMU 11.1 "
                    "cannot re-attach it (it would abort), so this VM has no working balloon until its QEMU "
                    "is started again: no hinting, no fph-mode migration; native migration is refused by "
                    "QEMU while the device is plugged"
                )
        self.vms[spec.name] = rec
        return rec

    async def unregister(self, name: str) -> bool:
        """Drop a VM; DONE first if its guest may hold hinted pages. Returns whether DONE was sent."""
        async with self._lock:
            rec = self.get(name)
            if rec.job is not None and not rec.job.finished:
                raise FailedPrecondition(f"VM {name!r} is migrating ({rec.job.id}); cancel it first")
            done = False
            await asyncio.to_thread(rec.drop_incoming)
            if rec.control is not None:
                ctl = rec.control
                st = await ctl.status_async()
                if st.held_bytes or st.state in (HintState.REQUESTED, HintState.START):
                    # let the guest read DONE before the connection goes (bounded, as at shutdown)
                    await ctl.done_and_wait_async(2.0)
                    done = True
                await self.workers.remove_async(ctl.socket_path)
            del self.vms[name]
            log.info("vm unregistered", extra={"vm": name, "done_sent": done})
            return done

    async def upgrade_worker(self, name: str) -> int:
        """Replace the VM's balloon worker by one running this daemon's code (fph.balloon.worker_handover):
        QEMU's connection and a hint run go on. Returns the previous worker's PID."""
        async with self._lock:
            rec = self.get(name)
            if rec.job is not None and not rec.job.finished:
                raise FailedPrecondition(f"VM {name!r} is migrating ({rec.job.id}); upgrade its worker after")
            if rec.incoming is not None and not rec.incoming.finished:
                raise FailedPrecondition(f"VM {name!r} is a prepared migration destination; upgrade after")
            ctl = self.balloon(rec)
            previous = ctl.pid
            try:
                rec.control = await asyncio.to_thread(self.workers.upgrade, name, ctl.socket_path)
            except WorkerError as e:
                rec.control = self.workers.balloons.get(ctl.socket_path)  # the old one, attached again
                if rec.control is None:
                    rec.degraded = f"its balloon worker could not be upgraded or attached again: {e}"
                raise FailedPrecondition(str(e)) from e
            return previous

    def check_worker(self, rec: VmRecord) -> None:
        """A worker that died under this daemon (killed by an operator, the OOM killer) degrades its VM,
        and only that VM: QEMU's connection went with it and QEMU 11.1 cannot re-attach a back-end, so
        fph never sends that QEMU a request about the balloon again."""
        ctl = rec.control
        if ctl is None or not ctl.lost:
            return
        rec.control = None
        rec.degraded = (
            f"its balloon worker (pid {ctl.pid}) is gone ({ctl.lost}); the balloon's connection to QEMU "
            "dropped with it and QEMU 11.1 cannot re-attach one (it would abort): no hinting and no "
            "fph-mode migration until the VM's QEMU is started again; do not device_del the balloon; "
            "the VM itself keeps running (native migration is refused by QEMU while the device is plugged)"
        )
        log.error("balloon worker lost", extra={"vm": rec.name, "pid": ctl.pid, "reason": ctl.lost})

    def balloon(self, rec: VmRecord) -> WorkerBalloon:
        self.check_worker(rec)
        if rec.control is None and rec.degraded:
            raise FailedPrecondition(f"VM {rec.name!r} is degraded: {rec.degraded}")
        if rec.control is None:
            raise FailedPrecondition(
                f"VM {rec.name!r} was registered without balloon_socket: fph serves no balloon for it"
            )
        return rec.control

    async def status(self, rec: VmRecord) -> HintStatus:
        ctl = self.balloon(rec)
        return await ctl.status_async()

    def connected(self, rec: VmRecord) -> bool:
        self.check_worker(rec)
        return rec.spec.balloon_socket is not None and self.workers.connected(str(rec.spec.balloon_socket))

    def balloon_link(self, rec: VmRecord) -> BalloonLink:
        """Whether QEMU is connected to the VM's balloon and the guest negotiated FREE_PAGE_HINT, from one
        view of its worker (a request each)."""
        self.check_worker(rec)
        if rec.spec.balloon_socket is None or rec.control is None or rec.control.lost:
            return BalloonLink(False, False)
        try:
            v = rec.control.view()
        except WorkerError:
            return BalloonLink(False, False)
        return BalloonLink(v.connected, bool(v.acked & F_FREE_PAGE_HINT))

    def ring_ranges(self, rec: VmRecord) -> list[tuple[int, int]]:
        """GPA ranges of the balloon's used rings (fph writes them; no guest store logs them)."""
        return rec.control.used_ring_ranges() if rec.control is not None else []

    async def close(self, timeout: float = 2.0, *, stop_workers: bool = False) -> None:
        """DONE to every guest that can hear it (bounded wait), then let go of the workers: they keep their
        VMs' connections for the next daemon (``stop_workers``: end them too, as UnregisterVm does)."""
        for rec in self.vms.values():
            await asyncio.to_thread(rec.drop_incoming)
        await self.workers.close_async(timeout, stop=stop_workers)


def open_writelog(path: Path, layout: RamLayout, create: bool = False) -> TcgWriteLog:
    """A consumer of the VM's TCG write log (one per migration: a log is started once)."""
    from fph.writelog.tcg import TcgWriteLog

    try:
        return TcgWriteLog(path, layout, create=create)
    except Exception as e:
        raise FailedPrecondition(f"write log {path}: {e}") from e
