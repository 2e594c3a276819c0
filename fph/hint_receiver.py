"""fph's virtio-balloon device, served over vhost-user (QEMU >= 10.2 ``vhost-user-test-device-pci``).

QEMU forwards the balloon to this process::

    -object memory-backend-memfd,id=mem,size=1024M,share=on -machine pc,memory-backend=mem
    -chardev socket,id=vu,path=PATH
    -device vhost-user-test-device-pci,id=bal0,chardev=vu,virtio-id=5,num_vqs=4,config_size=16,vq_size=1024

and ``python -m fph.hint_receiver --socket PATH`` listens on PATH (fph listens, QEMU connects).

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
import enum
import json
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fph.dirty_bitmap import DirtyBitmap
from fph.vhost_user import message as m
from fph.vhost_user.backend import BackendChannel
from fph.vhost_user.connection import VhostUserConnection
from fph.vhost_user.errors import GuestError, StateError, VhostUserError, VirtQueueError
from fph.vhost_user.server import VhostUserServer
from fph.vhost_user.vring import Vring
from fph.virtio.chain import DescriptorChain
from fph.virtio.memory import PAGE_SIZE, GuestMemory, memory_fence
from fph.virtio.queue import SplitQueue

log = logging.getLogger(__name__)
T = TypeVar("T")

# Balloon feature bits (virtio spec / include/uapi/linux/virtio_balloon.h).
F_MUST_TELL_HOST = 1 << 0
F_STATS_VQ = 1 << 1
F_DEFLATE_ON_OOM = 1 << 2
F_FREE_PAGE_HINT = 1 << 3
F_PAGE_POISON = 1 << 4
F_REPORTING = 1 << 5

CMD_ID_STOP = 0
CMD_ID_DONE = 1
CMD_ID_MIN = 0x8000_0000
CMD_ID_MAX = 0xFFFF_FFFF

CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val
CONFIG_SIZE = CONFIG.size
_WRITABLE_CONFIG = (range(4, 8), range(12, 16))  # actual, poison_val: the driver's fields
_STAT = struct.Struct("<HQ")
STAT_NAMES = (
    "swap_in", "swap_out", "major_faults", "minor_faults", "free_memory", "total_memory",
    "available_memory", "disk_caches", "hugetlb_allocations", "hugetlb_failures", "oom_kills",
    "alloc_stall", "async_scan", "direct_scan", "async_reclaim", "direct_reclaim",
)  # fmt: skip
BALLOON_PFN_SHIFT = 12
LATENCY_SAMPLES = 65536
#: Hints handed to the sink per call. A guest with init_on_alloc=0 queues ~100 blocks faster than Python
#: pops them; one sink call per whole pass made the first block of a pass wait ~2 ms (measured), per-block
#: calls cost a sink call each. 8 bounds the wait to a few pops.
HINT_BATCH = 8
#: GIL switch interval for a process that serves devices. Python's 5 ms default lets another thread hold the
#: GIL that long while a hint (or a GET_CONFIG that stalls QEMU's main loop) waits. On the shared 2-core
#: host (load 3-5) rounds with a per-hint p99 over 1 ms: 2 of 18 at 0.5 ms vs 5 of 18 at 5 ms
#: (bench/results/hint_bench/switch_interval/; noisy, scheduler contention remains).
SWITCH_INTERVAL_S = 0.0005


class HintSink(Protocol):
    """Where accepted hints go (fph.dirty_bitmap.DirtyBitmap implements it).

    ``ranges`` are (GPA start, length in bytes), page aligned and inside guest RAM; ``epoch`` is the
    command id they were hinted under. Returns the number of pages it acted on; raises ValueError on
    ranges it refuses.
    """

    def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int: ...


class HintState(enum.Enum):
    STOP = "stop"
    REQUESTED = "requested"
    START = "start"
    DONE = "done"


class QueueRole(enum.Enum):
    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    FREE_PAGE = "free_page"
    REPORTING = "reporting"


def queue_roles(features: int) -> dict[int, QueueRole]:
    """Queue index -> role, compacted over the queues that exist, as Linux ``init_vqs()`` numbers them
    from the *negotiated* features (a missing queue takes no index)."""
    roles = [QueueRole.INFLATE, QueueRole.DEFLATE]
    if features & F_STATS_VQ:
        roles.append(QueueRole.STATS)
    if features & F_FREE_PAGE_HINT:
        roles.append(QueueRole.FREE_PAGE)
    if features & F_REPORTING:
        roles.append(QueueRole.REPORTING)
    return dict(enumerate(roles))


@dataclass(frozen=True)
class HintStatus:
    """``blocks``/``hinted_bytes``: this run. ``held_bytes``: hinted since the last DONE, an upper bound of
    what the guest holds (its shrinker takes blocks back without telling the device)."""

    state: HintState
    host_cmd_id: int
    guest_cmd_id: int | None
    blocks: int
    hinted_bytes: int
    held_bytes: int
    run_seconds: float
    rejected: int
    dropped: int
    sink_errors: int
    broken: str | None


@dataclass(frozen=True)
class GuestStats:
    values: dict[str, int]
    updated: float | None  # time.monotonic() of the last stats buffer, None before the first one


@dataclass(frozen=True)
class HintMetrics:
    """``latency_ns``: per accepted hint, popped from the ring -> handed to the sink."""

    latency_ns: list[int]
    max_ring_backlog: int


@dataclass
class BalloonCounters:
    inflated_pages: int = 0
    deflated_pages: int = 0
    discarded_bytes: int = 0
    reported_bytes: int = 0
    reports_not_discarded: int = 0
    invalid_pfns: int = 0
    hint_latency_ns: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES), repr=False)
    max_ring_backlog: int = 0
    config_reads: int = 0


class RecordingSink:
    """A HintSink that keeps everything it is given (tests, benchmarks, and the default sink)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[tuple[int, int]]]] = []

    def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int:
        self.calls.append((epoch, list(ranges)))
        return sum(n for _, n in ranges) // PAGE_SIZE

    def ranges(self, epoch: int | None = None) -> list[tuple[int, int]]:
        return [r for e, rs in self.calls for r in rs if epoch is None or e == epoch]


