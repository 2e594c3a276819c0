"""The balloon behind one vhost-user connection (one per VM): what QEMU's generic vhost-user device asks of
a back-end (features, config, memory, rings), with each queue routed to the part that owns it.

Runs on the event loop thread that serves its connection; nothing else may touch it
(:class:`fph.balloon.control.BalloonControl` is how other threads and loops reach it).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from fph.balloon.counters import BalloonCounters, HintMetrics
from fph.balloon.device_state import DeviceState
from fph.balloon.free_page_hint import FreePageHinting, HintStatus
from fph.balloon.inflate import process_balloon
from fph.balloon.reporting import process_reporting
from fph.balloon.sink import CountingSink, HintSink
from fph.balloon.spec import (
    CONFIG,
    CONFIG_SIZE,
    F_DEFLATE_ON_OOM,
    F_FREE_PAGE_HINT,
    F_PAGE_POISON,
    F_REPORTING,
    F_STATS_VQ,
    WRITABLE_CONFIG,
    QueueRole,
    queue_roles,
)
from fph.balloon.stats import GuestStats, StatsQueue
from fph.vhost_user import message as m
from fph.vhost_user.backend import BackendChannel
from fph.vhost_user.errors import StateError
from fph.vhost_user.vring import Vring
from fph.virtio.errors import GuestError, VirtQueueError
from fph.virtio.memory import GuestMemory, memory_fence

log = logging.getLogger("fph.hint_receiver")


class BalloonDevice:
    """One VM's balloon: free page hinting, stats, inflate/deflate, reporting.

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
        self.hinting = FreePageHinting(
            sink if sink is not None else CountingSink(), self._notify_config, name
        )
        self._reset_state()

    def _reset_state(self) -> None:
        self.acked = 0
        self.roles: dict[int, QueueRole] = {}
        self.num_pages = 0
        self.actual = 0
        self.poison_val = 0
        self.stats = StatsQueue()
        self.broken: str | None = None
        self._config_unread = False

    @property
    def sink(self) -> HintSink:
        return self.hinting.sink

    @sink.setter
    def sink(self, sink: HintSink) -> None:
        self.hinting.sink = sink

    # ------------------------------------------------------------------ hand-over (a worker upgrade)

    def export_state(self) -> DeviceState:
        return DeviceState(
            self.acked, self.num_pages, self.actual, self.poison_val, self.broken, self._config_unread,
            replace(self.counters), self.stats.export_state(), self.hinting.export_state(),
        )  # fmt: skip

    def import_state(self, st: DeviceState, vrings: list[Vring]) -> None:
        """Go on from a predecessor's device (its rings already restored as ``vrings``)."""
        self.acked = st.acked
        self.roles = queue_roles(st.acked)
        self.num_pages, self.actual, self.poison_val = st.num_pages, st.actual, st.poison_val
        self.broken, self._config_unread = st.broken, st.config_unread
        self.counters = replace(st.counters)
        self.stats.import_state(st.stats, vrings)
        self.hinting.import_state(st.hinting)

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
            if flags == 1 or any(i in r for r in WRITABLE_CONFIG):
                new[i] = byte
        num_pages, self.actual, _cmd_id, self.poison_val = CONFIG.unpack(new)
        if flags == 1:  # migration restores the host's fields too
            self.num_pages = num_pages

    def set_memory(self, mem: GuestMemory | None) -> None:
        self.mem = mem

    def set_backend_channel(self, channel: BackendChannel | None) -> None:
        self.channel = channel

    def queue_stopped(self, vring: Vring) -> None:
        self.stats.queue_stopped(vring)

    def reset(self) -> None:
        """Re-plug or reconnect: the old driver instance gave back everything it held on removal."""
        self._reset_state()
        self.hinting.reset()

    def process_queue(self, vring: Vring) -> None:
        if self.broken is not None or self.mem is None:
            return
        role = self.roles.get(vring.index)
        mem, q = self.mem, vring.queue
        try:
            if role is QueueRole.FREE_PAGE and self.channel is not None:
                self.hinting.announce_done_once()
            # Drain, ask for the next kick, then look again: an entry added between the last look and the
            # avail_event write would otherwise wait for a kick that EVENT_IDX suppressed.
            used_before = q.next_used
            while pending := q.pending(mem):
                self.counters.max_ring_backlog = max(self.counters.max_ring_backlog, pending)
                if role is QueueRole.FREE_PAGE:
                    self.hinting.process(q, mem)
                elif role is QueueRole.STATS:
                    self.stats.process(vring, mem)
                elif role in (QueueRole.INFLATE, QueueRole.DEFLATE):
                    process_balloon(
                        vring, mem, inflate=role is QueueRole.INFLATE, counters=self.counters, name=self.name
                    )
                elif role is QueueRole.REPORTING:
                    poisoned = bool(self.acked & F_PAGE_POISON) and self.poison_val != 0
                    process_reporting(vring, mem, poisoned=poisoned, counters=self.counters, name=self.name)
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

    def _break(self, vring: Vring, exc: Exception) -> None:
        """A guest error: stop touching rings (like QEMU's virtio_error) and give hinted memory back."""
        self.broken = f"queue {vring.index}: {exc}"
        log.error("%s: device broken, no further ring processing: %s", self.name, self.broken)
        vring.signal_error()
        if self.acked & F_FREE_PAGE_HINT:
            self.hinting.abandon()

    # ------------------------------------------------------------------ config

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.num_pages, self.actual, self.hinting.config_cmd_id(), self.poison_val)

    def _notify_config(self) -> bool:
        """Raise a config interrupt; False when there is no back-end channel to raise it on."""
        if self.channel is None:
            log.warning("%s: config changed but there is no back-end channel to tell the guest", self.name)
            return False
        self._config_unread = True
        self.channel.config_changed()
        return True

    @property
    def config_unread(self) -> bool:
        """A config change was announced and the guest has not read the command id since."""
        return self._config_unread and self.channel is not None

    # ------------------------------------------------------------------ control API (on the device's loop)

    def _require_hinting(self) -> None:
        if self.broken is not None:
            raise StateError(f"{self.name}: device is broken ({self.broken})")
        if not self.acked & F_FREE_PAGE_HINT:
            raise StateError(f"{self.name}: the driver has not negotiated FREE_PAGE_HINT")
        if self.channel is None:
            raise StateError(f"{self.name}: no back-end channel, cannot raise a config interrupt")

    def request_hints(self) -> int:
        """Start a hint run; returns its command id (the epoch the sink will see)."""
        self._require_hinting()
        return self.hinting.request()

    def stop_hints(self) -> None:
        """Stop accepting hints of the current id (before a bitmap sync); the guest keeps the blocks."""
        self.hinting.stop()

    def done(self, *, force: bool = False) -> None:
        """Tell the guest to take back every hinted block (``force``: announce again even if DONE)."""
        self.hinting.done(force=force)

    def status(self) -> HintStatus:
        return self.hinting.status(self.broken)

    def guest_stats(self) -> GuestStats:
        return self.stats.snapshot()

    def take_metrics(self) -> HintMetrics:
        """Per-hint latencies and the deepest ring backlog since the last call (then reset)."""
        metrics = HintMetrics(list(self.hinting.latency_ns), self.counters.max_ring_backlog)
        self.hinting.latency_ns.clear()
        self.counters.max_ring_backlog = 0
        return metrics

    def request_stats(self) -> bool:
        """Return the held stats buffer so the guest refills it; False if none is held."""
        if self.mem is None or self.broken is not None:
            return False
        return self.stats.request(self.mem)

    def set_target(self, num_pages: int) -> None:
        """Balloon target in 4 KiB pages; the driver inflates or deflates towards it."""
        if not 0 <= num_pages <= 0xFFFF_FFFF:
            raise StateError(f"target {num_pages} pages out of range")
        if self.channel is None:
            raise StateError(f"{self.name}: no back-end channel, cannot tell the guest its new target")
        self.num_pages = num_pages
        self._notify_config()
