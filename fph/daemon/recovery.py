"""What a restarted daemon does about a migration its predecessor was running when it died.

The dead daemon's migration may have stopped the source, set ``x-ignore-shared``, throttled the vCPUs and
left the destination QEMU waiting in ``inmigrate``. The rollback asks both QEMUs where they are, over QMP
(nothing of the old process is needed): if the destination already runs the guest, the migration had
completed and the source must stay stopped (two running copies of one guest would corrupt its disks);
otherwise the destination still waiting is told to quit, the source's migration is cancelled, its
capabilities restored, its vCPU throttle removed and the source resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from fph.daemon.state_file import PersistedMigration
from fph.migration.destination import BALLOON_CHARDEV_ID, BALLOON_DEVICE_ID, add_balloon_device
from fph.migration.throttle import ThrottleError, release_stale_groups, vcpu_threads
from fph.qmp import QMPConnection, QMPError

QMP_TIMEOUT_S = 5.0
ABORTED = "aborted: back-end restarted"


@dataclass
class Rollback:
    completed: bool = False
    """The destination was already running the guest: the migration had finished."""
    cleanup: list[str] = field(default_factory=list)


async def _status(conn: QMPConnection) -> str:
    return str((await conn.execute("query-status")).get("status"))


async def roll_back(
    m: PersistedMigration,
    timeout: float = QMP_TIMEOUT_S,
    *,
    replug: bool = False,
    destination_running: bool | None = None,
) -> Rollback:
    """``replug``: the source's balloon worker still holds QEMU's connection (adopted), so a balloon the
    dead daemon had unplugged before switchover is added back on its chardev. ``destination_running``:
    what this daemon's own restore already found of a destination VM it serves (it told a waiting one to
    quit), so that QEMU is not asked again."""
    out = Rollback()
    if destination_running is not None:
        out.completed = destination_running
        out.cleanup.append(
            "destination runs the guest: the migration had completed"
            if destination_running
            else "destination QEMU (still incoming) told to quit"
        )
    elif m.destination_qmp:
        await _roll_back_destination(m, out, timeout)
    else:
        out.cleanup.append("destination owned by its daemon: it tears its side down when the stream breaks")
    try:
        async with asyncio.timeout(timeout):
            src = QMPConnection(m.source_qmp, "fph-recovery-src")
            await src.connect(timeout)
            try:
                await _roll_back_source(src, out, replug)
            finally:
                await src.close()
    except (QMPError, OSError, TimeoutError) as exc:
        out.cleanup.append(f"source QEMU does not answer ({type(exc).__name__}): NOT rolled back")
    return out


async def _roll_back_destination(m: PersistedMigration, out: Rollback, timeout: float) -> None:
    """A destination this daemon drove itself (state files of earlier versions): ask it where it is."""
    dst_status = ""
    try:
        async with asyncio.timeout(timeout):
            dst = QMPConnection(m.destination_qmp, "fph-recovery-dst")
            await dst.connect(timeout)
            try:
                dst_status = await _status(dst)
                if dst_status == "running":
                    out.completed = True
                    out.cleanup.append("destination runs the guest: the migration had completed")
                elif dst_status == "inmigrate":
                    with contextlib.suppress(QMPError, OSError):
                        await dst.execute("quit")
                    out.cleanup.append("destination QEMU (still incoming) told to quit")
                else:
                    out.cleanup.append(f"destination QEMU is {dst_status!r}: left as it is")
            finally:
                await dst.close()
    except (QMPError, OSError, TimeoutError) as exc:
        out.cleanup.append(f"destination QEMU does not answer ({type(exc).__name__}): nothing to undo there")


async def _roll_back_source(src: QMPConnection, out: Rollback, replug: bool) -> None:
    with contextlib.suppress(QMPError, ThrottleError):  # no vCPU threads visible: nothing was throttled
        pid, _tids = vcpu_threads(list(await src.execute("query-cpus-fast")))
        out.cleanup.extend(await asyncio.to_thread(release_stale_groups, pid))
    if not out.completed:
        # The source's own word: its device state went out complete, so the destination has the guest (its
        # daemon resumes it). Two running copies would corrupt the guest's disks: the source stays stopped.
        with contextlib.suppress(QMPError):
            out.completed = (await src.execute("query-migrate")).get("status") == "completed"
    if out.completed:
        out.cleanup.append(f"source left {await _status(src)!r}: the guest runs on the destination")
        return
    with contextlib.suppress(QMPError):
        await src.execute("migrate_cancel")
    caps = [{"capability": "x-ignore-shared", "state": False}]
    try:
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        out.cleanup.append("source x-ignore-shared off")
    except QMPError as exc:
        out.cleanup.append(f"source x-ignore-shared NOT reset: {exc}")
    status = await _status(src)
    if status in ("paused", "postmigrate", "finish-migrate"):
        await src.execute("cont")
        out.cleanup.append(f"source resumed (was {status})")
    else:
        out.cleanup.append(f"source {status}")
    if replug:
        children = await src.execute("qom-list", {"path": "/machine/peripheral"})
        if not any(c.get("name") == BALLOON_DEVICE_ID for c in children):
            try:
                await add_balloon_device(src, BALLOON_DEVICE_ID, BALLOON_CHARDEV_ID)
                out.cleanup.append("balloon re-added on the source")
            except QMPError as exc:
                out.cleanup.append(f"balloon NOT re-added on the source: {exc}")
