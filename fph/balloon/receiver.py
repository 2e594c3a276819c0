"""The hint receiver: one vhost-user server on one event loop, one balloon device per VM socket."""

from __future__ import annotations

import logging
import os
from typing import Any

from fph.balloon.device import BalloonDevice
from fph.balloon.device_state import DeviceState
from fph.balloon.sink import HintSink
from fph.balloon.spec import F_FREE_PAGE_HINT
from fph.vhost_user.handover import FdTable, ListenerState
from fph.vhost_user.server import VhostUserServer
from fph.waiting import poll_until_async

log = logging.getLogger("fph.hint_receiver")


class HintReceiver:
    """Serves one balloon device per VM socket on the running asyncio loop; every method runs there."""

    def __init__(self) -> None:
        self.server = VhostUserServer()
        self.devices: dict[str, BalloonDevice] = {}

    async def add_vm(
        self, socket_path: str, sink: HintSink | None = None, **device_args: Any
    ) -> BalloonDevice:
        device = BalloonDevice(
            sink, name=device_args.pop("name", os.path.basename(socket_path)), **device_args
        )
        await self.server.add_device(socket_path, device, device.name)
        self.devices[socket_path] = device
        return device

    def take_over_vm(
        self,
        listener: ListenerState,
        device_state: DeviceState,
        fds: FdTable,
        sink: HintSink | None = None,
        **device_args: Any,
    ) -> BalloonDevice:
        """A VM that another process served until now (a worker upgrade): its listening socket, its live
        connection and its device state (duplicates of ``fds``; the caller closes them), paused until
        :meth:`resume_vm`."""
        device = BalloonDevice(
            sink, name=device_args.pop("name", os.path.basename(listener.path)), **device_args
        )
        served = self.server.take_over(listener, device, fds, device.name)
        vrings = served.connection.handler.vrings if served.connection is not None else []
        try:
            device.import_state(device_state, vrings)
        except Exception:
            self.server.drop(listener.path)
            raise
        self.devices[listener.path] = device
        return device

    def resume_vm(self, socket_path: str) -> None:
        """Serve a taken-over VM: read its fds again and look at every ring once (a kick that came while
        no process read its eventfd is still counted there; looking once more costs nothing)."""
        self.server.resume(socket_path)
        listener = self.server.listeners[socket_path]
        if listener.connection is not None:
            device = self.devices[socket_path]
            for vring in listener.connection.handler.vrings:
                if vring.active:
                    device.process_queue(vring)

    async def remove_vm(self, socket_path: str) -> None:
        """Stop serving a VM: its connection is closed and its socket removed."""
        self.devices.pop(socket_path, None)
        await self.server.remove_device(socket_path)

    def connected(self, socket_path: str) -> bool:
        listener = self.server.listeners.get(socket_path)
        return listener is not None and listener.connection is not None

    def used_ring_ranges(self, socket_path: str) -> list[tuple[int, int]]:
        listener = self.server.listeners.get(socket_path)
        if listener is None or listener.connection is None:
            return []
        return listener.connection.handler.used_ring_ranges()

    async def wait_config_read(self, devices: list[BalloonDevice], timeout: float) -> list[BalloonDevice]:
        """Wait (bounded) until each device's guest has read its config; returns those that did not."""

        async def all_read() -> bool:
            return not any(d.config_unread for d in devices)

        await poll_until_async(all_read, timeout, 0.005)
        return [d for d in devices if d.config_unread]

    async def done_and_wait(
        self, devices: list[BalloonDevice], timeout: float, *, force: bool = False
    ) -> list[BalloonDevice]:
        """DONE to each device, then wait (bounded) until each guest has read it; returns those whose guest
        did not within ``timeout``. ``force``: announce DONE again even where it is already DONE."""
        for device in devices:
            device.done(force=force)
        return await self.wait_config_read(devices, timeout)

    async def release_all(self, timeout: float = 2.0) -> None:
        """DONE to every guest that can hear it, then wait (bounded) until each has read its config."""
        hearing = [
            device
            for path, device in self.devices.items()
            if self.connected(path) and device.channel is not None and device.acked & F_FREE_PAGE_HINT
        ]
        # force: even if already DONE, an earlier interrupt may have gone unheard
        for device in await self.done_and_wait(hearing, timeout, force=True):
            log.error(
                "%s: the guest did not read DONE within %.1f s; hinted blocks may stay held until "
                "fph reconnects or the device is removed (device_del)",
                device.name,
                timeout,
            )

    async def close(self, timeout: float = 2.0) -> None:
        await self.release_all(timeout)
        await self.server.close()
