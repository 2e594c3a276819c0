"""The daemon's side of balloon workers: :class:`WorkerBalloon` (a :class:`BalloonControl` over a worker's
control socket) and :class:`BalloonWorkers` (start, adopt and end one worker per VM).

Threads: each WorkerBalloon has one reader thread, the only owner of its socket's receive side. It resolves
replies and hands the worker's hint batches to the current sink in the order the worker sent them; a
``request_hints`` callback (``on_issue``) runs on that thread when the reply arrives, before any later hint
is applied, so the migration's bitmap epoch is open before the first hint of that id reaches it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fph.balloon.control import DeviceView
from fph.balloon.counters import HintMetrics
from fph.balloon.free_page_hint import HintStatus
from fph.balloon.sink import CountingSink, HintSink
from fph.balloon.stats import GuestStats
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
    from_wire,
)
from fph.virtio.errors import VirtioError

log = logging.getLogger("fph.balloon.worker")

T = TypeVar("T")
START_TIMEOUT_S = 20.0


class WorkerError(VirtioError):
    """A balloon worker could not be reached, started or asked."""


class WorkerLost(WorkerError):
    """The worker's control connection ended (the worker exited or was killed)."""


class WorkerStartError(WorkerError):
    """A worker could not be started (its reason is the message)."""


