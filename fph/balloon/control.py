"""Reaching a balloon from another thread or loop: :class:`BalloonControl`, and a receiver on a thread of
its own (:class:`ThreadedHintReceiver`).

One owner: a device and its receiver belong to the event loop that serves their connection. Every call
here runs there (``call_soon_threadsafe``) and returns a value, never the device itself; each operation has
a blocking form for threads and an ``_async`` form for coroutines on any other loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fph.balloon.counters import BalloonCounters, HintMetrics
from fph.balloon.device import BalloonDevice
from fph.balloon.free_page_hint import HintStatus
from fph.balloon.receiver import HintReceiver
from fph.balloon.sink import HintSink
from fph.balloon.spec import F_FREE_PAGE_HINT
from fph.balloon.stats import GuestStats
from fph.vhost_user.connection import VhostUserConnection

T = TypeVar("T")


@dataclass(frozen=True)
class DeviceView:
    """A copy of what a device negotiated and counted, taken on its loop."""

    acked: int
    connected: bool
    has_channel: bool
    actual: int
    num_pages: int
    poison_val: int
    broken: str | None
    config_unread: bool
    counters: BalloonCounters

    @property
    def hinting(self) -> bool:
        """The driver negotiated free page hinting and the guest can be told (a back-end channel)."""
        return bool(self.acked & F_FREE_PAGE_HINT) and self.has_channel and self.broken is None


class BalloonControl:
    """Thread-safe handle on one VM's balloon device."""

    def __init__(
        self, receiver: HintReceiver, socket_path: str, loop: asyncio.AbstractEventLoop, timeout: float = 5.0
    ) -> None:
        self._receiver = receiver
        self._path = socket_path
        self._loop = loop
        self._timeout = timeout

    @property
    def socket_path(self) -> str:
        return self._path

    def _device(self) -> BalloonDevice:
        return self._receiver.devices[self._path]

    def _call(self, fn: Callable[[BalloonDevice], T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return fn(self._device())

        async def run() -> T:
            return fn(self._device())

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self._timeout)

    async def _call_async(self, fn: Callable[[BalloonDevice], T]) -> T:
        if asyncio.get_running_loop() is self._loop:
            return fn(self._device())

        async def run() -> T:
            return fn(self._device())

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self._loop))

    # ------------------------------------------------------------------ hint runs

    def request_hints(self, on_issue: Callable[[int], None] | None = None) -> int:
        """Start a hint run. ``on_issue(id)`` runs on the device's loop in the same step as the id is
        issued, so nothing of that id can reach the sink first (the migration opens its bitmap epoch
        there: a hint arriving before the epoch opened would be dropped as stale)."""
        return self._call(lambda d: _issue(d, on_issue))

    async def request_hints_async(self, on_issue: Callable[[int], None] | None = None) -> int:
        return await self._call_async(lambda d: _issue(d, on_issue))

    def stop_hints(self) -> None:
        self._call(BalloonDevice.stop_hints)

    async def stop_hints_async(self) -> None:
        await self._call_async(BalloonDevice.stop_hints)

    def done(self) -> None:
        self._call(BalloonDevice.done)

    async def done_async(self) -> None:
        await self._call_async(BalloonDevice.done)

    def done_and_wait(self, timeout: float = 2.0) -> bool:
        """DONE, then wait (bounded) until the guest read it; False if it did not within ``timeout``.
        Blocks: call it from a thread, never from the device's loop."""
        future = asyncio.run_coroutine_threadsafe(self._done_and_wait(timeout), self._loop)
        return future.result(timeout + self._timeout)

    async def done_and_wait_async(self, timeout: float = 2.0) -> bool:
        future = asyncio.run_coroutine_threadsafe(self._done_and_wait(timeout), self._loop)
        return await asyncio.wrap_future(future)

    async def _done_and_wait(self, timeout: float) -> bool:
        return not await self._receiver.done_and_wait([self._device()], timeout)

    def status(self) -> HintStatus:
        return self._call(BalloonDevice.status)

    async def status_async(self) -> HintStatus:
        return await self._call_async(BalloonDevice.status)

    def set_sink(self, sink: HintSink) -> None:
        """Where hints go from now on (a migration's bitmap, then back to the VM's counter)."""
        self._call(lambda d: setattr(d, "sink", sink))

    async def set_sink_async(self, sink: HintSink) -> None:
        await self._call_async(lambda d: setattr(d, "sink", sink))

    def take_metrics(self) -> HintMetrics:
        return self._call(BalloonDevice.take_metrics)

    def config_unread(self) -> bool:
        return self._call(lambda d: d.config_unread)

    # ------------------------------------------------------------------ stats, target, what it negotiated

    def guest_stats(self) -> GuestStats:
        return self._call(BalloonDevice.guest_stats)

    async def guest_stats_async(self) -> GuestStats:
        return await self._call_async(BalloonDevice.guest_stats)

    def request_stats(self) -> bool:
        return self._call(BalloonDevice.request_stats)

    async def request_stats_async(self) -> bool:
        return await self._call_async(BalloonDevice.request_stats)

    def set_target(self, num_pages: int) -> None:
        self._call(lambda d: d.set_target(num_pages))

    async def set_target_async(self, num_pages: int) -> None:
        await self._call_async(lambda d: d.set_target(num_pages))

    def view(self) -> DeviceView:
        return self._call(self._view)

    async def view_async(self) -> DeviceView:
        return await self._call_async(self._view)

    def _view(self, d: BalloonDevice) -> DeviceView:
        return device_view(self._receiver, self._path)

    def used_ring_ranges(self) -> list[tuple[int, int]]:
        """GPA ranges of the balloon's used rings (fph writes them; no guest store logs them)."""
        return self._call(lambda _d: self._receiver.used_ring_ranges(self._path))


