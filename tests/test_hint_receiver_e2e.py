"""End to end over a real Unix socket: fph's balloon (ThreadedHintReceiver) against the fake front-end and
the Linux driver model. Fast: no QEMU, no guest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fph.hint_receiver import (
    CMD_ID_DONE,
    CMD_ID_STOP,
    F_FREE_PAGE_HINT,
    F_STATS_VQ,
    HintState,
    QueueRole,
    RecordingSink,
    ThreadedHintReceiver,
)
from fph.vhost_user import message as m
from tests.fake_frontend import HINT_BLOCK, FakeFrontend, GuestRam, LinuxBalloonDriver, MiB

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def receiver() -> Iterator[ThreadedHintReceiver]:
    r = ThreadedHintReceiver()
    yield r
    r.close(timeout=0.5)


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    r = GuestRam(64 * MiB, gpa=0x1_0000_0000)
    yield r
    r.close()


def boot(path: str, ram: GuestRam, **driver_args: object) -> tuple[FakeFrontend, LinuxBalloonDriver]:
    fe = FakeFrontend(path, ram)
    fe.realize()
    drv = LinuxBalloonDriver(fe, **driver_args)  # type: ignore[arg-type]
    drv.probe()
    return fe, drv


def test_handshake_replies_and_roles(receiver: ThreadedHintReceiver, ram: GuestRam, tmp_path: Path) -> None:
    ctl = receiver.add_vm(str(tmp_path / "vu.sock"))
    fe, drv = boot(str(tmp_path / "vu.sock"), ram)
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
    receiver: ThreadedHintReceiver, ram: GuestRam, tmp_path: Path
) -> None:
    sink = RecordingSink()
    path = str(tmp_path / "vu.sock")
    ctl = receiver.add_vm(path, sink)
    fe, drv = boot(path, ram)
    assert fe.wait_config_change()  # DONE announcement
    drv.config_changed()

    cmd1 = ctl.request_hints()
    assert cmd1 >= 0x8000_0000
    assert fe.wait_config_change()
    drv.config_changed()
    drv.drain()
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
    assert fe.wait_config_change()
    drv.config_changed()
    drv.drain()
    assert len(sink.ranges(cmd2)) == 3
    # held = hinted since the last DONE: an upper bound (the guest reused 3 blocks without telling).
    assert ctl.status().held_bytes == (len(ram.blocks) + 3) * HINT_BLOCK

    ctl.done()
    assert fe.wait_config_change()
    drv.config_changed()
    assert drv.held == [] and len(drv.free) == len(ram.blocks)
    assert ctl.status().held_bytes == 0
    fe.close()
