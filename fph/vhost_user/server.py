"""A Unix-socket server for vhost-user devices: one listening socket per device (one device per VM), all on
one asyncio event loop. fph listens, QEMU connects (and reconnects with ``reconnect-ms``).

A device keeps its state across connections of its socket; a new connection while one is live is refused
(QEMU opens exactly one per chardev). Run states: IDLE -> RUNNING -> DISCONNECTING -> CLOSED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import stat
from dataclasses import dataclass, field

from fph.vhost_user.backend import VhostUserBackend
from fph.vhost_user.connection import Runstate, VhostUserConnection
from fph.vhost_user.errors import ConnectError, StateError
from fph.vhost_user.handler import VhostUserHandler
from fph.vhost_user.handover import FdTable, ListenerState

log = logging.getLogger(__name__)


@dataclass
class Listener:
    path: str
    name: str
    backend: VhostUserBackend
    sock: socket.socket
    connection: VhostUserConnection | None = None
    connections_served: int = 0
    inode: int = 0
    """The socket file this listener bound: only that file is removed when it stops (a successor may
    have bound the path since)."""
    connected: asyncio.Event = field(default_factory=asyncio.Event)


class VhostUserServer:
    def __init__(self) -> None:
        self.runstate = Runstate.IDLE
        self.listeners: dict[str, Listener] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self.runstate in (Runstate.DISCONNECTING, Runstate.CLOSED):
            raise StateError(f"server is {self.runstate.value}")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.runstate = Runstate.RUNNING
        return self._loop

    async def add_device(self, path: str, backend: VhostUserBackend, name: str | None = None) -> Listener:
        """Listen on ``path`` for the front-end of ``backend``."""
        loop = self._require_loop()
        if path in self.listeners:
            raise StateError(f"already listening on {path}")
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(4)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot listen on {path}: {exc}") from exc
        sock.setblocking(False)
        listener = Listener(path, name or os.path.basename(path), backend, sock, inode=os.stat(path).st_ino)
        self.listeners[path] = listener
        loop.add_reader(sock.fileno(), self._accept, listener)
        log.info("%s: listening on %s", listener.name, path)
        return listener

    # ------------------------------------------------------------------ hand-over (a worker upgrade)

    def pause(self, path: str) -> None:
        """Stop accepting and serving on ``path`` (for a hand-over); :meth:`resume` undoes it."""
        listener = self.listeners[path]
        self._require_loop().remove_reader(listener.sock.fileno())
        if listener.connection is not None:
            listener.connection.pause()

    def resume(self, path: str) -> None:
        listener = self.listeners[path]
        self._require_loop().add_reader(listener.sock.fileno(), self._accept, listener)
        if listener.connection is not None:
            listener.connection.resume()

    def export_state(self, path: str, fds: FdTable) -> ListenerState:
        """The paused listener's state: its socket, and its live connection's."""
        listener = self.listeners[path]
        conn = listener.connection
        return ListenerState(
            path, fds.add(listener.sock.fileno()), listener.inode, listener.connections_served,
            conn.export_state(fds) if conn is not None else None,
        )  # fmt: skip

    def take_over(
        self, state: ListenerState, backend: VhostUserBackend, fds: FdTable, name: str | None = None
    ) -> Listener:
        """A predecessor's listening socket and connection (duplicates of ``fds``, which the caller closes),
        set up from where they were but paused: :meth:`resume` once the predecessor has let go of them (it
        is paused too, so nobody reads them in between; a hand-over that fails before then leaves the
        predecessor's rings untouched)."""
        loop = self._require_loop()
        if state.path in self.listeners:
            raise StateError(f"already listening on {state.path}")
        sock = socket.socket(fileno=os.dup(fds.get(state.fd)))
        sock.setblocking(False)
        listener = Listener(
            state.path, name or os.path.basename(state.path), backend, sock,
            connections_served=state.connections_served, inode=state.inode,
        )  # fmt: skip
        try:
            if state.connection is not None:
                listener.connection = VhostUserConnection.from_state(
                    state.connection, backend, fds, loop, name=listener.name,
                    on_closed=functools.partial(self._closed, listener),
                )  # fmt: skip
                listener.connected.set()
        except BaseException:
            sock.close()
            raise
        self.listeners[state.path] = listener
        if listener.connection is not None:
            listener.connection.pause()
        log.info(
            "%s: took over %s%s", listener.name, state.path,
            " and its live front-end connection" if listener.connection is not None else "",
        )  # fmt: skip
        return listener

    def drop(self, path: str) -> None:
        """Forget a taken-over listener that was never resumed (its hand-over failed): its duplicates are
        closed, the socket file and the peer's connection stay the predecessor's."""
        listener = self.listeners.pop(path)
        if listener.connection is not None:
            listener.connection.close("hand-over failed")
        listener.sock.close()

    def _accept(self, listener: Listener) -> None:
        try:
            conn_sock, _ = listener.sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("%s: accept failed: %s", listener.name, exc)
            return
        if listener.connection is not None:
            log.error("%s: refusing a second front-end connection while one is live", listener.name)
            conn_sock.close()
            return
        assert self._loop is not None
        listener.connections_served += 1
        try:
            handler = VhostUserHandler(listener.backend, name=listener.name)
            listener.connection = VhostUserConnection(
                conn_sock, handler, self._loop, on_closed=functools.partial(self._closed, listener)
            )
        except Exception:  # e.g. a device whose queue size no ring may have: refuse, keep no socket
            log.exception("%s: cannot serve the new front-end connection", listener.name)
            conn_sock.close()
            return
        listener.connected.set()
        log.info("%s: front-end connected (connection %d)", listener.name, listener.connections_served)

    @staticmethod
    def _closed(listener: Listener, conn: VhostUserConnection) -> None:
        if listener.connection is conn:
            listener.connection = None
            listener.connected.clear()

    async def remove_device(self, path: str) -> None:
        listener = self.listeners.pop(path)
        loop = self._require_loop()
        loop.remove_reader(listener.sock.fileno())
        listener.sock.close()
        if listener.connection is not None:
            listener.connection.close("device removed from fph")
        unlink_own_socket(listener.path, listener.inode)

    async def close(self) -> None:
        if self.runstate in (Runstate.DISCONNECTING, Runstate.CLOSED):
            return
        if self._loop is None:
            self.runstate = Runstate.CLOSED
            return
        self.runstate = Runstate.DISCONNECTING
        for path in list(self.listeners):
            listener = self.listeners.pop(path)
            self._loop.remove_reader(listener.sock.fileno())
            listener.sock.close()
            if listener.connection is not None:
                listener.connection.close("fph shutting down")
            unlink_own_socket(listener.path, listener.inode)
        self.runstate = Runstate.CLOSED


def unlink_own_socket(path: str, inode: int) -> None:
    """Remove the socket file at ``path`` if it is still the one this process bound (``inode``): a
    successor may have bound the path since."""
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


def remove_stale_socket(path: str) -> None:
    """A socket nobody listens on (left by a crashed process) is removed; one a process serves is an
    error (ConnectError), as is a path that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConnectError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a crashed instance
        return
    finally:
        probe.close()
    raise ConnectError(f"another process is already listening on {path}")
