"""One VM's balloon device in a process of its own: ``python -m fph.balloon.worker``.

Why a process per VM: QEMU 11.1 aborts when the balloon's vhost-user back-end it was connected to is gone
and the device is later unplugged or reconnected, so the process that holds the connection must outlive
the daemon (crash, restart, upgrade) and must not share a fate with other VMs (a guest-memory fault, a
blocking fd from a hostile peer). The worker holds the connection and nothing else: no numpy, no numba,
no gRPC. The daemon drives it over a control socket (:mod:`fph.balloon.worker_protocol`) and gets the
guest's hints streamed back; a daemon that died is replaced by the next one that connects.

Lifetime: until the daemon says EXIT (UnregisterVm) or SIGTERM (DONE first, then exit within 2 s). A worker
with neither a daemon nor a front-end (QEMU) connected for ``--orphan-grace`` seconds exits too: nobody can
use it, and a daemon that comes back starts a fresh one for a VM that is not running.
Exit status: 0, or 2 when it cannot serve its sockets (the reason is one line on stderr).

Upgrade: ``--take-over`` starts a successor that takes the running worker's sockets, fds and state over
(:mod:`fph.balloon.worker_handover`); QEMU's connection stays open throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fph.balloon.control import device_view
from fph.balloon.device import BalloonDevice
from fph.balloon.receiver import HintReceiver
from fph.balloon.worker_handover import (
    HANDOVER_VERSION,
    BalloonOptions,
    HandOverError,
    MessageReader,
    WorkerState,
    close_fds,
    request_hand_over,
    send_message,
)
from fph.balloon.worker_protocol import (
    PROTOCOL_VERSION,
    Decoder,
    Hints,
    Op,
    ProtocolError,
    Reply,
    Request,
    WorkerHello,
    encode,
    hints_message,
    to_wire,
)
from fph.vhost_user.errors import VhostUserError
from fph.vhost_user.handover import FdTable
from fph.vhost_user.server import remove_stale_socket, unlink_own_socket
from fph.virtio.memory import PAGE_SIZE

log = logging.getLogger("fph.balloon.worker")

SWITCH_INTERVAL_S = 0.0005
ORPHAN_GRACE_S = 5.0
RELEASE_TIMEOUT_S = 1.5
"""DONE, then at most this long for the guest to read it (SIGTERM must end the worker within 2 s)."""


class ForwardingSink:
    """The device's HintSink in a worker: each accepted batch goes to the attached daemon, in order. With
    no daemon attached a hint goes nowhere: nothing can apply it, and an unapplied hint only means a page
    is sent."""

    def __init__(self) -> None:
        self.session: ControlSession | None = None

    def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int:
        if self.session is not None:
            self.session.send(hints_message(epoch, ranges))
        return sum(n for _, n in ranges) // PAGE_SIZE


class ControlSession:
    """One daemon's connection to this worker."""

    def __init__(self, worker: Worker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.worker = worker
        self.reader = reader
        self.writer = writer
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, msg: Reply | Hints) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(msg))

    async def run(self) -> None:
        decoder = Decoder()
        try:
            while data := await self.reader.read(1 << 16):
                for msg in decoder.feed(data):
                    if not isinstance(msg, Request):
                        raise ProtocolError(f"a daemon sends requests, not {type(msg).__name__}")
                    self._dispatch(msg)
        except (ProtocolError, ConnectionError) as e:
            log.error("%s: control connection dropped: %s", self.worker.name, e)
        finally:
            self.writer.close()

    def _dispatch(self, req: Request) -> None:
        """Quick operations answer in this step (a REQUEST_HINTS reply precedes any hint of its id);
        the waiting ones run as tasks so the session keeps reading."""
        if req.op is Op.HAND_OVER:
            self.worker.hand_over(self, req)
            return
        if req.op in (Op.DONE_AND_WAIT, Op.RELEASE, Op.EXIT):
            task = asyncio.get_running_loop().create_task(self._answer_later(req))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        try:
            value = self.worker.execute(req)
        except Exception as e:  # the daemon gets the error; the worker and its VM go on
            self.send(Reply(req.seq, None, f"{type(e).__name__}: {e}"))
            return
        self.send(Reply(req.seq, to_wire(value)))

    async def _answer_later(self, req: Request) -> None:
        try:
            value = await self.worker.execute_waiting(req)
        except Exception as e:
            self.send(Reply(req.seq, None, f"{type(e).__name__}: {e}"))
            return
        self.send(Reply(req.seq, to_wire(value)))
        if req.op is Op.EXIT:
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
            self.worker.stop.set()