def device_view(receiver: HintReceiver, socket_path: str) -> DeviceView:
    """A copy of a device's state; call it on the receiver's loop."""
    d = receiver.devices[socket_path]
    return DeviceView(
        acked=d.acked,
        connected=receiver.connected(socket_path),
        has_channel=d.channel is not None,
        actual=d.actual,
        num_pages=d.num_pages,
        poison_val=d.poison_val,
        broken=d.broken,
        config_unread=d.config_unread,
        counters=replace(d.counters),
    )


def _issue(device: BalloonDevice, on_issue: Callable[[int], None] | None) -> int:
    cmd_id = device.request_hints()
    if on_issue is not None:
        on_issue(cmd_id)
    return cmd_id


class ThreadedHintReceiver:
    """A HintReceiver on its own event-loop thread, for synchronous callers (the daemon, tests, benchmarks).

    A process that hosts it next to busy Python threads should lower the GIL switch interval
    (``sys.setswitchinterval(SWITCH_INTERVAL_S)``, as ``fph.hint_receiver.main()`` does): the device
    thread waits for the GIL.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._receiver = HintReceiver()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fph-hint-receiver", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def add_vm(self, socket_path: str, sink: HintSink | None = None, **device_args: Any) -> BalloonControl:
        self.run(self._receiver.add_vm(socket_path, sink, **device_args))
        return BalloonControl(self._receiver, socket_path, self.loop)

    async def remove_vm_async(self, socket_path: str) -> None:
        await self.run_async(self._receiver.remove_vm(socket_path))

    def connection(self, socket_path: str) -> VhostUserConnection | None:
        """The live front-end connection of a VM (tests inspect its back-end channel)."""

        async def get() -> VhostUserConnection | None:
            listener = self._receiver.server.listeners.get(socket_path)
            return None if listener is None else listener.connection

        return self.run(get(), 2.0)

    def connected(self, socket_path: str) -> bool:
        async def get() -> bool:
            return self._receiver.connected(socket_path)

        return self.run(get(), 2.0)

    def close(self, timeout: float = 2.0) -> None:
        if not self._thread.is_alive():
            return
        self.run(self._receiver.close(timeout), timeout + 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
