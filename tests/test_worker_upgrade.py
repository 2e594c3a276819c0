"""A balloon worker upgrade (``BalloonWorkers.upgrade``, fph.balloon.worker_handover) over real Unix sockets
against the fake front-end and the Linux driver model: the new process takes QEMU's connection, the rings
and the hint run over mid-run, the old one exits, the guest notices nothing; a successor that does not take
over leaves the old worker serving, with no fd lost or leaked. Real QEMU: test_daemon_restart_guest.py."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fph.balloon.free_page_hint import HintState
from fph.balloon.sink import RecordingSink
from fph.balloon.spec import CMD_ID_DONE, CMD_ID_STOP, QueueRole
from fph.balloon.worker_client import BalloonWorkers, WorkerError, process_running
from fph.balloon.worker_handover import HANDOVER_VERSION, MessageReader, WorkerState, close_fds, send_message
from fph.balloon.worker_protocol import Op, Reply, Request, from_wire
from fph.waiting import poll_until
from tests.fake_frontend import HINT_BLOCK, FakeFrontend, GuestRam, LinuxBalloonDriver, boot_and_read_done

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[BalloonWorkers]:
    w = BalloonWorkers(tmp_path / "workers")
    started: list[int] = []
    yield w
    for balloon in list(w.balloons.values()):
        started.append(balloon.pid)
        balloon.close()
    for pid in started:  # only the workers this test started (by PID)
        if process_running(pid):
            os.kill(pid, 9)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def hint_blocks(fe: FakeFrontend, drv: LinuxBalloonDriver, n: int) -> list[int]:
    """The driver hints ``n`` of its free blocks on the running command id; returns them."""
    q = drv.queue(QueueRole.FREE_PAGE)
    blocks = [drv.free.pop() for _ in range(n)]
    for block in blocks:
        q.reap()
        q.add_chain(in_=[(block, HINT_BLOCK)])
        drv.held.append(block)
    fe.kick(drv.roles[QueueRole.FREE_PAGE])
    drv.drain()
    return blocks


def start_run(fe: FakeFrontend, drv: LinuxBalloonDriver) -> int:
    """The driver reads the new command id and starts its run (the id, then blocks later)."""
    assert fe.wait_config_change()
    cmd = fe.config_cmd_id()
    q = drv.queue(QueueRole.FREE_PAGE)
    drv.cmd_id_active = cmd
    fe.ram.mem.write_u32(drv.cmd_buf, cmd)
    q.add_chain(out=[(drv.cmd_buf, 4)])
    fe.kick(drv.roles[QueueRole.FREE_PAGE])
    drv.drain()
    return cmd


def end_run(fe: FakeFrontend, drv: LinuxBalloonDriver) -> None:
    q = drv.queue(QueueRole.FREE_PAGE)
    q.reap()
    q.add_chain(out=[(drv.stop_buf, 4)])
    fe.kick(drv.roles[QueueRole.FREE_PAGE])
    drv.drain()


def test_an_upgrade_mid_hint_run_keeps_the_connection_the_rings_and_the_run(
    workers: BalloonWorkers, ram: GuestRam, balloon_socket: str
) -> None:
    sink = RecordingSink()
    ctl = workers.start("vm1", balloon_socket, sink)
    fe, drv = boot_and_read_done(balloon_socket, ram)
    cmd = ctl.request_hints()
    assert start_run(fe, drv) == cmd
    before = hint_blocks(fe, drv, 4)
    assert poll_until(lambda: ctl.status().blocks == 4, 5)
    old_pid, old_fds = ctl.pid, fd_count(ctl.pid)

    t0 = time.monotonic()
    new = workers.upgrade("vm1", balloon_socket)
    took = time.monotonic() - t0
    assert new.pid != old_pid and not process_running(old_pid), "the old worker must exit"
    assert int(Path(f"{workers.control_path('vm1')}.pid").read_text()) == new.pid
    st = new.status()
    assert st.state is HintState.START and st.host_cmd_id == cmd and st.blocks == 4, st  # the same run
    assert st.held_bytes == 4 * HINT_BLOCK
    assert new.view().connected and new.sink is sink and fd_count(new.pid) == old_fds

    after = hint_blocks(fe, drv, 3)  # the guest goes on with the same rings: the new worker pops them
    end_run(fe, drv)
    assert poll_until(lambda: new.status().state is HintState.STOP, 5)
    assert new.status().blocks == 7 and new.status().held_bytes == 7 * HINT_BLOCK
    assert poll_until(lambda: {g for g, _ in sink.ranges(cmd)} >= set(after), 5)
    assert fe.config_cmd_id() == CMD_ID_STOP  # config reads are answered by the new worker
    assert not fe.is_closed(0.2)
    assert new.done_and_wait(2.0) or True
    assert fe.wait_config_change(2.0) and fe.config_cmd_id() == CMD_ID_DONE  # channel handed over too
    drv.config_changed()
    assert set(before) <= set(drv.free) and not drv.held
    assert new.status().held_bytes == 0
    print(f"upgrade took {took * 1e3:.0f} ms; fds {old_fds} -> {fd_count(new.pid)}")

    again = workers.upgrade("vm1", balloon_socket)  # and again: a successor hands over like any worker
    assert again.pid != new.pid and again.view().connected
    cmd2 = again.request_hints()
    assert start_run(fe, drv) == cmd2 and cmd2 != cmd
    hint_blocks(fe, drv, 2)
    end_run(fe, drv)
    assert poll_until(lambda: len(sink.ranges(cmd2)) == 2, 5)
    fe.close()


def test_an_idle_worker_without_a_front_end_is_upgraded_and_serves_the_next_one(
    workers: BalloonWorkers, ram: GuestRam, balloon_socket: str
) -> None:
    first = workers.start("vm1", balloon_socket)
    new = workers.upgrade("vm1", balloon_socket)
    assert new.pid != first.pid and not new.view().connected
    fe, drv = boot_and_read_done(balloon_socket, ram)  # QEMU connects to the socket the new one inherited
    cmd = new.request_hints()
    start_run(fe, drv)
    hint_blocks(fe, drv, 2)
    end_run(fe, drv)
    assert poll_until(lambda: new.status().blocks == 2 and new.status().host_cmd_id == cmd, 5)
    fe.close()


def test_a_successor_that_does_not_take_over_leaves_the_worker_serving(
    workers: BalloonWorkers, tmp_path: Path, ram: GuestRam, balloon_socket: str
) -> None:
    ctl = workers.start("vm1", balloon_socket)
    fe, drv = boot_and_read_done(balloon_socket, ram)
    pid, fds_before = ctl.pid, fd_count(ctl.pid)
    ctl.close()  # the daemon lets go, as an upgrade does
    del workers.balloons[balloon_socket]
    time.sleep(0.2)
    with socket.socket(socket.AF_UNIX) as s:  # a successor that gets everything and then dies
        s.connect(str(workers.control_path("vm1")))
        send_message(s, Request(1, Op.HAND_OVER, HANDOVER_VERSION))
        reader = MessageReader(s)
        reply = reader.next("state")
        assert isinstance(reply, Reply) and not reply.error
        state = from_wire(WorkerState, reply.value)
        assert state.pid == pid and state.listener.connection is not None and len(reader.fds) >= 8
        close_fds(reader.fds)
    with socket.socket(socket.AF_UNIX) as s:  # one that asks for a version the worker does not speak
        s.connect(str(workers.control_path("vm1")))
        send_message(s, Request(1, Op.HAND_OVER, HANDOVER_VERSION + 1))
        reply = MessageReader(s).next("refusal")
        assert isinstance(reply, Reply) and "version" in reply.error
    again = BalloonWorkers(tmp_path / "workers").adopt("vm1", balloon_socket)
    assert again is not None and again.pid == pid and again.view().connected
    cmd = again.request_hints()
    start_run(fe, drv)
    hint_blocks(fe, drv, 2)
    end_run(fe, drv)
    assert poll_until(lambda: again.status().blocks == 2 and again.status().host_cmd_id == cmd, 5)
    assert fd_count(pid) == fds_before, "the worker lost or leaked fds over a failed hand-over"
    again.close()
    fe.close()


def test_an_upgrade_whose_new_worker_fails_reattaches_the_old_one(
    workers: BalloonWorkers, ram: GuestRam, balloon_socket: str
) -> None:
    ctl = workers.start("vm1", balloon_socket)
    fe, _ = boot_and_read_done(balloon_socket, ram)
    workers.python = "/bin/false"  # a new worker that cannot even start
    with pytest.raises(WorkerError, match=f"pid {ctl.pid} serves on"):
        workers.upgrade("vm1", balloon_socket)
    back = workers.balloons[balloon_socket]
    assert back.pid == ctl.pid and back.view().connected and not fe.is_closed(0.2)
    fe.close()
