"""The stats queue (``VIRTIO_BALLOON_F_STATS_VQ``): the guest's memory figures, refreshed on request.

The driver posts one buffer and refills it each time the device returns it, so the device holds the buffer
and returns it only when new figures are wanted (returning it at once makes the driver refresh in a busy
loop). The buffer arrives before the first kick: the ring is processed as soon as it is enabled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fph.balloon.device_state import StatsState
from fph.balloon.spec import STAT, STAT_NAMES
from fph.vhost_user.vring import Vring
from fph.virtio.errors import VirtQueueError
from fph.virtio.memory import GuestMemory


@dataclass(frozen=True)
class GuestStats:
    values: dict[str, int]
    updated: float | None  # time.monotonic() of the last stats buffer, None before the first one


class StatsQueue:
    """Latest values by name, and the held buffer."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.updated: float | None = None
        self._held: tuple[Vring, int] | None = None

    def process(self, vring: Vring, mem: GuestMemory) -> None:
        while (chain := vring.queue.pop(mem)) is not None:
            data = chain.read_out(mem, STAT.size * 64)
            if len(data) % STAT.size:
                raise VirtQueueError(f"stats buffer of {len(data)} bytes is not a whole number of entries")
            for off in range(0, len(data), STAT.size):
                tag, value = STAT.unpack_from(data, off)
                self.values[STAT_NAMES[tag] if tag < len(STAT_NAMES) else f"tag_{tag}"] = value
            self.updated = time.monotonic()
            if self._held is not None:  # a driver posts one buffer; if it posts more, keep the newest
                vring.queue.add_used(mem, self._held[1], 0)
            self._held = (vring, chain.head)

    def queue_stopped(self, vring: Vring) -> None:
        if self._held is not None and self._held[0] is vring:
            self._held = None  # the ring's state goes back to the front-end via GET_VRING_BASE

    def request(self, mem: GuestMemory) -> bool:
        """Return the held buffer so the guest refills it; False if none is held."""
        if self._held is None:
            return False
        vring, head = self._held
        self._held = None
        vring.queue.add_used(mem, head, 0)
        vring.signal_used(mem)
        return True

    def export_state(self) -> StatsState:
        held = (self._held[0].index, self._held[1]) if self._held is not None else None
        return StatsState(dict(self.values), self.updated, held)

    def import_state(self, st: StatsState, vrings: list[Vring]) -> None:
        """A predecessor's figures, and the buffer it held (on ``vrings``, the restored rings)."""
        self.values, self.updated = dict(st.values), st.updated
        if st.held is not None and vrings:
            index, head = st.held
            self._held = (vrings[index], head)

    def snapshot(self) -> GuestStats:
        return GuestStats(dict(self.values), self.updated)
