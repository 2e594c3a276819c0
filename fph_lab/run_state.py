"""The guest's stop window as QEMU itself reports it: STOP on the source, RESUME on the destination.

Each mode measures its downtime its own way: QEMU's ``downtime`` (query-migrate) ends when the source has
written its last bytes, before the destination has read them and resumed; fph's ends at the destination's
``cont``. Neither is the time the guest stood still. Both QEMUs emit a QMP event with a host timestamp when
their vCPUs stop (``STOP``) and when they start (``RESUME``), and both "hosts" of the lab share one clock, so
the destination's RESUME minus the source's last STOP before it is the same measure for every mode.

    watches = RunStateWatch(src), RunStateWatch(dst)   # before the migration, on the lab's QMP sockets
    ...                                                # the migration
    stop_to_resume_ms(watches[0].events(), watches[1].events())
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import Any

from fph.qmp import QMPConnection, QMPError
from fph_lab.errors import LabError
from fph_lab.vm import VM


@dataclass(frozen=True)
class RunStateEvent:
    name: str
    """``STOP``, ``RESUME`` or ``MIGRATION``."""
    t: float
    """QEMU's timestamp: host wall-clock seconds."""
    status: str = ""
    """A MIGRATION event's status (``active``, ``completed``, ...)."""


class RunStateWatch:
    """Records one VM's STOP and RESUME events on the lab's own QMP socket (a thread with its own loop)."""

    def __init__(self, vm: VM, connect_timeout: float = 10.0) -> None:
        self.vm = vm
        self._events: list[RunStateEvent] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._connected = threading.Event()
        self._error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=f"run-state-{vm.name}", daemon=True)
        self._thread.start()
        if not self._connected.wait(connect_timeout) or self._error is not None:
            self.close()
            raise LabError(f"{vm.name}: cannot watch STOP/RESUME on {vm.lab_qmp_socket}: {self._error}")

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._watch())
        except (QMPError, OSError) as e:
            self._error = e
            self._connected.set()
        finally:
            self._loop.close()

    async def _watch(self) -> None:
        self._stopping = asyncio.Event()
        conn = QMPConnection(str(self.vm.lab_qmp_socket), f"lab-run-state-{self.vm.name}")
        await conn.connect()
        listener = conn.listener(("STOP", "RESUME", "MIGRATION"))
        self._connected.set()
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                get = asyncio.ensure_future(listener.get())
                await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                ev: dict[str, Any] = dict(get.result())
                ts = ev.get("timestamp") or {}
                t = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
                with self._lock:
                    status = str((ev.get("data") or {}).get("status", ""))
                    self._events.append(RunStateEvent(str(ev["event"]), t, status))
        finally:
            stop.cancel()
            conn.remove_listener(listener)
            await conn.close()

    def events(self) -> list[RunStateEvent]:
        with self._lock:
            return list(self._events)

    def close(self) -> None:
        """End the watch (idempotent); the events stay readable."""
        if self._thread.is_alive() and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(5.0)


def stop_to_resume_ms(src: list[RunStateEvent], dst: list[RunStateEvent]) -> float | None:
    """The destination's first RESUME minus the source's last STOP before it (None: either is missing)."""
    resumes = [e.t for e in dst if e.name == "RESUME"]
    if not resumes:
        return None
    stops = [e.t for e in src if e.name == "STOP" and e.t <= resumes[0]]
    return (resumes[0] - stops[-1]) * 1e3 if stops else None