class BitmapSink(RecordingSink):
    """Records every hint and applies it to a DirtyBitmap (tests, benchmarks). Epochs are opened by
    ``request_hints(on_issue=sink.open_epoch)`` on the device loop, before any hint of the new id can
    arrive: the engine's way."""

    def __init__(self, bitmap: DirtyBitmap) -> None:
        super().__init__()
        self.bitmap = bitmap

    def open_epoch(self, cmd_id: int) -> None:
        self.bitmap.close_epoch()  # a migration harvests the write log here; these runs have none
        self.bitmap.open_epoch(cmd_id)

    def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int:
        super().apply_hints(epoch, ranges)
        return self.bitmap.apply_hints(epoch, ranges)


class BalloonDevice:
    """The balloon behind one vhost-user connection (one per VM). Runs on the event loop thread; its control
    methods (``request_hints``, ``stop_hints``, ``done``, ``status``, ``guest_stats``, ``set_target``) must be
    called there too (``BalloonControl`` offers thread-safe wrappers).

    Queue count: QEMU's generic device creates ``num_vqs`` rings and cannot tell the back-end how many, while
    the guest sizes its queue list from the features it acks. Without REPORTING the driver wants 4 rings
    (``num_vqs=4``); with ``reporting=True`` it wants 5 and a ``num_vqs=4`` device fails the probe with
    EINVAL (measured), so reporting is off by default, like QEMU's ``free-page-reporting``.
    """

    def __init__(
        self,
        sink: HintSink | None = None,
        *,
        name: str = "balloon",
        queue_size: int = 1024,
        event_idx: bool = False,
        reporting: bool = False,
        page_poison: bool = True,
        deflate_on_oom: bool = True,
        log_all: bool = True,
    ) -> None:
        self.name = name
        self.sink: HintSink = sink if sink is not None else RecordingSink()
        self.max_queue_size = queue_size
        self._offered = m.F_VERSION_1 | F_STATS_VQ | F_FREE_PAGE_HINT | m.F_INDIRECT_DESC
        if event_idx:
            self._offered |= m.F_EVENT_IDX
        if reporting:
            self._offered |= F_REPORTING
        if page_poison:
            self._offered |= F_PAGE_POISON
        if deflate_on_oom:
            self._offered |= F_DEFLATE_ON_OOM
        if log_all:
            self._offered |= m.F_LOG_ALL
        self._protocol = (
            m.ProtocolFeature.MQ
            | m.ProtocolFeature.REPLY_ACK
            | m.ProtocolFeature.BACKEND_REQ
            | m.ProtocolFeature.CONFIG
            | (m.ProtocolFeature.LOG_SHMFD if log_all else 0)
        )
        self.num_queues = len(queue_roles(self._offered))
        self.counters = BalloonCounters()
        self.channel: BackendChannel | None = None
        self.mem: GuestMemory | None = None
        self._last_id = CMD_ID_MIN - 1
        self._reset_state()
        self._announce_done = True  # a fresh process may follow a crashed one that left blocks held

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self.acked = 0
        self.roles: dict[int, QueueRole] = {}
        self.state = HintState.DONE
        self.host_cmd_id = CMD_ID_DONE
        self.guest_cmd_id: int | None = None
        self._guest_active_id: int | None = None  # started by the guest, its STOP not yet seen
        self.run_blocks = 0
        self.run_bytes = 0
        self.held_bytes = 0
        self.rejected = 0
        self.dropped = 0
        self.sink_errors = 0
        self._run_start: float | None = None
        self._run_end: float | None = None
        self.num_pages = 0
        self.actual = 0
        self.poison_val = 0
        self._stats_head: tuple[Vring, int] | None = None
        self.stats: dict[str, int] = {}
        self.stats_updated: float | None = None
        self.broken: str | None = None
        self._config_unread = False

    # ------------------------------------------------------------------ VhostUserBackend

    def features(self) -> int:
        return self._offered

    def protocol_features(self) -> int:
        return int(self._protocol)

    def set_features(self, features: int) -> None:
        self.acked = features
        self.roles = queue_roles(features)
        log.info(
            "%s: driver acked features %#x, queues %s",
            self.name,
            features,
            {i: r.value for i, r in self.roles.items()},
        )

    def get_config(self, offset: int, size: int) -> bytes:
        config = self.config_bytes()
        if offset + size > len(config):
            raise ValueError(f"config read {offset}+{size} beyond {len(config)} bytes")
        if offset <= 8 < offset + size:
            self._config_unread = False
        self.counters.config_reads += 1
        return config[offset : offset + size]

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        if offset + len(data) > CONFIG_SIZE:
            raise ValueError(f"config write {offset}+{len(data)} beyond {CONFIG_SIZE} bytes")
        new = bytearray(self.config_bytes())
        for i, byte in enumerate(data, offset):
            # The generic front-end writes the whole config, read-only fields as the guest last saw them.
            if flags == 1 or any(i in r for r in _WRITABLE_CONFIG):
                new[i] = byte
        num_pages, self.actual, _cmd_id, self.poison_val = CONFIG.unpack(new)
        if flags == 1:  # migration restores the host's fields too
            self.num_pages = num_pages

    def set_memory(self, mem: GuestMemory | None) -> None:
        self.mem = mem

    def set_backend_channel(self, channel: BackendChannel | None) -> None:
        self.channel = channel

    def queue_stopped(self, vring: Vring) -> None:
        if self._stats_head is not None and self._stats_head[0] is vring:
            self._stats_head = None  # the ring's state goes back to the front-end via GET_VRING_BASE

    def reset(self) -> None:
        """Re-plug or reconnect: the old driver instance gave back everything it held on removal."""
        last = self._last_id
        self._reset_state()
        self._last_id = last
        self._announce_done = True

    def process_queue(self, vring: Vring) -> None:
        if self.broken is not None or self.mem is None:
            return
        role = self.roles.get(vring.index)
        mem, q = self.mem, vring.queue
        try:
            if role is QueueRole.FREE_PAGE:
                self._maybe_announce_done()
            # Drain, ask for the next kick, then look again: an entry added between the last look and the
            # avail_event write would otherwise wait for a kick that EVENT_IDX suppressed.
            used_before = q.next_used
            while pending := q.pending(mem):
                self.counters.max_ring_backlog = max(self.counters.max_ring_backlog, pending)
                if role is QueueRole.FREE_PAGE:
                    self._process_free_page(vring, mem)
                elif role is QueueRole.STATS:
                    self._process_stats(vring, mem)
                elif role in (QueueRole.INFLATE, QueueRole.DEFLATE):
                    self._process_balloon(vring, mem, role is QueueRole.INFLATE)
                elif role is QueueRole.REPORTING:
                    self._process_reporting(vring, mem)
                else:
                    raise VirtQueueError(
                        f"kick on queue {vring.index}, which has no role for features {self.acked:#x}"
                    )
                q.enable_notification(mem)
                memory_fence()  # the avail_event store must be visible before avail.idx is read again
            if q.next_used != used_before:
                vring.signal_used(mem)
        except GuestError as exc:
            self._break(vring, exc)

    # ------------------------------------------------------------------ queues

    def _process_free_page(self, vring: Vring, mem: GuestMemory) -> None:
        q = vring.queue
        batch: list[tuple[int, int]] = []
        popped: list[int] = []
        try:
            self._pop_free_page(q, mem, batch, popped)
        finally:  # hints accepted before a broken chain still reach the sink
            self._flush_hints(batch, popped)

    def _pop_free_page(
        self, q: SplitQueue, mem: GuestMemory, batch: list[tuple[int, int]], popped: list[int]
    ) -> None:
        while (chain := q.pop(mem)) is not None:
            t_pop = time.perf_counter_ns()
            if chain.readable:
                self._flush_hints(batch, popped)
                self._guest_cmd(chain, mem)
            if chain.writable:
                if self.state is HintState.START:
                    for gpa, length in chain.writable:
                        if gpa % PAGE_SIZE or length % PAGE_SIZE:
                            self.rejected += 1
                            log.error(
                                "%s: hint gpa=%#x len=%#x is not page aligned; ignored",
                                self.name,
                                gpa,
                                length,
                            )
                            continue
                        batch.append((gpa, length))
                        popped.append(t_pop)
                        if len(batch) >= HINT_BATCH:
                            self._flush_hints(batch, popped)
                else:
                    self.dropped += 1
            q.add_used(mem, chain.head, 0)

    def _guest_cmd(self, chain: DescriptorChain, mem: GuestMemory) -> None:
        if chain.readable_len != 4:
            raise VirtQueueError(f"free page vq: command id buffer of {chain.readable_len} bytes, expected 4")
        (cmd_id,) = struct.unpack("<I", chain.read_out(mem, 4))
        self.guest_cmd_id = cmd_id
        if self.state is HintState.REQUESTED and cmd_id == self.host_cmd_id:
            self.state = HintState.START
            self._guest_active_id = cmd_id
            log.info("%s: hint run %#x started by the guest", self.name, cmd_id)
        elif self.state is HintState.START:
            # Any other out-buffer in START ends the run (QEMU): normally the guest's STOP.
            self.state = HintState.STOP
            self._run_end = time.monotonic()
            log.info(
                "%s: hint run %#x stopped by the guest (%d blocks, %d bytes)",
                self.name,
                self.host_cmd_id,
                self.run_blocks,
                self.run_bytes,
            )
        else:
            log.info(
                "%s: stale command id %#x from the guest ignored in state %s",
                self.name,
                cmd_id,
                self.state.value,
            )
        if cmd_id == CMD_ID_STOP:
            self._guest_active_id = None

    def _flush_hints(self, batch: list[tuple[int, int]], popped: list[int]) -> None:
        if not batch:
            return
        ranges = list(batch)
        batch.clear()
        try:
            self.sink.apply_hints(self.host_cmd_id, ranges)
        except ValueError as exc:  # fph.dirty_bitmap.BitmapError and friends
            self.sink_errors += 1
            log.error(
                "%s: sink refused %d hint ranges of epoch %#x: %s",
                self.name,
                len(ranges),
                self.host_cmd_id,
                exc,
            )
            popped.clear()
            return
        now = time.perf_counter_ns()
        self.counters.hint_latency_ns.extend(now - t for t in popped)
        popped.clear()
        hinted = sum(n for _, n in ranges)
        self.run_blocks += len(ranges)
        self.run_bytes += hinted
        self.held_bytes += hinted

    def _process_stats(self, vring: Vring, mem: GuestMemory) -> None:
        while (chain := vring.queue.pop(mem)) is not None:
            data = chain.read_out(mem, _STAT.size * 64)
            if len(data) % _STAT.size:
                raise VirtQueueError(f"stats buffer of {len(data)} bytes is not a whole number of entries")
            for off in range(0, len(data), _STAT.size):
                tag, value = _STAT.unpack_from(data, off)
                self.stats[STAT_NAMES[tag] if tag < len(STAT_NAMES) else f"tag_{tag}"] = value
            self.stats_updated = time.monotonic()
            if self._stats_head is not None:  # a driver posts one buffer; if it posts more, keep the newest
                vring.queue.add_used(mem, self._stats_head[1], 0)
            # Hold the buffer: returning it makes the driver refresh at once (busy loop).
            self._stats_head = (vring, chain.head)

    def _process_balloon(self, vring: Vring, mem: GuestMemory, inflate: bool) -> None:
        while (chain := vring.queue.pop(mem)) is not None:
            data = chain.read_out(mem, 4 * 256 * 64)
            if len(data) % 4:
                raise VirtQueueError(f"balloon pfn buffer of {len(data)} bytes is not a whole number of pfns")
            pfns = struct.unpack(f"<{len(data) // 4}I", data)
            valid = [p for p in pfns if mem.contains(p << BALLOON_PFN_SHIFT, PAGE_SIZE)]
            if len(valid) != len(pfns):
                self.counters.invalid_pfns += len(pfns) - len(valid)
                log.error(
                    "%s: %d balloon pfns outside guest memory ignored", self.name, len(pfns) - len(valid)
                )
            if inflate:
                for gpa, length in _runs(sorted(valid)):
                    mem.discard(gpa, length)
                    self.counters.discarded_bytes += length
                self.counters.inflated_pages += len(valid)
            else:
                self.counters.deflated_pages += len(valid)
            vring.queue.add_used(mem, chain.head, 0)

    def _process_reporting(self, vring: Vring, mem: GuestMemory) -> None:
        poisoned = bool(self.acked & F_PAGE_POISON) and self.poison_val != 0
        while (chain := vring.queue.pop(mem)) is not None:
            for gpa, length in chain.writable:
                if poisoned:
                    # The guest expects the poison value back; a discarded page would read as zeros (QEMU).
                    self.counters.reports_not_discarded += 1
                elif gpa % PAGE_SIZE or length % PAGE_SIZE:
                    self.counters.reports_not_discarded += 1
                    log.error(
                        "%s: reported range gpa=%#x len=%#x not page aligned; kept", self.name, gpa, length
                    )
                else:
                    mem.discard(gpa, length)
                    self.counters.discarded_bytes += length
                    self.counters.reported_bytes += length
            vring.queue.add_used(mem, chain.head, 0)  # only after the discard: the guest waits for this

    def _break(self, vring: Vring, exc: Exception) -> None:
        """A guest error: stop touching rings (like QEMU's virtio_error) and give hinted memory back."""
        self.broken = f"queue {vring.index}: {exc}"
        log.error("%s: device broken, no further ring processing: %s", self.name, self.broken)
        vring.signal_error()
        if self.acked & F_FREE_PAGE_HINT and self.state is not HintState.DONE:
            self.state, self.host_cmd_id = HintState.DONE, CMD_ID_DONE
            self._notify_config()

    # ------------------------------------------------------------------ config

    def config_bytes(self) -> bytes:
        if self.state in (HintState.REQUESTED, HintState.START):
            cmd_id = self.host_cmd_id
        elif self.state is HintState.DONE:
            cmd_id = CMD_ID_DONE
        else:
            cmd_id = CMD_ID_STOP
        return CONFIG.pack(self.num_pages, self.actual, cmd_id, self.poison_val)

    def _notify_config(self) -> bool:
        """Raise a config interrupt; False when there is no back-end channel to raise it on."""
        if self.channel is None:
            log.warning("%s: config changed but there is no back-end channel to tell the guest", self.name)
            return False
        self._config_unread = True
        self.channel.config_changed()
        return True

    def _maybe_announce_done(self) -> None:
        if self._announce_done and self.channel is not None and self.state is HintState.DONE:
            self._announce_done = False
            log.info(
                "%s: announcing DONE so that blocks held for an earlier instance are returned", self.name
            )
            if self._notify_config():
                self.held_bytes = 0

    @property
    def config_unread(self) -> bool:
        """A config change was announced and the guest has not read the command id since."""
        return self._config_unread and self.channel is not None

    # ------------------------------------------------------------------ control API

    def _require_hinting(self) -> None:
        if self.broken is not None:
            raise StateError(f"{self.name}: device is broken ({self.broken})")
        if not self.acked & F_FREE_PAGE_HINT:
            raise StateError(f"{self.name}: the driver has not negotiated FREE_PAGE_HINT")
        if self.channel is None:
            raise StateError(f"{self.name}: no back-end channel, cannot raise a config interrupt")

    def _next_id(self) -> int:
        candidate = self._last_id
        while True:
            candidate = CMD_ID_MIN if candidate >= CMD_ID_MAX else candidate + 1
            if candidate != self._guest_active_id:  # never reuse an id before the guest's STOP for it
                return candidate

    def request_hints(self) -> int:
        """Start a hint run; returns its command id (the epoch the sink will see)."""
        self._require_hinting()
        self.host_cmd_id = self._last_id = self._next_id()
        self.state = HintState.REQUESTED
        self.run_blocks = self.run_bytes = 0
        self._run_start, self._run_end = time.monotonic(), None
        self._notify_config()
        return self.host_cmd_id

    def stop_hints(self) -> None:
        """Stop accepting hints of the current id (before a bitmap sync); the guest keeps the blocks."""
        if self.state is HintState.STOP:
            return
        if self.state in (HintState.REQUESTED, HintState.START) and self._run_end is None:
            self._run_end = time.monotonic()
        self.state = HintState.STOP
        self._notify_config()

    def done(self, *, force: bool = False) -> None:
        """Tell the guest to take back every hinted block (``force``: announce again even if DONE)."""
        if self.state is HintState.DONE and not force:
            return
        if self.state in (HintState.REQUESTED, HintState.START) and self._run_end is None:
            self._run_end = time.monotonic()
        self.state = HintState.DONE
        if self._notify_config():
            self.held_bytes = 0  # only once the guest is told; the driver reads the id on the interrupt
        # Without a channel the guest cannot hear DONE: status keeps showing what it may still hold, and a
        # later device start announces DONE again (a new driver instance or a reconnect).
        else:
            self._announce_done = True

    def status(self) -> HintStatus:
        run = 0.0
        if self._run_start is not None:
            run = (self._run_end if self._run_end is not None else time.monotonic()) - self._run_start
        return HintStatus(
            state=self.state,
            host_cmd_id=self.host_cmd_id
            if self.state in (HintState.REQUESTED, HintState.START, HintState.STOP)
            else CMD_ID_DONE,
            guest_cmd_id=self.guest_cmd_id,
            blocks=self.run_blocks,
            hinted_bytes=self.run_bytes,
            held_bytes=self.held_bytes,
            run_seconds=run,
            rejected=self.rejected,
            dropped=self.dropped,
            sink_errors=self.sink_errors,
            broken=self.broken,
        )

    def guest_stats(self) -> GuestStats:
        return GuestStats(dict(self.stats), self.stats_updated)

    def take_metrics(self) -> HintMetrics:
        """Per-hint latencies and the deepest ring backlog since the last call (then reset)."""
        c = self.counters
        metrics = HintMetrics(list(c.hint_latency_ns), c.max_ring_backlog)
        c.hint_latency_ns.clear()
        c.max_ring_backlog = 0
        return metrics

    def request_stats(self) -> bool:
        """Return the held stats buffer so the guest refills it; False if none is held."""
        if self._stats_head is None or self.mem is None or self.broken is not None:
            return False
        vring, head = self._stats_head
        self._stats_head = None
        vring.queue.add_used(self.mem, head, 0)
        vring.signal_used(self.mem)
        return True

    def set_target(self, num_pages: int) -> None:
        """Balloon target in 4 KiB pages; the driver inflates or deflates towards it."""
        if not 0 <= num_pages <= 0xFFFF_FFFF:
            raise StateError(f"target {num_pages} pages out of range")
        if self.channel is None:
            raise StateError(f"{self.name}: no back-end channel, cannot tell the guest its new target")
        self.num_pages = num_pages
        self._notify_config()


