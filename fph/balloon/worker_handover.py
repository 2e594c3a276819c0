"""A balloon worker hands its VM over to a successor (a worker upgrade) without dropping QEMU's connection.

Why: QEMU 11.1 aborts when the balloon's vhost-user back-end it was connected to goes away and the device is
later unplugged or reconnected, so a worker can never just be restarted. Instead the new worker
(``python -m fph.balloon.worker --take-over``) asks the running one over its control socket, and gets:

- the listening vhost-user socket, QEMU's connection, the back-end channel, every ring's kick/call/err
  eventfd, each guest memory region's fd and the dirty log's fd, and the control socket (SCM_RIGHTS);
- the state that goes with them (:class:`WorkerState`): ring indices, negotiated features, the hint run
  and the held blocks, the stats buffer.

The exchange, on one control connection (the daemon has let go of the worker first):

    successor -> Request(HAND_OVER, HANDOVER_VERSION)
    worker    -> Reply(WorkerState) + fds     (the worker stops reading every fd before it sends)
    successor -> Request(TAKEN_OVER, pid)     (it serves them now)
    worker    exits without a word to QEMU or the guest

A worker that gets no TAKEN_OVER (the successor died, refused the state, or timed out) reads its fds
again and goes on as before; nothing was lost but the hints the guest sent meanwhile, and a hint not
applied only means a page is sent.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from fph.balloon.device_state import DeviceState
from fph.balloon.worker_protocol import Decoder, Message, Op, ProtocolError, Reply, Request, encode, from_wire
from fph.vhost_user.handover import ListenerState

HANDOVER_VERSION = 1
"""Bumped whenever a field of the state changes meaning: a worker refuses a successor asking for another."""

HANDOVER_TIMEOUT_S = 10.0
"""How long each side waits for the other's next step."""
MAX_HANDOVER_FDS = 200
"""Listener, connection, channel, 32 memory regions, the log, 3 fds for each of <= 32 rings: fewer than 200
(SCM_RIGHTS takes at most 253 in one message)."""


class HandOverError(Exception):
    """A successor could not take a worker's VM over (the worker serves on)."""


@dataclass(frozen=True)
class BalloonOptions:
    """How the device was created (the successor must create the same device)."""

    queue_size: int = 1024
    event_idx: bool = False
    reporting: bool = False


@dataclass(frozen=True)
class WorkerState:
    version: int
    pid: int
    name: str
    control_path: str
    control_fd: int
    control_inode: int
    options: BalloonOptions
    listener: ListenerState
    device: DeviceState


def send_message(sock: socket.socket, msg: Message, fds: Sequence[int] = ()) -> None:
    """One message, ``fds`` attached to its first byte."""
    data = encode(msg)
    if len(fds) > MAX_HANDOVER_FDS:
        raise ProtocolError(f"{len(fds)} fds to hand over, at most {MAX_HANDOVER_FDS}")
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


class MessageReader:
    """Requests and replies from a control connection, in order, with the fds that came along (``fds``: the
    owner closes them). Hint batches are skipped: a worker forwards hints to whoever is attached."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fds: list[int] = []
        self._decoder = Decoder()
        self._ready: deque[Request | Reply] = deque()

    def next(self, what: str, timeout: float = HANDOVER_TIMEOUT_S) -> Request | Reply:
        deadline = time.monotonic() + timeout
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {what} within {timeout:.0f} s")
            self.sock.settimeout(remaining)
            data, fds, flags, _ = socket.recv_fds(
                self.sock, 1 << 16, MAX_HANDOVER_FDS, socket.MSG_CMSG_CLOEXEC
            )
            self.fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("more fds than a hand-over has (control data truncated)")
            if not data:
                raise ConnectionError(f"the peer closed the connection before its {what}")
            self._ready.extend(m for m in self._decoder.feed(data) if isinstance(m, (Request, Reply)))
        return self._ready.popleft()


def request_hand_over(
    control_path: str, timeout: float = HANDOVER_TIMEOUT_S
) -> tuple[WorkerState, MessageReader]:
    """As the successor: ask the worker on ``control_path`` for its VM. A worker refuses while a daemon is
    still attached (it closes the connection) or while a front-end message is half read: asked again until
    ``timeout``. Returns the state and the reader whose ``fds`` came with it (the caller closes them)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        reader = MessageReader(sock)
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(control_path)
            send_message(sock, Request(1, Op.HAND_OVER, HANDOVER_VERSION))
            reply = reader.next("hand-over", max(0.1, deadline - time.monotonic()))
            if not isinstance(reply, Reply) or reply.seq != 1:
                raise ProtocolError(f"expected the reply to HAND_OVER, got {reply}")
            if reply.error:
                raise HandOverError(reply.error)
            return from_wire(WorkerState, reply.value), reader
        except (OSError, ProtocolError, HandOverError) as exc:
            close_fds(reader.fds)
            sock.close()
            if time.monotonic() >= deadline:
                raise HandOverError(f"the worker on {control_path} did not hand over: {exc}") from exc
            time.sleep(0.05)


def close_fds(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())
