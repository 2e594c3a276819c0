"""What a restarted daemon does about a migration its predecessor was running when it died.

The dead daemon's migration may have stopped the source, set ``x-ignore-shared``, throttled the vCPUs,
unplugged the balloon and left the destination QEMU waiting in ``inmigrate``. The rollback asks both QEMUs
where they are, over QMP (nothing of the old process is needed), and decides once which of them keeps the
guest, by where its device state went (fph sends it only after every page landed, with the source stopped):

- the destination runs the guest, or held its device state and was resumed (``abandon_incoming``): the
  migration completed, the source stays stopped for good (two running copies would corrupt the guest's
  disks) and the report says "completed";
- the destination is gone (told to quit while it still waited for its source): the source holds the only
  copy and is resumed, even if its QEMU had sent its device state into the void;
- the destination is another host's, or does not answer: the source's own word decides. A device-state
  stream still under way is waited for; a completed one (the source ``postmigrate``) means the destination
  has the guest. Otherwise the source's migration is cancelled, asked again (it may have completed in
  between), its capabilities restored, its vCPU throttle removed, its balloon re-added and it is resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from dataclasses import dataclass, field

from fph.daemon.state_file import PersistedMigration
from fph.migration.destination import (
    BALLOON_CHARDEV_ID,
    BALLOON_DEVICE_ID,
    DestinationError,
    add_balloon_device,
    device_state_arrived,
    resume_incoming,
)
from fph.migration.throttle import ThrottleError, release_stale_groups, vcpu_threads
from fph.qmp import QMPConnection, QMPError

QMP_TIMEOUT_S = 5.0
SETTLE_S = 2.0
"""How long a source's device-state stream found under way may take to end (it lasts milliseconds)."""
RESUME_S = 5.0
"""How long a destination found loading its device state may take to finish (milliseconds of data)."""
ABORTED = "aborted: back-end restarted"
COMPLETED = "back-end restarted after switchover: completed, the guest runs on the destination"
IN_FLIGHT = frozenset({"setup", "active", "device", "pre-switchover", "wait-unplug", "cancelling"})
"""query-migrate statuses of a source whose stream may still complete (or still be cancelled)."""


class Destination(enum.Enum):
    """What the restarted daemon knows of the destination QEMU: it decides which side keeps the guest."""

    RUNS = "runs"
    """It runs the guest: the migration completed."""
    GONE = "gone"
    """It quit or died before running the guest: the source holds the only copy."""
    UNKNOWN = "unknown"
    """Another host's daemon owns it, or it does not answer: the source's own word decides."""


@dataclass
class Rollback:
    completed: bool = False
    """The destination runs the guest (or the source's QEMU handed it over): the migration had finished."""
    cleanup: list[str] = field(default_factory=list)


async def _status(conn: QMPConnection) -> str:
    return str((await conn.execute("query-status")).get("status"))


async def roll_back(
    m: PersistedMigration,
    timeout: float = QMP_TIMEOUT_S,
    *,
    replug: bool = False,
    balloon_queues: int = 4,
    destination_running: bool | None = None,
) -> Rollback:
    """``replug``: the source's balloon worker still holds QEMU's connection (adopted), so a balloon the
    dead daemon had unplugged before switchover is added back on its chardev. ``destination_running``:
    what this daemon's own restore already found of a destination VM it serves (it resumed one holding the
    device state, or told a waiting one to quit), so that QEMU is not asked again."""
    out = Rollback()
    if destination_running is not None:
        dest = Destination.RUNS if destination_running else Destination.GONE
        out.cleanup.append(
            "destination runs the guest"
            if destination_running
            else "destination QEMU (still incoming) told to quit"
        )
    elif m.destination_qmp:
        dest = await _roll_back_destination(m, out, timeout)
    else:
        dest = Destination.UNKNOWN
        out.cleanup.append("destination owned by its daemon: it tears its side down when the stream breaks")
    out.completed = dest is Destination.RUNS
    try:
        async with asyncio.timeout(timeout + 2 * SETTLE_S):
            src = QMPConnection(m.source_qmp, "fph-recovery-src")
            await src.connect(timeout)
            try:
                await _roll_back_source(src, out, dest, replug, balloon_queues)
            finally:
                await src.close()
    except (QMPError, OSError, TimeoutError) as exc:
        out.cleanup.append(f"source QEMU does not answer ({type(exc).__name__}): NOT rolled back")
    if out.completed:
        out.cleanup.insert(0, COMPLETED)
    return out