class Worker:
    def __init__(self, name: str, socket_path: str, control_path: str, options: BalloonOptions) -> None:
        self.name = name
        self.socket_path = socket_path
        self.control_path = control_path
        self.options = options
        self.receiver = HintReceiver()
        self.sink = ForwardingSink()
        self.stop = asyncio.Event()
        self.session: ControlSession | None = None
        self._control: asyncio.Server | None = None
        self._control_inode = 0

    @property
    def pid_path(self) -> str:
        """``<control>.pid``: the worker's PID, for operators and for cleanup by PID."""
        return self.control_path + ".pid"

    @property
    def device(self) -> BalloonDevice:
        return self.receiver.devices[self.socket_path]

    @property
    def _device_args(self) -> dict[str, Any]:
        o = self.options
        return {
            "name": self.name,
            "queue_size": o.queue_size,
            "event_idx": o.event_idx,
            "reporting": o.reporting,
        }

    async def serve(
        self, orphan_grace_s: float, predecessor: tuple[WorkerState, MessageReader] | None = None
    ) -> None:
        """Serve the VM until told to stop: from scratch, or taken over from ``predecessor``."""
        if predecessor is None:
            await self.receiver.add_vm(self.socket_path, self.sink, **self._device_args)
            server = await self._listen_control()
        else:
            server = await self._take_over(*predecessor)
        try:
            await self._until_stopped(orphan_grace_s)
        finally:
            server.close()
            unlink_own_socket(self.control_path, self._control_inode)
            with contextlib.suppress(FileNotFoundError):
                if Path(self.pid_path).read_text().strip() == str(os.getpid()):
                    os.unlink(self.pid_path)
            await self.receiver.close(timeout=RELEASE_TIMEOUT_S)

    async def _listen_control(self) -> asyncio.Server:
        remove_stale_socket(self.control_path)
        old = os.umask(0o077)  # the control socket is the daemon's only: 0600
        try:
            server = await asyncio.start_unix_server(self._session, path=self.control_path)
        finally:
            os.umask(old)
        self._control, self._control_inode = server, os.stat(self.control_path).st_ino
        _write_atomically(self.pid_path, f"{os.getpid()}\n")
        return server

    # ------------------------------------------------------------------ upgrade (fph.balloon.worker_handover)

    def hand_over(self, session: ControlSession, req: Request) -> None:
        """Give this VM to the successor on ``session``, then exit; or, if it does not take it, go on.

        Runs in one step of the event loop, blocking (bounded by HANDOVER_TIMEOUT_S): nothing else of this
        worker may run between its last read of an fd and its exit."""
        if req.arg != HANDOVER_VERSION:
            session.send(
                Reply(req.seq, None, f"hand-over version {req.arg} is not this worker's {HANDOVER_VERSION}")
            )
            return
        if self._control is None or session.writer.transport.get_write_buffer_size():
            session.send(Reply(req.seq, None, "busy: control output not yet sent"))
            return
        server = self.receiver.server
        server.pause(self.socket_path)
        t0 = time.monotonic()
        fds = FdTable()
        try:
            state = WorkerState(
                HANDOVER_VERSION, os.getpid(), self.name, self.control_path,
                fds.add(self._control.sockets[0].fileno()), self._control_inode, self.options,
                server.export_state(self.socket_path, fds), self.device.export_state(),
            )  # fmt: skip
        except (VhostUserError, ValueError) as exc:
            server.resume(self.socket_path)
            session.send(Reply(req.seq, None, f"busy: {exc}"))
            return
        sock = socket.socket(fileno=os.dup(session.writer.get_extra_info("socket").fileno()))
        reader = MessageReader(sock)
        try:
            send_message(sock, Reply(req.seq, to_wire(state)), fds.fds)
            ack = reader.next("TAKEN_OVER")
            if not (isinstance(ack, Request) and ack.op is Op.TAKEN_OVER):
                raise ProtocolError(f"expected TAKEN_OVER, got {ack}")
        except (OSError, ProtocolError) as exc:  # TimeoutError and ConnectionError are OSErrors
            server.resume(self.socket_path)
            log.error("%s: the successor did not take the VM over (%s); serving on", self.name, exc)
            session.writer.close()
            return
        finally:
            close_fds(reader.fds)
            sock.close()
        hinting = state.device.hinting
        log.info(
            "%s: handed over to pid %s in %.0f ms (hint state %s, %d blocks this run); exiting",
            self.name, ack.arg, (time.monotonic() - t0) * 1e3, hinting.state, hinting.run_blocks,
        )  # fmt: skip
        logging.shutdown()
        os._exit(0)  # no DONE, no unlink, no close: every fd and file is the successor's now

    async def _take_over(self, state: WorkerState, reader: MessageReader) -> asyncio.Server:
        """Serve what a predecessor handed over: set it up paused, tell the predecessor (it exits), then
        read the fds. Fails (exit status 2) before TAKEN_OVER leaves the predecessor serving."""
        if (state.name, state.listener.path, state.control_path) != (
            self.name,
            self.socket_path,
            self.control_path,
        ):
            raise VhostUserError(
                f"the worker on {self.control_path} serves {state.name} on {state.listener.path}, not "
                f"{self.name} on {self.socket_path}"
            )
        self.options = state.options
        fds = FdTable(reader.fds)
        try:
            self.receiver.take_over_vm(state.listener, state.device, fds, self.sink, **self._device_args)
            control = socket.socket(fileno=os.dup(fds.get(state.control_fd)))
            send_message(reader.sock, Request(2, Op.TAKEN_OVER, os.getpid()))
        except Exception as exc:  # the predecessor serves on once this process is gone
            raise HandOverError(f"cannot take {self.name} over from pid {state.pid}: {exc!r}") from exc
        finally:
            close_fds(reader.fds)
            reader.sock.close()
        self.receiver.resume_vm(self.socket_path)
        server = await asyncio.start_unix_server(self._session, sock=control)
        self._control, self._control_inode = server, state.control_inode
        _write_atomically(self.pid_path, f"{os.getpid()}\n")
        log.info("%s: took the VM over from pid %d", self.name, state.pid)
        return server

    async def _until_stopped(self, orphan_grace_s: float) -> None:
        alone_since: float | None = None
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)
            alone = self.session is None and not self.receiver.connected(self.socket_path)
            if not alone:
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since >= orphan_grace_s:
                log.info("%s: no daemon and no front-end for %.0f s: exiting", self.name, orphan_grace_s)
                return

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.session is not None:
            # One daemon at a time: a dead daemon's connection ends with it (the kernel closes it), and a
            # second live daemon cannot exist (the state directory's lock), so this is a stranger.
            log.warning("%s: a second control connection refused (a daemon is attached)", self.name)
            writer.close()
            return
        session = ControlSession(self, reader, writer)
        self.session = session
        self.sink.session = session
        log.info("%s: daemon attached", self.name)
        try:
            await session.run()
        finally:
            if self.session is session:
                self.session = None
                self.sink.session = None
                log.info("%s: daemon detached", self.name)

    def execute(self, req: Request) -> Any:
        d = self.device
        match req.op:
            case Op.HELLO:
                return WorkerHello(os.getpid(), self.name, self.socket_path, PROTOCOL_VERSION)
            case Op.REQUEST_HINTS:
                return d.request_hints()
            case Op.STOP_HINTS:
                return d.stop_hints()
            case Op.DONE:
                return d.done()
            case Op.STATUS:
                return d.status()
            case Op.TAKE_METRICS:
                return d.take_metrics()
            case Op.GUEST_STATS:
                return d.guest_stats()
            case Op.REQUEST_STATS:
                return d.request_stats()
            case Op.SET_TARGET:
                if not isinstance(req.arg, int) or req.arg < 0:
                    raise ValueError(f"set_target needs a page count, not {req.arg!r}")
                return d.set_target(req.arg)
            case Op.VIEW:
                return device_view(self.receiver, self.socket_path)
            case Op.USED_RING_RANGES:
                return self.receiver.used_ring_ranges(self.socket_path)
        raise ValueError(f"operation {req.op.value} is not answered at once")

    async def execute_waiting(self, req: Request) -> Any:
        timeout = float(req.arg) if req.arg is not None else RELEASE_TIMEOUT_S
        if not 0 <= timeout <= 60:
            raise ValueError(f"timeout {timeout} s out of range 0..60")
        match req.op:
            case Op.DONE_AND_WAIT:
                return not await self.receiver.done_and_wait([self.device], timeout)
            case Op.RELEASE | Op.EXIT:
                await self.receiver.release_all(timeout)
                return None
        raise ValueError(f"operation {req.op.value} is answered at once")


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def _run(args: argparse.Namespace, predecessor: tuple[WorkerState, MessageReader] | None) -> None:
    options = BalloonOptions(args.queue_size, args.event_idx, args.reporting)
    worker = Worker(args.name, args.socket, args.control, options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop.set)
    await worker.serve(args.orphan_grace, predecessor)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fph.balloon.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="the VM's name (logs)")
    parser.add_argument("--socket", required=True, help="the balloon's vhost-user socket (listened on)")
    parser.add_argument("--control", required=True, help="the daemon's control socket (listened on)")
    parser.add_argument("--orphan-grace", type=float, default=ORPHAN_GRACE_S, metavar="SECONDS")
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--event-idx", action="store_true")
    parser.add_argument("--reporting", action="store_true")
    parser.add_argument(
        "--take-over",
        action="store_true",
        help="take the VM over from the worker running on --control (an upgrade; QEMU stays connected)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s"
    )
    Path(args.control).parent.mkdir(parents=True, exist_ok=True)
    try:
        predecessor = request_hand_over(args.control) if args.take_over else None
        asyncio.run(_run(args, predecessor))
    except (VhostUserError, OSError, HandOverError, ProtocolError) as exc:
        print(f"fph balloon worker {args.name}: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
