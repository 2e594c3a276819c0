"""fph's QMP side: one error tree, an async connection (qemu.qmp) and a tiny synchronous call.

Every error QEMU reports reaches the caller with QEMU's own description (``desc``) and class, wrapped in
:class:`QMPCommandError`; transport problems are :class:`QMPConnectError` / :class:`QMPDisconnectedError`;
migration outcomes are :class:`MigrationError` and its subclasses. Catch :class:`QMPError` for all of them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Mapping
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient, StateError
from qemu.qmp import QMPError as _LibQMPError

from fph.waiting import retry_until, retry_until_async


class QMPError(Exception):
    """Base of every error on fph's QMP side."""


class QMPConnectError(QMPError):
    """Could not connect to a QMP socket (QEMU not running, wrong path, socket busy)."""

    def __init__(self, path: str, cause: str) -> None:
        super().__init__(f"cannot connect to QMP at {path}: {cause}")
        self.path = path
        self.cause = cause


class QMPDisconnectedError(QMPError):
    """The QMP connection went away while a command was in flight (QEMU exited or crashed)."""


class QMPCommandError(QMPError):
    """QEMU refused a command. ``desc`` is QEMU's own description, ``error_class`` its class."""

    def __init__(
        self, command: str, arguments: Mapping[str, Any] | None, error_class: str, desc: str
    ) -> None:
        super().__init__(f"QMP {command} failed: {desc} ({error_class})")
        self.command = command
        self.arguments = dict(arguments or {})
        self.error_class = error_class
        self.desc = desc

    @classmethod
    def from_response(
        cls, command: str, arguments: Mapping[str, Any] | None, response: Mapping[str, Any]
    ) -> QMPCommandError:
        """Build from a QMP ``{"error": {"class", "desc"}}`` response."""
        err = response.get("error") or {}
        return cls(command, arguments, str(err.get("class", "?")), str(err.get("desc", json.dumps(response))))


class MigrationError(QMPError):
    """A migration ended without completing. ``desc`` is QEMU's ``error-desc`` when QEMU gave one."""

    def __init__(self, status: str, desc: str | None, info: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"migration {status}: {desc}" if desc else f"migration {status}")
        self.status = status
        self.desc = desc
        self.info = dict(info or {})


class MigrationCancelledError(MigrationError):
    """The migration was cancelled (by ``NativeMigration.cancel`` or another QMP client)."""


class MigrationTimeoutError(MigrationError):
    """The migration did not finish in time; it was cancelled."""


class QMPConnection:
    """An async QMP connection (qemu.qmp's QMPClient) whose errors are fph's error tree."""

    def __init__(self, path: str, name: str = "fph") -> None:
        self.path = path
        self.client = QMPClient(name)

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and negotiate capabilities; retry until the socket accepts (QEMU may still be starting)."""
        try:
            await retry_until_async(lambda: self.client.connect(self.path), timeout, (ConnectError, OSError))
        except (ConnectError, OSError) as e:
            raise QMPConnectError(self.path, str(e)) from e

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run a command; QEMU's error becomes :class:`QMPCommandError` with QEMU's description."""
        try:
            return await self.client.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as e:
            raise QMPCommandError(command, arguments, e.error_class, e.error.error.desc) from e
        except (ExecInterruptedError, StateError, EOFError, ConnectionError) as e:
            raise QMPDisconnectedError(f"QMP {command} at {self.path}: connection lost ({e})") from e
        except _LibQMPError as e:
            raise QMPError(f"QMP {command} at {self.path}: {e}") from e

    def listener(self, names: tuple[str, ...]) -> EventListener:
        """An event listener registered on this connection (remove with :meth:`remove_listener`)."""
        listener = EventListener(names)
        self.client.register_listener(listener)
        return listener

    def remove_listener(self, listener: EventListener) -> None:
        self.client.remove_listener(listener)

    async def close(self) -> None:
        with contextlib.suppress(_LibQMPError, OSError, EOFError):  # already gone: nothing to close
            await self.client.disconnect()

    async def __aenter__(self) -> QMPConnection:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def qmp_call(
    path: str, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    """One synchronous QMP command over a fresh connection (no event loop: safe inside async code too).

    The lab VM keeps a second monitor for these calls so they never compete with an async connection.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = None
    try:

        def connect() -> None:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(path)

        try:
            retry_until(connect, timeout, (OSError,))
        except OSError as e:
            raise QMPConnectError(path, str(e)) from e
        reader = sock.makefile("rb")

        def reply() -> dict[str, Any]:
            while True:
                try:
                    line = reader.readline()
                except (TimeoutError, OSError) as e:
                    raise QMPDisconnectedError(f"QMP {command} at {path}: {e}") from e
                if not line:
                    raise QMPDisconnectedError(f"QMP {command} at {path}: connection closed by QEMU")
                msg = json.loads(line)
                if "return" in msg or "error" in msg or "QMP" in msg:
                    return dict(msg)

        reply()  # greeting
        for cmd, args in (("qmp_capabilities", None), (command, arguments)):
            msg: dict[str, Any] = {"execute": cmd}
            if args:
                msg["arguments"] = dict(args)
            sock.sendall(json.dumps(msg).encode() + b"\n")
            resp = reply()
            if "error" in resp:
                raise QMPCommandError.from_response(cmd, args, resp)
        return resp["return"]
    finally:
        # Close the file object too: it holds the socket open otherwise (a traceback keeps it alive), and
        # QEMU serves one client per monitor, so the next call would wait for a greeting that never comes.
        if reader is not None:
            reader.close()
        sock.close()
