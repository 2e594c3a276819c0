"""Free page hinting (``VIRTIO_BALLOON_F_FREE_PAGE_HINT``): the host's side of a hint run.

The host asks for a run with a fresh command id; each 4 MiB block the guest hints under that id is checked
(page aligned) and handed to a :class:`~fph.balloon.sink.HintSink` as ``(epoch = command id, [(gpa,
length)])``. The state machine keeps QEMU's guards (START only from REQUESTED with the matching id, a STOP
only honoured in START, in-buffers only in START, every buffer returned, an id never reused before the
guest's STOP for it) and, unlike QEMU, keeps exposing the current id while started so that an unrelated
config interrupt does not end the run.

Never strand guest memory: hinted blocks stay allocated inside the guest until the device says DONE (or
the guest's shrinker takes them back, or the device goes away). A fresh instance therefore starts in DONE
and announces it as soon as the guest can hear it.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fph.balloon.device_state import HintingState
from fph.balloon.sink import HintSink
from fph.balloon.spec import CMD_ID_DONE, CMD_ID_MAX, CMD_ID_MIN, CMD_ID_STOP
from fph.virtio.chain import DescriptorChain
from fph.virtio.errors import VirtQueueError
from fph.virtio.memory import PAGE_SIZE, GuestMemory
from fph.virtio.queue import SplitQueue

log = logging.getLogger("fph.hint_receiver")

#: Hints handed to the sink per call. A guest with init_on_alloc=0 queues ~100 blocks faster than Python
#: pops them; one sink call per whole pass made the first block of a pass wait ~2 ms (measured), per-block
#: calls cost a sink call each. 8 bounds the wait to a few pops.
HINT_BATCH = 8
LATENCY_SAMPLES = 65536


class HintState(enum.Enum):
    STOP = "stop"
    REQUESTED = "requested"
    START = "start"
    DONE = "done"


@dataclass(frozen=True)
class HintStatus:
    """``blocks``/``hinted_bytes``: this run. ``held_bytes``: the distinct blocks hinted since the last DONE
    (a block the shrinker gave back and the driver hinted again counts once), so never more than guest
    RAM; still an upper bound of what the guest holds: its shrinker takes blocks back without telling
    the device."""

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


class FreePageHinting:
    """The hint state machine of one device. Runs on the device's event loop.

    ``notify()`` raises a config interrupt and returns False when the guest cannot be told (no back-end
    channel); the device supplies it.
    """

    def __init__(self, sink: HintSink, notify: Callable[[], bool], name: str) -> None:
        self.sink = sink
        self.name = name
        self._notify = notify
        self._last_id = CMD_ID_MIN - 1
        self.latency_ns: deque[int] = deque(maxlen=LATENCY_SAMPLES)
        self.reset()
        self.announce_done = True  # a fresh process may follow a crashed one that left blocks held

    def reset(self) -> None:
        """A new driver instance (re-plug, reconnect): it gave back everything it held on removal. The last
        id is kept so that ids are not reused."""
        self.state = HintState.DONE
        self.host_cmd_id = CMD_ID_DONE
        self.guest_cmd_id: int | None = None
        self._guest_active_id: int | None = None  # started by the guest, its STOP not yet seen
        self.run_blocks = 0
        self.run_bytes = 0
        self._forget_held()
        self.rejected = 0
        self.dropped = 0
        self.sink_errors = 0
        self._run_start: float | None = None
        self._run_end: float | None = None
        self.announce_done = True

    def _forget_held(self) -> None:
        self._held_blocks: dict[int, int] = {}
        """GPA -> length of each block hinted since the last DONE (at most guest RAM / 4 MiB entries)."""
        self.held_bytes = 0

    # ------------------------------------------------------------------ hand-over (a worker upgrade)

    def export_state(self) -> HintingState:
        return HintingState(
            self.state.value, self.host_cmd_id, self.guest_cmd_id, self._guest_active_id, self._last_id,
            self.run_blocks, self.run_bytes, sorted(self._held_blocks.items()), self.held_bytes,
            self.rejected, self.dropped, self.sink_errors, self._run_start, self._run_end, self.announce_done,
        )  # fmt: skip

    def import_state(self, st: HintingState) -> None:
        """Go on from a predecessor's hint state: the same run, the same held blocks."""
        self.state = HintState(st.state)
        self.host_cmd_id, self.guest_cmd_id = st.host_cmd_id, st.guest_cmd_id
        self._guest_active_id, self._last_id = st.guest_active_id, st.last_id
        self.run_blocks, self.run_bytes = st.run_blocks, st.run_bytes
        self._held_blocks = {gpa: length for gpa, length in st.held_blocks}
        self.held_bytes = st.held_bytes
        self.rejected, self.dropped, self.sink_errors = st.rejected, st.dropped, st.sink_errors
        self._run_start, self._run_end = st.run_start, st.run_end
        self.announce_done = st.announce_done

    # ------------------------------------------------------------------ the guest's side

    def config_cmd_id(self) -> int:
        """``free_page_hint_cmd_id`` as the guest reads it in the config."""
        if self.state in (HintState.REQUESTED, HintState.START):
            return self.host_cmd_id
        return CMD_ID_DONE if self.state is HintState.DONE else CMD_ID_STOP

    def process(self, q: SplitQueue, mem: GuestMemory) -> None:
        """Pop every chain on the free page queue; hints accepted before a broken chain still reach the
        sink."""
        batch: list[tuple[int, int]] = []
        popped: list[int] = []
        try:
            self._pop(q, mem, batch, popped)
        finally:
            self._flush(batch, popped)

    def _pop(self, q: SplitQueue, mem: GuestMemory, batch: list[tuple[int, int]], popped: list[int]) -> None:
        while (chain := q.pop(mem)) is not None:
            t_pop = time.perf_counter_ns()
            if chain.readable:
                self._flush(batch, popped)
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
                            self._flush(batch, popped)
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

    def _flush(self, batch: list[tuple[int, int]], popped: list[int]) -> None:
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
        self.latency_ns.extend(now - t for t in popped)
        popped.clear()
        hinted = sum(n for _, n in ranges)
        self.run_blocks += len(ranges)
        self.run_bytes += hinted
        for gpa, length in ranges:
            old = self._held_blocks.get(gpa, 0)
            if length > old:
                self._held_blocks[gpa] = length
                self.held_bytes += length - old

    # ------------------------------------------------------------------ the host's side

    def _next_id(self) -> int:
        candidate = self._last_id
        while True:
            candidate = CMD_ID_MIN if candidate >= CMD_ID_MAX else candidate + 1
            if candidate != self._guest_active_id:  # never reuse an id before the guest's STOP for it
                return candidate

    def request(self) -> int:
        """Start a hint run; returns its command id (the epoch the sink will see)."""
        self.host_cmd_id = self._last_id = self._next_id()
        self.state = HintState.REQUESTED
        self.run_blocks = self.run_bytes = 0
        self._run_start, self._run_end = time.monotonic(), None
        self._notify()
        return self.host_cmd_id

    def stop(self) -> None:
        """Stop accepting hints of the current id (before a bitmap sync); the guest keeps the blocks."""
        if self.state is HintState.STOP:
            return
        self._end_run()
        self.state = HintState.STOP
        self._notify()

    def done(self, *, force: bool = False) -> None:
        """Tell the guest to take back every hinted block (``force``: announce again even if DONE)."""
        if self.state is HintState.DONE and not force:
            return
        self._end_run()
        self.state = HintState.DONE
        if self._notify():
            self._forget_held()  # only once the guest is told; the driver reads the id on the interrupt
        # Without a channel the guest cannot hear DONE: status keeps showing what it may still hold, and a
        # later device start announces DONE again (a new driver instance or a reconnect).
        else:
            self.announce_done = True

    def announce_done_once(self) -> None:
        """At the first chance after a (re)start: DONE, for blocks an earlier instance may have left held."""
        if self.announce_done and self.state is HintState.DONE:
            self.announce_done = False
            log.info(
                "%s: announcing DONE so that blocks held for an earlier instance are returned", self.name
            )
            if self._notify():
                self._forget_held()

    def abandon(self) -> None:
        """The device broke: give every hinted block back (DONE) without touching the rings again."""
        if self.state is not HintState.DONE:
            self.state, self.host_cmd_id = HintState.DONE, CMD_ID_DONE
            self._notify()

    def _end_run(self) -> None:
        if self.state in (HintState.REQUESTED, HintState.START) and self._run_end is None:
            self._run_end = time.monotonic()

    def status(self, broken: str | None) -> HintStatus:
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
            broken=broken,
        )
