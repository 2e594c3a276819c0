"""What both ends of the data plane share: the error, the run states, the counters, exact reads.

The data plane is TCP with blocking sockets and one thread per end: page payloads go from the source's RAM
mapping to the kernel with ``sendmsg`` and from the kernel into the destination's RAM mapping with
``recv_into``, never through a Python bytes object. Memory stays bounded by one frame (1 MiB) on each side.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable
from dataclasses import dataclass


class ChannelError(RuntimeError):
    """The data connection failed or the other end reported an error; the migration must abort."""


class ChannelState(enum.Enum):
    IDLE = "idle"
    CONNECTED = "connected"
    FINISHED = "finished"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass
class WireCounters:
    frames: int = 0
    bytes_on_wire: int = 0
    pages: int = 0
    zero_pages: int = 0
    fill_pages: int = 0


def recv_exact(sock: socket.socket, view: memoryview, on_bytes: Callable[[int], None] | None = None) -> None:
    """Fill ``view`` from ``sock``; ``on_bytes(n)`` after each read (a rate meter at the socket)."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ChannelError(f"peer closed the data connection after {got} of {len(view)} bytes")
        got += n
        if on_bytes is not None:
            on_bytes(n)
