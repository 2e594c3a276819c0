"""What is done to the destination QEMU, over its QMP: make it listen, resume it, plug a fresh balloon.

Shared by the fph-mode engine when it drives both QEMUs itself (one host, the library) and by the
destination daemon, which owns its QEMU when the source is on another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fph.qmp import QMPConnection, QMPError
from fph.waiting import poll_until_async

BALLOON_DEVICE_ID = "bal0"
BALLOON_CHARDEV_ID = "vu"
"""The QEMU ids of fph's balloon device and its chardev, unless a migration is told others."""
BALLOON_DEVICE_ARGS = {"virtio-id": 5, "num_vqs": 4, "config_size": 16, "vq_size": 1024}


def balloon_queues(reporting: bool) -> int:
    """``num_vqs`` of the balloon device: the driver sizes its queue list from the features it acks, and
    a back-end offering free page reporting needs a fifth queue (with 4 the guest's probe fails)."""
    return 5 if reporting else 4


FPH_INCOMING_CAPABILITIES = {"x-ignore-shared": True, "events": True}
"""fph mode: QEMU carries device state only; RAM (shared, in files) is fph's to move."""
NATIVE_INCOMING_CAPABILITIES = {"x-ignore-shared": False, "events": True}
"""native/none: QEMU moves RAM (a VM that arrived by fph keeps x-ignore-shared on unless it is reset)."""


class DestinationError(RuntimeError):
    """The destination QEMU did not listen, load or resume as it should; the message says where."""


def capabilities_arg(caps: dict[str, bool]) -> dict[str, Any]:
    return {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}


async def listen_incoming(dst: QMPConnection, caps: dict[str, bool], host: str, port: int = 0) -> str:
    """Set ``caps`` and start QEMU's incoming migration on ``tcp:HOST:PORT`` (port 0: any free one).
    Returns the URI the source's QEMU must migrate to, with the port QEMU actually bound."""
    await dst.execute("migrate-set-capabilities", capabilities_arg(caps))
    await dst.execute("migrate-incoming", {"uri": f"tcp:{host}:{port}"})
    info = await dst.execute("query-migrate")
    for addr in info.get("socket-address") or ():
        if addr.get("type") == "inet" and addr.get("port"):
            return f"tcp:{addr.get('host', host)}:{addr['port']}"
    raise DestinationError(f"QEMU listens for the migration but does not say on which port: {info}")


async def resume_incoming(dst: QMPConnection, timeout: float) -> None:
    """``cont`` once the destination has loaded the device state, then check that it runs.

    The source was stopped before its device state was sent, so the destination takes "paused" from
    the stream when it finishes loading; a ``cont`` that arrives while it still loads is lost (QEMU
    only notes it as autostart, which a paused source overrides). The source reporting "completed"
    does not mean the destination has finished loading."""
    deadline = time.monotonic() + timeout
    while True:
        status = str((await dst.execute("query-status")).get("status"))
        if status != "inmigrate":
            break
        if time.monotonic() > deadline:
            raise DestinationError(f"the destination still loads the device state after {timeout} s")
        await asyncio.sleep(0.001)
    if status != "running":
        await dst.execute("cont")
    status = str((await dst.execute("query-status")).get("status"))
    if status != "running":
        raise DestinationError(f"the destination is {status!r} after cont, not running")


async def arrived_by_fph(dst: QMPConnection) -> bool:
    """Whether this QEMU takes (or took) its migration in fph mode: only device state on QEMU's stream,
    RAM moved by fph (``x-ignore-shared`` stays on after the load)."""
    caps = {str(c["capability"]): bool(c["state"]) for c in await dst.execute("query-migrate-capabilities")}
    return caps.get("x-ignore-shared", False)


async def device_state_arrived(dst: QMPConnection) -> bool:
    """Whether an incoming QEMU has loaded, or is loading, its source's device state. In fph mode the
    source sends it only after the destination confirmed every page (FINISH), with its vCPUs stopped for
    good: such a destination holds the whole guest and must be resumed, never torn down, whoever died
    meanwhile. (In native mode an active stream is still RAM: only a completed load counts.)"""
    status = str((await dst.execute("query-migrate")).get("status", ""))
    if status == "completed":
        return True
    return status == "active" and await arrived_by_fph(dst)


async def plug_balloon(
    conn: QMPConnection, device_id: str, chardev_id: str, socket_path: str, queues: int = 4
) -> None:
    """A fresh fph balloon on ``conn``'s QEMU, connected to the back-end listening on ``socket_path``."""
    with contextlib.suppress(QMPError):  # a chardev of that id may be left from an earlier plug
        await conn.execute("chardev-remove", {"id": chardev_id})
    await conn.execute(
        "chardev-add",
        {
            "id": chardev_id,
            "backend": {
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": socket_path}},
                    "server": False,  # no reconnect-ms: a reconnect aborts QEMU 11.1 (vhost_dev_start)
                },
            },
        },
    )
    await _wait_chardev_connected(conn, chardev_id)
    await add_balloon_device(conn, device_id, chardev_id, queues)


async def add_balloon_device(conn: QMPConnection, device_id: str, chardev_id: str, queues: int = 4) -> None:
    """The balloon device on an existing chardev (``device_del`` keeps the chardev and its back-end
    connection, so an unplugged balloon comes back this way)."""
    await conn.execute(
        "device_add",
        {
            "driver": "vhost-user-test-device-pci",
            "id": device_id,
            "chardev": chardev_id,
            **BALLOON_DEVICE_ARGS,
            "num_vqs": queues,
        },
    )


async def _wait_chardev_connected(conn: QMPConnection, label: str, timeout: float = 5.0) -> None:
    """The chardev must be connected before device_add: with reconnect-ms (which fph no longer uses)
    chardev-add returned before the connect, and vhost-user-test-device-pci does not wait, so a
    device_add in that window failed with "vhost_backend_init failed: Protocol error" (2 of 4 runs
    through the daemon, under load). QEMU names a socket chardev "disconnected:..." until it is
    connected."""

    async def filename() -> str:
        chardevs = await conn.execute("query-chardev")
        return next((str(c.get("filename", "")) for c in chardevs if c.get("label") == label), "")

    def connected(name: str) -> bool:
        return bool(name) and not name.startswith("disconnected:")

    name = await poll_until_async(filename, timeout, 0.01, until=connected)
    if not connected(name):
        raise DestinationError(f"chardev {label} not connected after {timeout} s ({name or 'absent'})")
