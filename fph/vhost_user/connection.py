"""One front-end connection on the event loop: framing with SCM_RIGHTS fds, kick eventfds, the back-end
request channel. Nothing here blocks: sockets and eventfds are non-blocking and registered with the loop,
replies that do not fit the socket buffer wait in a write queue, and the front-end's acks to back-end
requests are read when they arrive (QEMU answers CONFIG_CHANGE_MSG from its main loop, which may be busy
waiting for one of our replies).

Run states (like qemu.qmp): RUNNING -> DISCONNECTING -> CLOSED. Any protocol error, an unexpected EOF or a
device bug closes only this connection; the loop and the other devices keep running.
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
from fph.vhost_user.errors import MessageError, ProtocolError
from fph.vhost_user.handler import AdoptBackendChannel, Result, UnwatchKick, VhostUserHandler, WatchKick

log = logging.getLogger(__name__)


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

    def close(self) -> None:
        if self._pending:
            self._loop.remove_writer(self._sock.fileno())
            self._pending.clear()


def _recv(sock: socket.socket, decoder: m.FrameDecoder) -> tuple[bytes, list[int]] | None:
    """Read at most what the current message still needs. None = would block. Raises MessageError."""
    try:
        data, fds, flags, _ = socket.recv_fds(sock, decoder.bytes_needed, m.MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        return None
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise MessageError(f"more than {m.MAX_FDS} fds attached (control data truncated)")
    return data, fds


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
        self._sock = socket.socket(fileno=fd)
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
                for fd in fds:
                    os.close(fd)
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

    # ------------------------------------------------------------------ reading

    def _on_readable(self) -> None:
        try:
            while self.runstate is Runstate.RUNNING:
                try:
                    got = _recv(self._sock, self._decoder)
                except ProtocolError:
                    self._close_fds(self._decoder.take_fds())
                    raise
                if got is None:
                    return
                data, fds = got
                if not data:
                    for fd in fds:
                        os.close(fd)
                    if self._decoder.mid_message:
                        self._close_fds(self._decoder.take_fds())
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
                    self._close_fds(self._decoder.take_fds())
                    raise
                if msg is not None:
                    self._apply(self.handler.handle(msg))
        except ProtocolError as exc:
            self._fail(str(exc))
        except OSError as exc:
            self._fail(f"socket error: {exc}")
        except Exception as exc:  # a bug must not take the other devices down
            log.exception("%s: internal error while handling a front-end message", self.name)
            self._fail(f"internal error: {exc!r}")

    def _apply(self, result: Result) -> None:
        for action in result.actions:
            if isinstance(action, WatchKick):
                self._watch_kick(action.index, action.fd)
            elif isinstance(action, UnwatchKick):
                self._unwatch_kick(action.index)
            elif isinstance(action, AdoptBackendChannel):
                self._adopt_backend_channel(action.fd)
        if result.reply is not None:
            self._writer.write(result.reply)

    def _watch_kick(self, index: int, fd: int) -> None:
        self._unwatch_kick(index)
        os.set_blocking(fd, False)
        self._kicks[index] = fd
        self._loop.add_reader(fd, self._on_kick, index, fd)

    def _unwatch_kick(self, index: int) -> None:
        fd = self._kicks.pop(index, None)
        if fd is not None:
            self._loop.remove_reader(fd)

    def _on_kick(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("%s: kick fd of vring %d: %s", self.name, index, exc)
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

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

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
