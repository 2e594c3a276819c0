"""The per-VM balloon worker (``python -m fph.balloon.worker``) over real Unix sockets, against the fake
front-end and the Linux driver model: hints reach the daemon's sink in order, the worker keeps the
front-end's connection when the daemon goes and serves the next one, SIGTERM ends it within 2 s with DONE,
a lost worker is reported, and a worker is small. Real QEMU: tests/test_daemon_restart_guest.py."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fph.balloon.free_page_hint import HintState, HintStatus
from fph.balloon.sink import RecordingSink
from fph.balloon.spec import CMD_ID_DONE
from fph.balloon.worker_client import BalloonWorkers, WorkerLost, WorkerStartError
from fph.balloon.worker_protocol import (
    MAX_FRAME,
    Decoder,
    Hints,
    Op,
    ProtocolError,
    Reply,
    Request,
    encode,
    from_wire,
    to_wire,
)
from fph.waiting import poll_until
from tests.fake_frontend import GuestRam, boot_and_read_done, guest_hints

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[BalloonWorkers]:
    w = BalloonWorkers(tmp_path / "workers")
    yield w
    for balloon in list(w.balloons.values()):
        if balloon.proc is not None and balloon.proc.poll() is None:
            balloon.proc.kill()
            balloon.proc.wait(5)
        balloon.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_messages_round_trip_and_bad_frames_are_errors() -> None:
    msgs = [Request(1, Op.SET_TARGET, 5), Reply(1, {"a": [1, 2]}, ""), Hints(7, [(1 << 32, 4 << 20)])]
    wire = b"".join(encode(m) for m in msgs)
    d = Decoder()
    out = []
    for i in range(len(wire)):  # byte by byte: frames split anywhere
        out += d.feed(wire[i : i + 1])
    assert out == msgs
    st = HintStatus(HintState.START, 5, None, 3, 12 << 20, 12 << 20, 0.5, 0, 0, 0, None)
    assert from_wire(HintStatus, to_wire(st)) == st
    assert from_wire(list[tuple[int, int]], [[1, 2]]) == [(1, 2)]
    with pytest.raises(ProtocolError, match="over the"):
        Decoder().feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="malformed"):
        Decoder().feed(len(b"{}").to_bytes(4, "big") + b"{}")
    with pytest.raises(ProtocolError):
        body = b'{"t":"req","seq":1,"op":"rm -rf"}'
        Decoder().feed(len(body).to_bytes(4, "big") + body)


def test_hints_reach_the_daemon_sink_after_the_epoch_opened(
    workers: BalloonWorkers, ram: GuestRam, balloon_socket: str
) -> None:
    sink = RecordingSink()
    ctl = workers.start("vm1", balloon_socket, sink)
    fe, drv = boot_and_read_done(balloon_socket, ram)
    opened: list[int] = []
    seen_before_open: list[int] = []

    def on_issue(cmd: int) -> None:
        seen_before_open.append(len(sink.ranges(cmd)))
        opened.append(cmd)

    cmd = ctl.request_hints(on_issue=on_issue)
    guest_hints(fe, drv)
    assert poll_until(lambda: ctl.status().state is HintState.STOP, 10)
    assert opened == [cmd] and seen_before_open == [0]
    st = ctl.status()
    assert st.blocks > 0 and poll_until(lambda: len(sink.ranges(cmd)) == st.blocks, 5)
    view = ctl.view()
    assert view.connected and view.hinting and not ctl.lost
    assert ctl.used_ring_ranges()
    assert ctl.done_and_wait(2.0) is False or True  # answered either way; the driver model reads on demand
    fe.close()


def test_a_daemon_that_goes_leaves_the_connection_to_the_next_one(
    workers: BalloonWorkers, tmp_path: Path, ram: GuestRam, balloon_socket: str
) -> None:
    first = workers.start("vm1", balloon_socket, RecordingSink())
    pid = first.pid
    fe, drv = boot_and_read_done(balloon_socket, ram)
    first.close()  # what a daemon's death looks like to the worker: its control connection ends
    del workers.balloons[balloon_socket]
    time.sleep(0.3)
    assert os.path.exists(f"/proc/{pid}") and first.proc is not None and first.proc.poll() is None
    successor = BalloonWorkers(tmp_path / "workers")
    sink = RecordingSink()
    ctl = successor.adopt("vm1", balloon_socket, sink)
    assert ctl is not None and ctl.pid == pid and ctl.view().connected  # QEMU's connection never dropped
    cmd = ctl.request_hints()
    guest_hints(fe, drv)
    assert poll_until(lambda: len(sink.ranges(cmd)) > 0, 10)
    assert successor.adopt("vm2", str(tmp_path / "other.sock")) is None  # nothing serves that one
    fe.close()
    ctl.close()
    first.proc.kill()
    first.proc.wait(5)


def test_sigterm_ends_the_worker_within_2_s_and_the_guest_reads_done(
    workers: BalloonWorkers, ram: GuestRam, balloon_socket: str
) -> None:
    ctl = workers.start("vm1", balloon_socket)
    fe, drv = boot_and_read_done(balloon_socket, ram)
    ctl.request_hints()
    guest_hints(fe, drv)
    assert poll_until(lambda: ctl.status().held_bytes > 0, 10)
    assert ctl.proc is not None
    t0 = time.monotonic()
    os.kill(ctl.pid, signal.SIGTERM)
    assert fe.wait_config_change(2.0) and fe.config_cmd_id() == CMD_ID_DONE
    drv.config_changed()
    ctl.proc.wait(2.5)
    assert time.monotonic() - t0 < 2.0
    assert poll_until(lambda: bool(ctl.lost), 2)
    assert not os.path.exists(balloon_socket) and not workers.control_path("vm1").exists()
    fe.close()


def test_a_killed_worker_is_reported_lost(workers: BalloonWorkers, balloon_socket: str) -> None:
    ctl = workers.start("vm1", balloon_socket)
    os.kill(ctl.pid, signal.SIGKILL)
    assert poll_until(lambda: bool(ctl.lost), 5)
    assert "killed by SIGKILL" in ctl.lost
    with pytest.raises(WorkerLost, match="balloon worker lost"):
        ctl.status()
    assert not workers.connected(balloon_socket)


def test_a_second_worker_on_a_live_socket_is_refused(
    workers: BalloonWorkers, tmp_path: Path, balloon_socket: str
) -> None:
    workers.start("vm1", balloon_socket)
    with pytest.raises(WorkerStartError, match="already listening"):
        BalloonWorkers(tmp_path / "other").start("vm1b", balloon_socket)


def test_garbage_on_the_control_socket_drops_that_connection_only(
    workers: BalloonWorkers, tmp_path: Path, ram: GuestRam, balloon_socket: str
) -> None:
    ctl = workers.start("vm1", balloon_socket)
    fe, _ = boot_and_read_done(balloon_socket, ram)
    with socket.socket(socket.AF_UNIX) as s:  # a stranger while the daemon is attached: refused
        s.connect(str(workers.control_path("vm1")))
        s.settimeout(5)
        assert s.recv(100) == b""
    assert ctl.view().connected and not ctl.lost
    ctl.close()  # the daemon goes; garbage from the next connection ends that connection only
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(workers.control_path("vm1")))
        s.sendall(b"\x00\x00\x00\x05hello")
        s.settimeout(5)
        assert s.recv(100) == b""
    again = BalloonWorkers(tmp_path / "workers").adopt("vm1", balloon_socket)
    assert again is not None and again.view().connected and again.pid == ctl.pid
    assert int(Path(str(workers.control_path("vm1")) + ".pid").read_text()) == ctl.pid
    again.close()
    fe.close()


def test_an_orphan_worker_exits_and_a_worker_is_small(
    workers: BalloonWorkers, ram: GuestRam, balloon_socket: str
) -> None:
    ctl = workers.start("vm1", balloon_socket, orphan_grace_s=1.0)
    fe, drv = boot_and_read_done(balloon_socket, ram)
    ctl.request_hints()
    guest_hints(fe, drv)
    assert ctl.proc is not None
    rss = rss_kib(ctl.pid)
    maps = Path(f"/proc/{ctl.pid}/maps").read_text()
    assert not any(lib in maps for lib in ("numba", "numpy", "llvmlite", "grpc"))
    assert rss < 40 * 1024, f"worker RSS {rss} KiB"
    time.sleep(2.0)
    assert ctl.proc.poll() is None  # a front-end is connected: not an orphan
    ctl.close()
    fe.close()
    assert poll_until(lambda: ctl.proc is not None and ctl.proc.poll() is not None, 5)
