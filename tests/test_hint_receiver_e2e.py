"""End to end over a real Unix socket: fph's balloon (ThreadedHintReceiver) against the fake front-end and
the Linux driver model. Fast: no QEMU, no guest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fph.hint_receiver import (
    CMD_ID_DONE,
    CMD_ID_STOP,
    F_FREE_PAGE_HINT,
    F_STATS_VQ,
    BalloonControl,
    HintState,
    QueueRole,
    RecordingSink,
    ThreadedHintReceiver,
)
from fph.vhost_user import message as m
from fph.vhost_user.errors import StateError
from fph.vhost_user.message import FrontendReq as R
from fph.waiting import poll_until
from tests.fake_frontend import (
    HINT_BLOCK,
    FakeFrontend,
    GuestRam,
    LinuxBalloonDriver,
    MiB,
    boot,
    boot_and_read_done,
    guest_hints,
)

pytestmark = pytest.mark.timeout(60)
RECEIVER_CLOSE_S = 0.5
"""How long the ``receiver`` fixture's close waits for the guests to read DONE (tests/conftest.py)."""


def serve_and_boot(
    receiver: ThreadedHintReceiver,
    socket: str,
    ram: GuestRam,
    sink: RecordingSink | None = None,
    *,
    read_done: bool = True,
) -> tuple[BalloonControl, FakeFrontend, LinuxBalloonDriver]:
    """fph serves ``socket``; QEMU starts the device and the driver probes it, then (``read_done``) reads
    the DONE that a fresh device announces."""
    ctl = receiver.add_vm(socket, sink)
    fe, drv = (boot_and_read_done if read_done else boot)(socket, ram)
    return ctl, fe, drv


def test_handshake_replies_and_roles(
    receiver: ThreadedHintReceiver, ram: GuestRam, balloon_socket: str
) -> None:
    ctl, fe, drv = serve_and_boot(receiver, balloon_socket, ram, read_done=False)
    assert fe.offered_features & F_FREE_PAGE_HINT and fe.offered_features & F_STATS_VQ
    assert fe.protocol_features & m.ProtocolFeature.CONFIG
    assert fe.num_queues >= 4
    assert drv.roles[QueueRole.FREE_PAGE] == 3
    # A fresh fph announces DONE once the device starts (a crashed instance may have left blocks held).
    assert fe.wait_config_change()
    assert fe.config_cmd_id() == CMD_ID_DONE
    assert ctl.status().state is HintState.DONE
    fe.close()


def test_hint_round_stop_second_round_done(
    receiver: ThreadedHintReceiver, ram: GuestRam, balloon_socket: str
) -> None:
    sink = RecordingSink()
    ctl, fe, drv = serve_and_boot(receiver, balloon_socket, ram, sink)

    cmd1 = ctl.request_hints()
    assert cmd1 >= 0x8000_0000
    guest_hints(fe, drv)
    st = ctl.status()
    assert st.state is HintState.STOP  # the guest's STOP ended the run
    assert st.blocks == len(ram.blocks) == len(drv.held)
    assert st.hinted_bytes == len(drv.held) * HINT_BLOCK
    assert sorted(sink.ranges(cmd1)) == sorted((b, HINT_BLOCK) for b in drv.held)
    assert fe.config_cmd_id() == CMD_ID_STOP

    # Round 2 after STOP: a new id; only blocks the guest freed since are hinted.
    drv.free.extend(drv.held[:3])
    del drv.held[:3]
    cmd2 = ctl.request_hints()
    assert cmd2 != cmd1
    guest_hints(fe, drv)
    assert len(sink.ranges(cmd2)) == 3
    # held = distinct blocks hinted since the last DONE: the 3 the guest took back without telling and
    # hinted again count once (an upper bound: the device cannot see a block taken back and kept)
    assert ctl.status().held_bytes == len(ram.blocks) * HINT_BLOCK

    ctl.done()
    assert fe.wait_config_change()
    drv.config_changed()
    assert drv.held == [] and len(drv.free) == len(ram.blocks)
    assert ctl.status().held_bytes == 0
    fe.close()


def hint_round(ctl: object, fe: FakeFrontend, drv: LinuxBalloonDriver) -> int:
    cmd = ctl.request_hints()  # type: ignore[attr-defined]
    guest_hints(fe, drv)
    return int(cmd)


