"""Knowing when a QEMU the daemon did not start exits: its PID from the QMP socket, then a pidfd.

The orchestrator starts QEMU, so the daemon has no child to wait for. The Unix socket QEMU listens on
carries its owner's credentials (SO_PEERCRED, set when the connection is made, before QEMU accepts it),
and a pidfd turns that PID into something the event loop can wait on without polling: it becomes
readable when the process exits, and it cannot be fooled by the PID being reused afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from pathlib import Path

_UCRED = struct.Struct("3i")  # pid, uid, gid


def socket_owner_pid(path: Path, timeout: float = 2.0) -> int | None:
    """The PID of the process listening on the Unix socket ``path`` (None if it cannot be told)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            pid, _, _ = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            return None
    return pid if pid > 0 else None


class ProcessExit:
    """An awaitable for one process's exit (Linux pidfd). Opened on the loop's thread; ``close`` always."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.pidfd_open(pid)  # ProcessLookupError: already gone
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)
        self._loop.remove_reader(self._fd)

    async def wait(self) -> None:
        await asyncio.shield(self._exited)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if not self._exited.done():
            self._exited.cancel()
