"""fph's virtio-balloon device, served over vhost-user (QEMU >= 10.2 ``vhost-user-test-device-pci``).

QEMU forwards the balloon to this process::

    -object memory-backend-memfd,id=mem,size=1024M,share=on -machine pc,memory-backend=mem
    -chardev socket,id=vu,path=PATH
    -device vhost-user-test-device-pci,id=bal0,chardev=vu,virtio-id=5,num_vqs=4,config_size=16,vq_size=1024

and ``python -m fph.hint_receiver --socket PATH`` listens on PATH (fph listens, QEMU connects).

The device itself is the package fph.balloon, one concept per file: ``spec`` (feature bits, config, ids),
``free_page_hint`` (the hint state machine), ``stats``, ``inflate`` (inflate/deflate), ``reporting``,
``device`` (the vhost-user back-end that routes each queue), ``receiver`` (one server, a device per VM)
and ``control`` (reaching a device from another thread). This module is its public face and entry point.

What the device does:

* free page hinting (``VIRTIO_BALLOON_F_FREE_PAGE_HINT``): the host asks for a run with a fresh command id;
  each 4 MiB block the guest hints under that id is checked (inside RAM, page aligned) and handed to a
  :class:`HintSink` as ``(epoch = command id, [(gpa, length)])``. The state machine keeps QEMU's guards (START
  only from REQUESTED with the matching id, a STOP only honoured in START, in-buffers only in START, every
  buffer returned, an id >= 2 never reused before the guest's STOP) and, unlike QEMU, keeps exposing the
  current id while started so that an unrelated config interrupt does not end the run;
* stats (held buffer, latest values by name), inflate/deflate to a target (inflated pages are discarded from
  the shared RAM file), free page reporting (ranges discarded, then the buffer returned; never discarded when
  the guest poisons free pages with a non-zero value).

Never strand guest memory. Hinted blocks stay allocated inside the guest until the device says DONE (or the
guest's shrinker takes them back under memory pressure, or the device goes away). So fph sends DONE on
shutdown (SIGTERM, :meth:`HintReceiver.close`) and waits, bounded, until the guest has read it; and a freshly
started fph exposes DONE and announces it as soon as a front-end connects and starts the device, so a
restart returns what a crashed instance left held -- with a front-end that reconnects (tested with
tests/fake_frontend.py; QEMU 11.1.2 cannot, see below).

What QEMU 11.1.2 does when fph is gone (measured with the lab guest): the VM keeps running and the guest keeps
the blocks; memory pressure returns them (balloon shrinker), and ``echo 2 > /proc/sys/vm/drop_caches`` in the
guest returns them all at once -- that is the operator's remedy. While fph runs, ``device_del bal0`` returns
every held block too (the driver's remove path). Do NOT ``device_del`` after fph died: QEMU aborts
(``vhost_dev_set_config: Assertion `hdev->vhost_ops' failed``, the driver writes ``actual`` on removal).
Reconnecting is no way out either: the chardev option is ``reconnect-ms`` in 11.1 (``reconnect`` is rejected),
but on the command line it makes the device fail to realize ("Failed to set msg fds"), and added at runtime
QEMU aborts when the restarted back-end is reconnected (``vhost_dev_start`` assertion). A restarted fph is
attached to a VM at its next start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from fph.balloon.control import BalloonControl, DeviceView, ThreadedHintReceiver
from fph.balloon.counters import BalloonCounters, HintMetrics
from fph.balloon.device import BalloonDevice
from fph.balloon.free_page_hint import HINT_BATCH, HintState, HintStatus
from fph.balloon.receiver import HintReceiver
from fph.balloon.sink import CountingSink, HintSink, RecordingSink
from fph.balloon.spec import (
    CMD_ID_DONE,
    CMD_ID_MAX,
    CMD_ID_MIN,
    CMD_ID_STOP,
    CONFIG,
    CONFIG_SIZE,
    F_DEFLATE_ON_OOM,
    F_FREE_PAGE_HINT,
    F_MUST_TELL_HOST,
    F_PAGE_POISON,
    F_REPORTING,
    F_STATS_VQ,
    STAT_NAMES,
    QueueRole,
    queue_roles,
)
from fph.balloon.stats import GuestStats
from fph.vhost_user.errors import VhostUserError

log = logging.getLogger(__name__)

#: GIL switch interval for a process that serves devices. Python's 5 ms default lets another thread hold the
#: GIL that long while a hint (or a GET_CONFIG that stalls QEMU's main loop) waits. On the shared 2-core
#: host (load 3-5) rounds with a per-hint p99 over 1 ms: 2 of 18 at 0.5 ms vs 5 of 18 at 5 ms
#: (bench/results/hint_bench/switch_interval/; noisy, scheduler contention remains).
SWITCH_INTERVAL_S = 0.0005

__all__ = [
    "CMD_ID_DONE",
    "CMD_ID_MAX",
    "CMD_ID_MIN",
    "CMD_ID_STOP",
    "CONFIG",
    "CONFIG_SIZE",
    "F_DEFLATE_ON_OOM",
    "F_FREE_PAGE_HINT",
    "F_MUST_TELL_HOST",
    "F_PAGE_POISON",
    "F_REPORTING",
    "F_STATS_VQ",
    "HINT_BATCH",
    "STAT_NAMES",
    "SWITCH_INTERVAL_S",
    "BalloonControl",
    "BalloonCounters",
    "BalloonDevice",
    "CountingSink",
    "DeviceView",
    "GuestStats",
    "HintMetrics",
    "HintReceiver",
    "HintSink",
    "HintState",
    "HintStatus",
    "QueueRole",
    "RecordingSink",
    "ThreadedHintReceiver",
    "main",
    "queue_roles",
]


def capabilities() -> dict[str, Any]:
    return {
        "type": "balloon",
        "features": ["free-page-hint", "stats", "reporting", "page-poison", "deflate-on-oom"],
    }


async def _serve(sockets: list[str], device_args: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    receiver = HintReceiver()
    for path in sockets:
        await receiver.add_vm(path, None, **device_args)
    await stop.wait()
    log.info("signal received: sending DONE and exiting")
    await receiver.close(timeout=1.5)  # SIGTERM ends the process within 2 s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fph.hint_receiver", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--socket",
        "--socket-path",
        dest="sockets",
        action="append",
        default=[],
        metavar="PATH",
        help="Unix socket to listen on (repeat for more VMs)",
    )
    parser.add_argument("--print-capabilities", action="store_true", help="print JSON capabilities and exit")
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--event-idx", action="store_true", help="offer VIRTIO_RING_F_EVENT_IDX")
    parser.add_argument(
        "--reporting",
        action="store_true",
        help="offer free page reporting (a fifth queue: the QEMU device needs num_vqs=5)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(capabilities()))
        return 0
    if not args.sockets:
        parser.error("--socket PATH is required")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device_args = {
        "queue_size": args.queue_size,
        "event_idx": args.event_idx,
        "reporting": args.reporting,
    }
    try:
        asyncio.run(_serve(args.sockets, device_args))
    except VhostUserError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