class WorkerBalloon:
    """Thread-safe handle on one VM's balloon, served by a worker process (BalloonControl's interface)."""

    def __init__(
        self,
        sock: socket.socket,
        sink: HintSink | None = None,
        proc: subprocess.Popen[bytes] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._sock = sock
        self._sink: HintSink = sink if sink is not None else CountingSink()
        self.proc = proc
        self._timeout = timeout
        self._send_lock = threading.Lock()
        self._seq = 0
        self._pending: dict[int, tuple[concurrent.futures.Future[Any], Callable[[Any], Any]]] = {}
        self.lost: str = ""
        """Why the worker is gone ("" while it answers)."""
        self._detached = False
        self._reader = threading.Thread(target=self._read, name="fph-balloon-worker", daemon=True)
        self._reader.start()
        hello = self._request(Op.HELLO, None, WorkerHello)
        if hello.protocol != PROTOCOL_VERSION:
            self.close()
            raise WorkerError(f"worker speaks protocol {hello.protocol}, this daemon {PROTOCOL_VERSION}")
        self.hello: WorkerHello = hello

    @property
    def socket_path(self) -> str:
        return self.hello.socket_path

    @property
    def sink(self) -> HintSink:
        """Where the worker's hints go (set_sink changes it)."""
        return self._sink

    @property
    def pid(self) -> int:
        return self.hello.pid

    # ------------------------------------------------------------------ transport

    def _read(self) -> None:
        decoder = Decoder()
        reason = "the worker closed its control connection"
        try:
            while data := self._sock.recv(1 << 16):
                for msg in decoder.feed(data):
                    if isinstance(msg, Reply):
                        self._resolve(msg)
                    elif isinstance(msg, Hints):
                        self._apply(msg)
                    else:
                        raise ProtocolError("a worker sends replies and hints, not requests")
        except (OSError, ProtocolError) as e:
            reason = f"control connection failed: {e}"
        if self.proc is not None and not self._detached:  # (detached: the worker serves on)
            with contextlib.suppress(subprocess.TimeoutExpired):
                reason += f" ({_exit_reason(self.proc.wait(1.0))})"  # reaped here: this daemon's child
        self._fail_all(reason)

    def _resolve(self, reply: Reply) -> None:
        entry = self._pending.pop(reply.seq, None)
        if entry is None:
            return
        future, convert = entry
        if reply.error:
            pid = self.hello.pid if hasattr(self, "hello") else "?"  # HELLO's own reply comes before it
            future.set_exception(WorkerError(f"balloon worker (pid {pid}): {reply.error}"))
            return
        try:
            future.set_result(convert(reply.value))
        except Exception as e:  # a callback (on_issue) or a value of the wrong shape
            if not future.done():
                future.set_exception(e)

    def _apply(self, hints: Hints) -> None:
        try:
            self._sink.apply_hints(hints.epoch, hints.ranges)
        except Exception as e:  # ValueError: ranges the bitmap refuses; the device counted them already
            log.warning("hints of epoch %d not applied: %s", hints.epoch, e)

    def _fail_all(self, reason: str) -> None:
        with self._send_lock:
            self.lost = reason
            pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(WorkerLost(f"balloon worker lost: {reason}"))

    def _submit(self, op: Op, arg: float | int | None, convert: Callable[[Any], Any]) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._send_lock:
            if self.lost:
                raise WorkerLost(f"balloon worker lost: {self.lost}")
            self._seq += 1
            self._pending[self._seq] = (future, convert)
            try:
                self._sock.sendall(encode(Request(self._seq, op, arg)))
            except OSError as e:
                self._pending.pop(self._seq, None)
                raise WorkerLost(f"balloon worker lost: {e}") from e
        return future

    def _call(
        self, op: Op, arg: float | int | None, convert: Callable[[Any], Any], extra_s: float = 0.0
    ) -> Any:
        """Ask the worker and wait (at most the timeout plus ``extra_s``); ``convert`` makes the reply's
        value (on the reader thread)."""
        try:
            return self._submit(op, arg, convert).result(self._timeout + extra_s)
        except concurrent.futures.TimeoutError:
            raise self._no_answer(op, extra_s) from None

    async def _call_async(
        self, op: Op, arg: float | int | None, convert: Callable[[Any], Any], extra_s: float = 0.0
    ) -> Any:
        future = self._submit(op, arg, convert)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._timeout + extra_s)
        except TimeoutError:
            raise self._no_answer(op, extra_s) from None

    def _no_answer(self, op: Op, extra_s: float) -> WorkerError:
        return WorkerError(f"balloon worker did not answer {op.value} within {self._timeout + extra_s} s")

    def _request(self, op: Op, arg: float | int | None, tp: Any, extra_s: float = 0.0) -> Any:
        return self._call(op, arg, lambda v: from_wire(tp, v), extra_s)

    async def _request_async(self, op: Op, arg: float | int | None, tp: Any, extra_s: float = 0.0) -> Any:
        return await self._call_async(op, arg, lambda v: from_wire(tp, v), extra_s)

    def close(self) -> None:
        """Detach: the worker keeps serving its VM (a later daemon adopts it)."""
        self._detached = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(5)

    # ------------------------------------------------------------------ hint runs

    def request_hints(self, on_issue: Callable[[int], None] | None = None) -> int:
        """Start a hint run. ``on_issue(id)`` runs on the reader thread as the reply arrives, before any
        hint the worker sent after it is applied."""
        return int(self._call(Op.REQUEST_HINTS, None, _issued(on_issue)))

    async def request_hints_async(self, on_issue: Callable[[int], None] | None = None) -> int:
        return int(await self._call_async(Op.REQUEST_HINTS, None, _issued(on_issue)))

    def stop_hints(self) -> None:
        self._request(Op.STOP_HINTS, None, type(None))

    async def stop_hints_async(self) -> None:
        await self._request_async(Op.STOP_HINTS, None, type(None))

    def done(self) -> None:
        self._request(Op.DONE, None, type(None))

    async def done_async(self) -> None:
        await self._request_async(Op.DONE, None, type(None))

    def done_and_wait(self, timeout: float = 2.0) -> bool:
        """DONE, then wait (bounded) until the guest read it; False if it did not within ``timeout``."""
        return bool(self._request(Op.DONE_AND_WAIT, timeout, bool, timeout))

    async def done_and_wait_async(self, timeout: float = 2.0) -> bool:
        return bool(await self._request_async(Op.DONE_AND_WAIT, timeout, bool, timeout))

    async def release_async(self, timeout: float = 2.0) -> None:
        """DONE if the guest can hear it (forced), then wait (bounded) until it read it."""
        await self._request_async(Op.RELEASE, timeout, type(None), timeout)

    def status(self) -> HintStatus:
        return self._request(Op.STATUS, None, HintStatus)

    async def status_async(self) -> HintStatus:
        return await self._request_async(Op.STATUS, None, HintStatus)

    def set_sink(self, sink: HintSink) -> None:
        """Where hints go from now on (a migration's bitmap, then back to the VM's counter)."""
        self._sink = sink

    async def set_sink_async(self, sink: HintSink) -> None:
        self._sink = sink

    def take_metrics(self) -> HintMetrics:
        return self._request(Op.TAKE_METRICS, None, HintMetrics)

    def config_unread(self) -> bool:
        return self.view().config_unread

    # ------------------------------------------------------------------ stats, target, what it negotiated

    def guest_stats(self) -> GuestStats:
        return self._request(Op.GUEST_STATS, None, GuestStats)

    async def guest_stats_async(self) -> GuestStats:
        return await self._request_async(Op.GUEST_STATS, None, GuestStats)

    def request_stats(self) -> bool:
        return bool(self._request(Op.REQUEST_STATS, None, bool))

    async def request_stats_async(self) -> bool:
        return bool(await self._request_async(Op.REQUEST_STATS, None, bool))

    def set_target(self, num_pages: int) -> None:
        self._request(Op.SET_TARGET, num_pages, type(None))

    async def set_target_async(self, num_pages: int) -> None:
        await self._request_async(Op.SET_TARGET, num_pages, type(None))

    def view(self) -> DeviceView:
        return self._request(Op.VIEW, None, DeviceView)

    async def view_async(self) -> DeviceView:
        return await self._request_async(Op.VIEW, None, DeviceView)

    def used_ring_ranges(self) -> list[tuple[int, int]]:
        """GPA ranges of the balloon's used rings (fph writes them; no guest store logs them)."""
        return self._request(Op.USED_RING_RANGES, None, list[tuple[int, int]])

    async def exit_async(self, timeout: float = 2.0) -> None:
        """DONE (bounded wait), then the worker closes the VM's connection and socket and exits."""
        with contextlib.suppress(WorkerLost):
            await self._request_async(Op.EXIT, timeout, type(None), timeout)