def _runs(pfns: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted PFNs -> (gpa, length) runs of adjacent pages."""
    runs: list[tuple[int, int]] = []
    for pfn in pfns:
        gpa = pfn << BALLOON_PFN_SHIFT
        if runs and runs[-1][0] + runs[-1][1] == gpa:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
        elif not runs or runs[-1][0] + runs[-1][1] < gpa:
            runs.append((gpa, PAGE_SIZE))
    return runs


class HintReceiver:
    """Serves one balloon device per VM socket on the running asyncio loop."""

    def __init__(self) -> None:
        self.server = VhostUserServer()
        self.devices: dict[str, BalloonDevice] = {}

    async def add_vm(
        self, socket_path: str, sink: HintSink | None = None, **device_args: Any
    ) -> BalloonDevice:
        device = BalloonDevice(
            sink, name=device_args.pop("name", os.path.basename(socket_path)), **device_args
        )
        await self.server.add_device(socket_path, device, device.name)
        self.devices[socket_path] = device
        return device

    def connection(self, socket_path: str) -> VhostUserConnection | None:
        listener = self.server.listeners.get(socket_path)
        return listener.connection if listener is not None else None

    async def release_all(self, timeout: float = 2.0) -> None:
        """DONE to every guest that can hear it, then wait (bounded) until each has read its config."""
        waiting = []
        for path, device in self.devices.items():
            if self.connection(path) is None or device.channel is None or not device.acked & F_FREE_PAGE_HINT:
                continue
            device.done(force=True)  # even if already DONE: an earlier interrupt may have gone unheard
            if device.config_unread:
                waiting.append(device)
        deadline = time.monotonic() + timeout
        while any(d.config_unread for d in waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for device in waiting:
            if device.config_unread:
                log.error(
                    "%s: the guest did not read DONE within %.1f s; hinted blocks may stay held until "
                    "fph reconnects or the device is removed (device_del)",
                    device.name,
                    timeout,
                )

    async def close(self, timeout: float = 2.0) -> None:
        await self.release_all(timeout)
        await self.server.close()


class BalloonControl:
    """Thread-safe handle on a device: every call runs on the device's event loop."""

    def __init__(self, device: BalloonDevice, loop: asyncio.AbstractEventLoop, timeout: float = 5.0) -> None:
        self.device = device
        self._loop = loop
        self._timeout = timeout

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return fn(*args)

        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self._timeout)

    async def call_async(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the device's loop from a coroutine on any loop, without blocking it,
        e.g. ``await ctl.call_async(ctl.device.request_hints)``."""
        if asyncio.get_running_loop() is self._loop:
            return fn(*args)

        async def run() -> T:
            return fn(*args)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self._loop))

    def request_hints(self, on_issue: Callable[[int], None] | None = None) -> int:
        """Start a hint run. ``on_issue(id)`` runs on the device's loop in the same step as the id is
        issued, so nothing of that id can reach the sink first (the migration opens its bitmap epoch
        there: a hint arriving before the epoch opened would be dropped as stale)."""

        def issue() -> int:
            cmd_id = self.device.request_hints()
            if on_issue is not None:
                on_issue(cmd_id)
            return cmd_id

        return self._call(issue)

    def stop_hints(self) -> None:
        self._call(self.device.stop_hints)

    def done(self) -> None:
        self._call(self.device.done)

    def status(self) -> HintStatus:
        return self._call(self.device.status)

    def guest_stats(self) -> GuestStats:
        return self._call(self.device.guest_stats)

    def request_stats(self) -> bool:
        return self._call(self.device.request_stats)

    def set_target(self, num_pages: int) -> None:
        self._call(self.device.set_target, num_pages)

    def take_metrics(self) -> HintMetrics:
        return self._call(self.device.take_metrics)

    def config_unread(self) -> bool:
        return self._call(lambda: self.device.config_unread)


class ThreadedHintReceiver:
    """A HintReceiver on its own event-loop thread, for synchronous callers (tests, benchmarks).

    A process that hosts it next to busy Python threads should lower the GIL switch interval
    (``sys.setswitchinterval(SWITCH_INTERVAL_S)``, as ``main()`` does): the device thread waits for the GIL.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.receiver = HintReceiver()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fph-hint-receiver", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_vm(self, socket_path: str, sink: HintSink | None = None, **device_args: Any) -> BalloonControl:
        device = self.run(self.receiver.add_vm(socket_path, sink, **device_args))
        return BalloonControl(device, self.loop)

    def close(self, timeout: float = 2.0) -> None:
        if not self._thread.is_alive():
            return
        self.run(self.receiver.close(timeout), timeout + 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


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
    await receiver.close(timeout=2.0)


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
