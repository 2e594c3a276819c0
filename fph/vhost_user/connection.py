"""One front-end connection on the event loop: framing with SCM_RIGHTS fds, kick eventfds, the back-end
request channel. Nothing here blocks: sockets and eventfds are non-blocking and registered with the loop,
replies that do not fit the socket buffer wait in a write queue, and the front-end's acks to back-end
requests are read when they arrive (QEMU answers CONFIG_CHANGE_MSG from its main loop, which may be busy
waiting for one of our replies).

Run states (like qemu.qmp): RUNNING -> DISCONNECTING -> CLOSED. Any protocol error, an unexpected EOF or a
device bug closes only this connection; the loop and the other devices keep running.

One loop serves every VM, so a hostile front-end is bounded: every fd it sends is made non-blocking on
arrival (a full blocking pipe as call fd would block the loop in write()), at most
``MAX_MESSAGES_PER_WAKEUP`` messages are handled per readable event (a flood cannot starve the other
sockets), and at most ``MAX_QUEUED_BYTES`` of replies wait for a peer that does not read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
from collections.abc import Callable

from fph.vhost_user import message as m
from fph.vhost_user.backend import VhostUserBackend
from fph.vhost_user.errors import MessageError, ProtocolError, StateError
from fph.vhost_user.handler import AdoptBackendChannel, Result, UnwatchKick, VhostUserHandler, WatchKick
from fph.vhost_user.handover import ChannelState, ConnectionState, FdTable

log = logging.getLogger(__name__)

#: Messages handled per readable event before the loop gets to the other sockets.
MAX_MESSAGES_PER_WAKEUP = 32
#: Replies (or back-end requests) queued for a peer that does not read them before its connection is
#: dropped. QEMU reads each reply before its next request; 64 KiB is thousands of messages.
MAX_QUEUED_BYTES = 64 * 1024
#: One read drains a kick fd: 8 bytes from an eventfd, whatever a pipe holds up to this.
_KICK_READ = 4096


class Runstate(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    DISCONNECTING = "disconnecting"
    CLOSED = "closed"


class _Writer:
    """Non-blocking writes with a queue for what the socket did not take."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, on_error: Callable[[str], None]):
        self._sock, self._loop, self._on_error = sock, loop, on_error
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        if self._pending:
            if len(self._pending) + len(data) > MAX_QUEUED_BYTES:
                self._on_error(f"peer does not read: {len(self._pending)} bytes already queued")
                return
            self._pending += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._on_error(f"send failed: {exc}")
            return
        if sent < len(data):
            self._pending += data[sent:]
            self._loop.add_writer(self._sock.fileno(), self._flush)

    def _flush(self) -> None:
        try:
            sent = self._sock.send(self._pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._loop.remove_writer(self._sock.fileno())
            self._on_error(f"send failed: {exc}")
            return
        del self._pending[:sent]
        if not self._pending:
            self._loop.remove_writer(self._sock.fileno())

    @property
    def unsent(self) -> bytes:
        return bytes(self._pending)

    def pause(self) -> None:
        if self._pending:
            self._loop.remove_writer(self._sock.fileno())

    def resume(self) -> None:
        if self._pending:
            self._loop.add_writer(self._sock.fileno(), self._flush)

    def close(self) -> None:
        if self._pending:
            self._loop.remove_writer(self._sock.fileno())
            self._pending.clear()


def _recv(sock: socket.socket, decoder: m.FrameDecoder) -> tuple[bytes, list[int]] | None:
    """Read at most what the current message still needs. None = would block. Raises MessageError.

    Every fd received is made non-blocking at once: the loop must never block on a peer's fd (a call fd
    that is a full blocking pipe stalled every VM's balloon)."""
    try:
        data, fds, flags, _ = socket.recv_fds(sock, decoder.bytes_needed, m.MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        return None
    try:
        if flags & socket.MSG_CTRUNC:
            raise MessageError(f"more than {m.MAX_FDS} fds attached (control data truncated)")
        for fd in fds:
            os.set_blocking(fd, False)
    except BaseException:
        _close_fds(fds)
        raise
    return data, fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _channel_socket(fd: int) -> socket.socket:
    """The back-end channel's socket; ``fd`` is owned from here on and closed if it is not a Unix stream
    socket (socket() would leave a pipe's fd open behind its ENOTSOCK)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        _close_fds([fd])
        raise ProtocolError(f"SET_BACKEND_REQ_FD: fd is not a socket: {exc.strerror}") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise ProtocolError("SET_BACKEND_REQ_FD: fd is not a Unix stream socket")
    return sock


class BackendChannelConnection:
    """Back-end -> front-end requests (SET_BACKEND_REQ_FD). Implements ``BackendChannel``."""

    def __init__(
        self,
        fd: int,
        loop: asyncio.AbstractEventLoop,
        *,
        need_reply: bool,
        name: str,
        on_closed: Callable[[BackendChannelConnection], None] | None = None,
    ) -> None:
        self.name = name
        self._on_closed = on_closed
        self._loop = loop
        self._sock = _channel_socket(fd)
        self._sock.setblocking(False)
        self._need_reply = need_reply
        self._decoder = m.FrameDecoder()
        self._writer = _Writer(self._sock, loop, self._fail)
        self.sent = 0
        self.acked = 0
        self.nacked = 0
        self.runstate = Runstate.RUNNING
        loop.add_reader(self._sock.fileno(), self._on_readable)

    @property
    def outstanding(self) -> int:
        return self.sent - self.acked - self.nacked if self._need_reply else 0

    def pause(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._writer.pause()

    def resume(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self._writer.resume()

    def export_state(self, fds: FdTable) -> ChannelState:
        return ChannelState(
            fds.add(self._sock.fileno()), self._need_reply, self.sent, self.acked, self.nacked,
            self._writer.unsent.hex(),
        )  # fmt: skip

    @classmethod
    def from_state(
        cls,
        state: ChannelState,
        fds: FdTable,
        loop: asyncio.AbstractEventLoop,
        *,
        name: str,
        on_closed: Callable[[BackendChannelConnection], None] | None = None,
    ) -> BackendChannelConnection:
        """The channel a predecessor had, on a duplicate of its fd, with its counts and unsent bytes."""
        channel = cls(
            os.dup(fds.get(state.fd)), loop, need_reply=state.need_reply, name=name, on_closed=on_closed
        )
        channel.sent, channel.acked, channel.nacked = state.sent, state.acked, state.nacked
        if state.unsent:
            channel._writer.write(bytes.fromhex(state.unsent))
        return channel

    def config_changed(self) -> None:
        if self.runstate is not Runstate.RUNNING:
            log.warning("%s: back-end channel closed; config change not sent", self.name)
            return
        flags = m.VERSION | (m.NEED_REPLY if self._need_reply else 0)
        self._writer.write(m.encode(m.BackendReq.CONFIG_CHANGE_MSG, b"", flags))
        self.sent += 1

    def _on_readable(self) -> None:
        try:
            while True:
                got = _recv(self._sock, self._decoder)
                if got is None:
                    return
                data, fds = got
                _close_fds(fds)
                if fds:
                    raise MessageError("front-end attached fds to a reply on the back-end channel")
                if not data:
                    self.close("front-end closed the back-end channel")
                    return
                msg = self._decoder.feed(data)
                if msg is not None:
                    self._on_reply(msg)
        except ProtocolError as exc:
            self._fail(str(exc))
        except OSError as exc:
            self._fail(f"read failed: {exc}")

    def _on_reply(self, msg: m.Message) -> None:
        h = msg.header
        if h.flags != m.REPLY_FLAGS or h.request != m.BackendReq.CONFIG_CHANGE_MSG or len(msg.payload) != 8:
            raise MessageError(
                f"unexpected message on the back-end channel: request {h.request} "
                f"flags {h.flags:#x} size {h.size}"
            )
        if self.outstanding <= 0:  # also bounds a flood: every reply must answer a request of ours
            raise MessageError("a reply on the back-end channel to no outstanding request")
        if m.decode_u64(msg.payload) == 0:
            self.acked += 1
        else:
            self.nacked += 1
            log.error(
                "%s: front-end failed a CONFIG_CHANGE_MSG (status %d)", self.name, m.decode_u64(msg.payload)
            )

    def _fail(self, reason: str) -> None:
        log.error("%s: back-end channel: %s", self.name, reason)
        self.close(reason)

    def close(self, reason: str = "closed") -> None:
        if self.runstate is Runstate.CLOSED:
            return
        log.info("%s: back-end channel closed: %s", self.name, reason)
        self.runstate = Runstate.CLOSED
        self._loop.remove_reader(self._sock.fileno())
        self._writer.close()
        self._sock.close()
        if self._on_closed is not None:
            self._on_closed(self)


class VhostUserConnection:
    """The main socket of one front-end, driving a sans-IO :class:`VhostUserHandler`."""

    def __init__(
        self,
        sock: socket.socket,
        handler: VhostUserHandler,
        loop: asyncio.AbstractEventLoop,
        on_closed: Callable[[VhostUserConnection], None] | None = None,
    ) -> None:
        self.handler = handler
        self.name = handler.name
        self._sock = sock
        self._sock.setblocking(False)
        self._loop = loop
        self._decoder = m.FrameDecoder()
        self._writer = _Writer(sock, loop, self._fail)
        self._kicks: dict[int, int] = {}
        self._on_closed = on_closed
        self.backend_channel: BackendChannelConnection | None = None
        self.close_reason: str | None = None
        self.runstate = Runstate.RUNNING
        self.closed = asyncio.Event()
        loop.add_reader(sock.fileno(), self._on_readable)

    # ------------------------------------------------------------------ hand-over (a worker upgrade)

    def pause(self) -> None:
        """Stop reading the socket, the kick fds and the back-end channel, so that a successor can take the
        connection over from a quiet state (:meth:`resume` undoes it)."""
        self._loop.remove_reader(self._sock.fileno())
        for fd in self._kicks.values():
            self._loop.remove_reader(fd)
        self._writer.pause()
        if self.backend_channel is not None:
            self.backend_channel.pause()

    def resume(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        for index, fd in self._kicks.items():
            self._loop.add_reader(fd, self._on_kick, index, fd)
        self._writer.resume()
        if self.backend_channel is not None:
            self.backend_channel.resume()

    def export_state(self, fds: FdTable) -> ConnectionState:
        """The paused connection's state; refused while a front-end message is half read (QEMU sends each
        message at once, so asking again a moment later succeeds)."""
        if self.runstate is not Runstate.RUNNING:
            raise StateError(f"connection is {self.runstate.value}")
        if self._decoder.mid_message:
            raise StateError("a front-end message is half read")
        return ConnectionState(
            fds.add(self._sock.fileno()),
            self.handler.export_state(fds),
            self.backend_channel.export_state(fds) if self.backend_channel is not None else None,
            self._writer.unsent.hex(),
        )

    @classmethod
    def from_state(
        cls,
        state: ConnectionState,
        backend: VhostUserBackend,
        fds: FdTable,
        loop: asyncio.AbstractEventLoop,
        *,
        name: str,
        on_closed: Callable[[VhostUserConnection], None] | None = None,
    ) -> VhostUserConnection:
        """Serve a predecessor's connection from its ``state`` on duplicates of its fds (the caller closes
        ``fds``)."""
        handler = VhostUserHandler.from_state(backend, state.handler, fds, name)
        try:
            sock = socket.socket(fileno=os.dup(fds.get(state.fd)))
        except BaseException:
            handler.close()
            raise
        conn = cls(sock, handler, loop, on_closed=on_closed)
        try:
            if state.unsent:
                conn._writer.write(bytes.fromhex(state.unsent))
            for vring in handler.vrings:
                if vring.kick_fd is not None:
                    conn._watch_kick(vring.index, vring.kick_fd)
            if state.channel is not None:
                conn.backend_channel = BackendChannelConnection.from_state(
                    state.channel, fds, loop, name=name, on_closed=conn._backend_channel_closed
                )
                backend.set_backend_channel(conn.backend_channel)
        except BaseException:
            conn.close("hand-over failed")
            raise
        return conn

    # ------------------------------------------------------------------ reading

    def _on_readable(self) -> None:
        handled = 0
        try:
            while self.runstate is Runstate.RUNNING and handled < MAX_MESSAGES_PER_WAKEUP:
                try:
                    got = _recv(self._sock, self._decoder)
                except ProtocolError:
                    _close_fds(self._decoder.take_fds())
                    raise
                if got is None:
                    return
                data, fds = got
                if not data:
                    _close_fds(fds)
                    if self._decoder.mid_message:
                        _close_fds(self._decoder.take_fds())
                        self._fail(
                            f"front-end disconnected in the middle of a message "
                            f"({self._decoder.bytes_needed} bytes missing)"
                        )
                    else:
                        self.close("front-end disconnected")
                    return
                try:
                    msg = self._decoder.feed(data, fds)
                except ProtocolError:
                    _close_fds(self._decoder.take_fds())
                    raise
                if msg is not None:
                    handled += 1
                    self._apply(self.handler.handle(msg))
        except ProtocolError as exc:
            self._fail(str(exc))
        except OSError as exc:
            self._fail(f"socket error: {exc}")
        except Exception as exc:  # a bug must not take the other devices down
            log.exception("%s: internal error while handling a front-end message", self.name)
            self._fail(f"internal error: {exc!r}")

    def _apply(self, result: Result) -> None:
        actions = list(result.actions)
        try:
            while actions:
                action = actions.pop(0)
                if isinstance(action, WatchKick):
                    self._watch_kick(action.index, action.fd)
                elif isinstance(action, UnwatchKick):
                    self._unwatch_kick(action.index)
                elif isinstance(action, AdoptBackendChannel):
                    self._adopt_backend_channel(action.fd)
        finally:
            # An action failed: the channel fds of those not applied are ours (kick fds are the vrings').
            _close_fds([a.fd for a in actions if isinstance(a, AdoptBackendChannel)])
        if result.reply is not None:
            self._writer.write(result.reply)

    def _watch_kick(self, index: int, fd: int) -> None:
        self._unwatch_kick(index)
        try:
            self._loop.add_reader(fd, self._on_kick, index, fd)
        except OSError as exc:  # epoll refuses regular files (EPERM); the vring still owns and closes the fd
            raise ProtocolError(f"kick fd of vring {index} cannot be watched: {exc}") from exc
        self._kicks[index] = fd

    def _unwatch_kick(self, index: int) -> None:
        fd = self._kicks.pop(index, None)
        if fd is not None:
            self._loop.remove_reader(fd)

    def _on_kick(self, index: int, fd: int) -> None:
        # os.read, not eventfd_read: glibc's eventfd_read reports a short read (a pipe at EOF, which stays
        # readable forever) as -1 with a stale errno, EAGAIN included, and the loop would spin on it.
        try:
            data = os.read(fd, _KICK_READ)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("%s: kick fd of vring %d: %s", self.name, index, exc)
            self._unwatch_kick(index)
            return
        if not data:
            log.error(
                "%s: kick fd of vring %d is at EOF (not an eventfd); no longer watched", self.name, index
            )
            self._unwatch_kick(index)
            return
        try:
            self.handler.kick(index)
        except Exception as exc:
            log.exception("%s: internal error while processing vring %d", self.name, index)
            self._fail(f"internal error: {exc!r}")

    def _adopt_backend_channel(self, fd: int) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close("replaced by a new SET_BACKEND_REQ_FD")
        need_reply = bool(self.handler.acked_protocol_features & m.ProtocolFeature.REPLY_ACK)
        self.backend_channel = BackendChannelConnection(
            fd, self._loop, need_reply=need_reply, name=self.name, on_closed=self._backend_channel_closed
        )
        self.handler.backend.set_backend_channel(self.backend_channel)

    def _backend_channel_closed(self, channel: BackendChannelConnection) -> None:
        """QEMU closes the channel on device_del; the device must not keep announcing into it."""
        if self.backend_channel is channel:
            self.backend_channel = None
            self.handler.backend.set_backend_channel(None)

    # ------------------------------------------------------------------ closing

    def _fail(self, reason: str) -> None:
        log.error("%s: closing the vhost-user connection: %s", self.name, reason)
        self.close(reason)

    def close(self, reason: str = "closed by fph") -> None:
        if self.runstate is not Runstate.RUNNING:
            return
        self.runstate = Runstate.DISCONNECTING
        self.close_reason = reason
        log.info("%s: connection closing: %s", self.name, reason)
        self._loop.remove_reader(self._sock.fileno())
        for index in list(self._kicks):
            self._unwatch_kick(index)
        if self.backend_channel is not None:
            self.backend_channel.close("main connection closed")
            self.backend_channel = None
        try:
            self.handler.close()
        except Exception:
            log.exception("%s: error while releasing the device state", self.name)
        self._writer.close()
        self._sock.close()
        self.runstate = Runstate.CLOSED
        self.closed.set()
        if self._on_closed is not None:
            self._on_closed(self)