def _exit_reason(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    why = {
        "SIGBUS": ": a guest memory file shrank under it",
        "SIGKILL": ": killed (an operator, the OOM killer)",
    }.get(name, "")
    return f"killed by {name}{why}"


def _issued(on_issue: Callable[[int], None] | None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        cmd_id = from_wire(int, value)
        if on_issue is not None:
            on_issue(cmd_id)
        return int(cmd_id)

    return convert


class BalloonWorkers:
    """One worker process per VM balloon, with control sockets and logs in ``run_dir``."""

    def __init__(self, run_dir: Path, python: str = sys.executable) -> None:
        self.run_dir = run_dir
        self.python = python
        self.balloons: dict[str, WorkerBalloon] = {}

    def control_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.ctl"

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def start(
        self,
        name: str,
        socket_path: str,
        sink: HintSink | None = None,
        *,
        orphan_grace_s: float | None = None,
        reporting: bool = False,
    ) -> WorkerBalloon:
        """A new worker listening on ``socket_path`` (blocks until it answers, at most START_TIMEOUT_S)."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ctl = self.control_path(name)
        with open(self.log_path(name), "ab") as logf:
            proc = subprocess.Popen(
                [self.python, "-m", "fph.balloon.worker", "--name", name, "--socket", socket_path,
                 "--control", str(ctl),
                 *(["--orphan-grace", str(orphan_grace_s)] if orphan_grace_s is not None else []),
                 *(["--reporting"] if reporting else [])],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, close_fds=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                reason = self._last_line(name) or f"worker exited with status {proc.returncode}"
                raise WorkerStartError(reason)
            sock = _connect(ctl)
            if sock is not None:
                break
            if time.monotonic() > deadline:
                _end(proc)
                raise WorkerStartError(f"worker did not listen on {ctl} within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        try:
            balloon = WorkerBalloon(sock, sink, proc)
        except WorkerError:
            _end(proc)
            raise
        self.balloons[socket_path] = balloon
        log.info("balloon worker started", extra={"vm": name, "pid": proc.pid, "socket": socket_path})
        return balloon

    def adopt(self, name: str, socket_path: str, sink: HintSink | None = None) -> WorkerBalloon | None:
        """The worker a previous daemon started for this VM, if it still serves ``socket_path``."""
        sock = _connect(self.control_path(name))
        if sock is None:
            return None
        try:
            balloon = WorkerBalloon(sock, sink)
        except WorkerError as e:
            log.warning("worker of %s did not answer: %s", name, e)
            sock.close()
            return None
        if balloon.socket_path != socket_path:
            balloon.close()
            raise WorkerError(
                f"the worker at {self.control_path(name)} serves {balloon.socket_path}, not {socket_path}"
            )
        self.balloons[socket_path] = balloon
        log.info("balloon worker adopted", extra={"vm": name, "pid": balloon.pid, "socket": socket_path})
        return balloon

    def upgrade(self, name: str, socket_path: str) -> WorkerBalloon:
        """Replace a VM's worker by a new process running this daemon's code, without dropping QEMU's
        connection: the new worker takes the old one's fds and state over (fph.balloon.worker_handover)
        and the old one exits. If the new worker cannot, the old one serves on and is attached again;
        WorkerError says why."""
        old = self.balloons.get(socket_path)
        if old is None or old.lost:
            raise WorkerError(f"no live worker serves {socket_path}" + (f" ({old.lost})" if old else ""))
        sink, old_pid, old_proc = old.sink, old.pid, old.proc
        pid_path = Path(f"{self.control_path(name)}.pid")
        with open(self.log_path(name), "ab") as logf:
            proc = subprocess.Popen(
                [self.python, "-m", "fph.balloon.worker", "--name", name, "--socket", socket_path,
                 "--control", str(self.control_path(name)), "--take-over"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, close_fds=True,
            )  # fmt: skip
        # Detached while the new process starts: the worker takes one control connection at a time (the
        # successor's now), and the hints it forwards meanwhile go nowhere (a page is sent, nothing lost).
        old.close()
        del self.balloons[socket_path]
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and _read_pid(pid_path) != proc.pid and time.monotonic() < deadline:
            time.sleep(0.01)
        failure = ""
        if proc.poll() is not None:
            failure = self._last_line(name) or f"the new worker exited with status {proc.returncode}"
        elif _read_pid(pid_path) != proc.pid:
            _end(proc)
            failure = f"the new worker did not take over within {START_TIMEOUT_S:.0f} s"
        if failure:
            again = self.adopt(name, socket_path, sink)
            state = f"pid {old_pid} serves on" if again is not None else f"pid {old_pid} is gone too"
            raise WorkerError(f"upgrade of {name}'s worker failed: {failure}; {state}")
        sock = _connect(self.control_path(name))
        if sock is None:
            raise WorkerError(
                f"the new worker of {name} (pid {proc.pid}) does not answer on its control socket"
            )
        balloon = WorkerBalloon(sock, sink, proc)
        self.balloons[socket_path] = balloon
        if old_proc is not None:  # this daemon's child: reaped (it exits once the successor took over)
            with contextlib.suppress(subprocess.TimeoutExpired):
                old_proc.wait(5)
        log.info("balloon worker upgraded", extra={"vm": name, "pid": proc.pid, "previous_pid": old_pid})
        return balloon

    def _last_line(self, name: str) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path(name).read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else ""
        return ""

    async def remove_async(self, socket_path: str, timeout: float = 2.0) -> None:
        """End a VM's worker: DONE (bounded), its connection and socket closed, the process gone."""
        balloon = self.balloons.pop(socket_path, None)
        if balloon is None:
            return
        await balloon.exit_async(timeout)
        await asyncio.to_thread(_wait_gone, balloon, 5.0)
        balloon.close()

    def connected(self, socket_path: str) -> bool:
        balloon = self.balloons.get(socket_path)
        if balloon is None or balloon.lost:
            return False
        try:
            return balloon.view().connected
        except WorkerError:
            return False

    async def close_async(self, timeout: float = 2.0, *, stop: bool = False) -> None:
        """DONE to every guest that can hear it (bounded), then detach (the workers keep their VMs'
        connections for the next daemon), or with ``stop`` end them."""
        balloons = [b for b in self.balloons.values() if not b.lost]
        if stop:
            await asyncio.gather(*(self.remove_async(b.socket_path, timeout) for b in balloons))
            return
        await asyncio.gather(*(b.release_async(timeout) for b in balloons), return_exceptions=True)
        for b in self.balloons.values():
            b.close()
        self.balloons.clear()


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _wait_gone(balloon: WorkerBalloon, timeout: float) -> None:
    """Until the worker's process is gone; SIGKILL by its PID past ``timeout``."""
    if balloon.proc is not None:
        try:
            balloon.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _end(balloon.proc)
        return
    deadline = time.monotonic() + timeout
    while process_running(balloon.pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(balloon.pid, signal.SIGKILL)
            return
        time.sleep(0.02)


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def process_running(pid: int) -> bool:
    """Running (a zombie, e.g. a worker an earlier daemon in this process started, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