def bad_input(fe: FakeFrontend, kind: str) -> None:
    if kind == "malformed_header":
        fe.sock.sendall(m.HEADER.pack(R.GET_FEATURES, 0x0, 0))
    elif kind == "wrong_payload_size":
        fe.sock.sendall(m.encode(R.SET_FEATURES, bytes(4)))
    elif kind == "unknown_request":
        fe.sock.sendall(m.encode(26, bytes(8)))
    elif kind == "too_many_fds":
        fds = [os.eventfd(0) for _ in range(9)]
        socket.send_fds(fe.sock, [m.encode(R.SET_VRING_CALL, m.encode_u64(0))], fds)
        for fd in fds:
            os.close(fd)
    elif kind == "oversized_payload":
        fe.sock.sendall(m.HEADER.pack(R.SET_CONFIG, 1, 1 << 20))
    elif kind == "reply_flag_on_request":
        fe.sock.sendall(m.encode(R.SET_OWNER, b"", m.REPLY_FLAGS))
    elif kind == "mem_table_without_fds":
        fe.sock.sendall(m.encode(R.SET_MEM_TABLE, m.encode_mem_table([m.MemoryRegionMsg(0, 1 << 20, 0, 0)])))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["malformed_header", "wrong_payload_size", "unknown_request", "too_many_fds", "oversized_payload",
     "reply_flag_on_request", "mem_table_without_fds"],
)  # fmt: skip
def test_bad_input_closes_only_that_connection(
    receiver: ThreadedHintReceiver, ram: GuestRam, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad_path, good_path = str(tmp_path / "bad.sock"), str(tmp_path / "good.sock")
    receiver.add_vm(bad_path)
    good = receiver.add_vm(good_path, RecordingSink())
    fe_good, drv = boot_and_read_done(good_path, ram)

    fe_bad = FakeFrontend(bad_path, GuestRam(8 * MiB))
    fe_bad.realize()
    bad_input(fe_bad, kind)
    assert fe_bad.is_closed(), "fph should close a connection that broke the protocol"
    assert "closing the vhost-user connection" in caplog.text

    # The other VM's device is untouched, and the bad socket accepts a fresh connection.
    hint_round(good, fe_good, drv)
    assert good.status().blocks == len(ram.blocks)
    again = FakeFrontend(bad_path, fe_bad.ram)
    again.realize()
    again.close()
    fe_bad.close()
    fe_bad.ram.close()
    fe_good.close()


def test_disconnect_mid_message(
    receiver: ThreadedHintReceiver, balloon_socket: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.add_vm(balloon_socket)
    ram = GuestRam(8 * MiB)
    fe = FakeFrontend(balloon_socket, ram)
    fe.realize()
    fe.sock.sendall(m.HEADER.pack(R.SET_FEATURES, 1, 8) + bytes(3))
    fe.sock.close()
    conn = poll_until(lambda: receiver.connection(balloon_socket), 2.0, 0.01, until=lambda c: c is None)
    assert conn is None
    assert "disconnected in the middle of a message (5 bytes missing)" in caplog.text
    fe2 = FakeFrontend(balloon_socket, ram)
    fe2.realize()
    fe2.close()
    ram.close()


def test_descriptor_loop_breaks_the_device_not_the_process(
    receiver: ThreadedHintReceiver, ram: GuestRam, balloon_socket: str
) -> None:
    ctl, fe, drv = serve_and_boot(receiver, balloon_socket, ram, read_done=False)
    assert fe.wait_config_change()
    cmd = ctl.request_hints()
    assert fe.wait_config_change()
    q = drv.queue(QueueRole.FREE_PAGE)
    block = ram.blocks[0]
    q.write_desc(0, block, 4096, 1 | 2, 1)
    q.write_desc(1, block, 4096, 1 | 2, 0)
    q.publish(0)
    fe.kick(drv.roles[QueueRole.FREE_PAGE])
    fe.wait_until(lambda: ctl.status().broken is not None, what="device broken")
    assert "loop" in str(ctl.status().broken)
    assert fe.wait_config_change()  # DONE: the guest gives back whatever it held
    assert fe.config_cmd_id() == CMD_ID_DONE
    assert os.eventfd_read(fe.errs[drv.roles[QueueRole.FREE_PAGE]]) >= 1
    assert not fe.is_closed(0.05)  # the connection stays: QEMU keeps a (broken) device
    assert cmd >= 0x8000_0000
    fe.close()


def test_replug_on_the_same_connection(
    receiver: ThreadedHintReceiver, ram: GuestRam, balloon_socket: str
) -> None:
    sink = RecordingSink()
    ctl, fe, drv = serve_and_boot(receiver, balloon_socket, ram, sink)
    for _ in range(3):  # advance the used index of the first instance's rings
        hint_round(ctl, fe, drv)
        ctl.done()
        assert fe.wait_config_change()
        drv.config_changed()
    bases = fe.stop()  # device_del: disable + GET_VRING_BASE
    assert bases[drv.roles[QueueRole.FREE_PAGE]] > 0
    assert fe.backend is not None
    fe.backend.close()  # ... then QEMU closes the back-end channel: no more config changes to send
    fe.backend = None
    fe.wait_until(lambda: not ctl.view().has_channel, what="fph to drop the closed back-end channel")
    with pytest.raises(StateError, match="channel"):
        ctl.request_hints()
    # device_add on the same chardev: the whole handshake again, new rings whose used index starts at 0.
    fe.realize()
    drv2 = LinuxBalloonDriver(fe)
    drv2.probe()
    assert fe.wait_config_change()
    drv2.config_changed()
    cmd = hint_round(ctl, fe, drv2)
    assert len(sink.ranges(cmd)) == len(ram.blocks)
    assert drv2.queue(QueueRole.FREE_PAGE).used_idx == drv2.queue(QueueRole.FREE_PAGE).avail_idx
    fe.close()


def test_restart_after_crash_sends_done(ram: GuestRam, balloon_socket: str) -> None:
    first = ThreadedHintReceiver()
    ctl, fe, drv = serve_and_boot(first, balloon_socket, ram)
    hint_round(ctl, fe, drv)
    assert drv.held
    first.run(first._receiver.server.close())  # "crash": no DONE
    first.loop.call_soon_threadsafe(first.loop.stop)
    assert fe.is_closed()
    fe.close()

    second = ThreadedHintReceiver()
    try:
        second.add_vm(balloon_socket)
        # QEMU reconnects (reconnect-ms) and restarts the running device
        fe2 = FakeFrontend(balloon_socket, ram)
        fe2.realize()
        fe2.queues = fe.queues
        fe2.bases = {i: q.avail_idx for i, q in fe.queues.items()}
        drv.fe = fe2
        fe2.start(drv.features)
        assert fe2.wait_config_change()
        assert fe2.config_cmd_id() == CMD_ID_DONE
        drv.config_changed()
        assert drv.held == [] and len(drv.free) == len(ram.blocks)
        fe2.close()
    finally:
        second.close(0.2)


def test_shutdown_sends_done_and_waits_for_the_guest(ram: GuestRam, balloon_socket: str) -> None:
    rx = ThreadedHintReceiver()
    ctl, fe, drv = serve_and_boot(rx, balloon_socket, ram)
    hint_round(ctl, fe, drv)
    closer = threading.Thread(target=rx.close, kwargs={"timeout": 3.0})
    closer.start()
    assert fe.wait_config_change()
    drv.config_changed()  # reads the config: DONE
    closer.join(5)
    assert not closer.is_alive()
    assert drv.held == []
    fe.close()


def test_entry_point(ram: GuestRam, balloon_socket: str) -> None:
    caps = subprocess.run(
        [sys.executable, "-m", "fph.hint_receiver", "--print-capabilities"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(caps.stdout)["type"] == "balloon"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fph.hint_receiver", "--socket", balloon_socket],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        fe, drv = boot(balloon_socket, ram)
        assert fe.wait_config_change(10)
        drv.config_changed()
        # The process has no control API over the wire; check its shutdown path: SIGTERM -> DONE -> exit 0.
        drv.held = [ram.blocks[0]]  # a block the guest holds; DONE must return it
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert fe.wait_config_change(5), "no DONE on SIGTERM"
        assert fe.config_cmd_id() == CMD_ID_DONE
        drv.config_changed()
        assert drv.held == []
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        fe.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "signal received" in (proc.stderr.read() if proc.stderr else "")


def test_unacked_config_changes_do_not_block(
    receiver: ThreadedHintReceiver, ram: GuestRam, balloon_socket: str
) -> None:
    """A front-end that never answers CONFIG_CHANGE_MSG: fph keeps serving (acks are read asynchronously)."""
    ctl, fe, _ = serve_and_boot(receiver, balloon_socket, ram, read_done=False)
    ids = [ctl.request_hints() for _ in range(50)]
    assert len(set(ids)) == 50
    assert fe.config_cmd_id() == ids[-1]  # GET_CONFIG is answered at once
    conn = receiver.connection(balloon_socket)
    assert conn is not None and conn.backend_channel is not None
    assert receiver.run(_outstanding(conn)) == 51  # the DONE announcement + 50 requests, none acked yet
    fe.close()


async def _outstanding(conn: object) -> int:
    return conn.backend_channel.outstanding  # type: ignore[attr-defined,no-any-return]


def test_control_from_another_event_loop(
    receiver: ThreadedHintReceiver, ram: GuestRam, balloon_socket: str
) -> None:
    """The _async calls: a coroutine on another loop drives the device without blocking its own loop."""
    ctl, fe, _drv = serve_and_boot(receiver, balloon_socket, ram)

    async def other_loop() -> tuple[int, HintState]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        cmd = await ctl.request_hints_async()
        state = (await ctl.status_async()).state
        t.cancel()
        assert ticks > 0  # this loop kept running while it waited
        return cmd, state

    cmd, state = asyncio.run(other_loop())
    assert state is HintState.REQUESTED and fe.wait_config_change() and fe.config_cmd_id() == cmd
    fe.close()