async def _roll_back_destination(m: PersistedMigration, out: Rollback, timeout: float) -> Destination:
    """A destination this daemon drove itself whose session restore did not settle: ask it where it is."""
    try:
        async with asyncio.timeout(timeout + RESUME_S):
            dst = QMPConnection(m.destination_qmp, "fph-recovery-dst")
            await dst.connect(timeout)
            try:
                dst_status = await _status(dst)
                if dst_status == "running":
                    out.cleanup.append("destination runs the guest")
                    return Destination.RUNS
                if await device_state_arrived(dst):
                    await resume_incoming(dst, RESUME_S)
                    out.cleanup.append(f"destination held the device state ({dst_status}): resumed")
                    return Destination.RUNS
                if dst_status == "inmigrate":
                    with contextlib.suppress(QMPError, OSError):
                        await dst.execute("quit")
                    out.cleanup.append("destination QEMU (still incoming) told to quit")
                    return Destination.GONE
                out.cleanup.append(f"destination QEMU is {dst_status!r}: left as it is")
            finally:
                await dst.close()
    except (QMPError, OSError, TimeoutError, DestinationError) as exc:
        out.cleanup.append(f"destination QEMU does not answer ({type(exc).__name__}): nothing to undo there")
    return Destination.UNKNOWN


async def _source_handed_over(src: QMPConnection) -> tuple[bool, str]:
    """Whether the source's QEMU sent its device state out complete: its migration "completed" and it sits
    in ``postmigrate`` (a VM that itself arrived by migration reports its incoming "completed" while it
    was never handed over). A stream still under way is waited for. Also returns the last status."""
    deadline = time.monotonic() + SETTLE_S
    status = ""
    while True:
        with contextlib.suppress(QMPError):
            status = str((await src.execute("query-migrate")).get("status", ""))
        if status not in IN_FLIGHT or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    return status == "completed" and await _status(src) == "postmigrate", status


async def _roll_back_source(
    src: QMPConnection, out: Rollback, dest: Destination, replug: bool, queues: int = 4
) -> None:
    with contextlib.suppress(QMPError, ThrottleError):  # no vCPU threads visible: nothing was throttled
        pid, _tids = vcpu_threads(list(await src.execute("query-cpus-fast")))
        out.cleanup.extend(await asyncio.to_thread(release_stale_groups, pid))
    if dest is Destination.UNKNOWN:
        out.completed, status = await _source_handed_over(src)
        if not out.completed and status in IN_FLIGHT:
            with contextlib.suppress(QMPError):
                await src.execute("migrate_cancel")
            # the stream may have completed between the question and the cancel: ask again
            out.completed, status = await _source_handed_over(src)
            out.cleanup.append(f"source migration cancelled (now {status or 'none'})")
        if out.completed:
            out.cleanup.append("source QEMU says its device state went out complete")
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
    if status == "postmigrate" and dest is not Destination.GONE:  # it handed over: never two copies
        out.cleanup.append(
            "source left 'postmigrate': resume it (cont) only once the destination QEMU is known to be gone"
        )
    elif status in ("paused", "postmigrate", "finish-migrate"):
        # postmigrate: the destination is known gone, its device state went nowhere that runs
        await src.execute("cont")
        out.cleanup.append(f"source resumed (was {status})")
    else:
        out.cleanup.append(f"source {status}")
    if replug:
        children = await src.execute("qom-list", {"path": "/machine/peripheral"})
        if not any(c.get("name") == BALLOON_DEVICE_ID for c in children):
            try:
                await add_balloon_device(src, BALLOON_DEVICE_ID, BALLOON_CHARDEV_ID, queues)
                out.cleanup.append("balloon re-added on the source")
            except QMPError as exc:
                out.cleanup.append(f"balloon NOT re-added on the source: {exc}")
