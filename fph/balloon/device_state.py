"""A balloon device's state as plain data: what a worker hands to its successor (an upgrade) besides the
vhost-user connection (fph.vhost_user.handover), so that a hint run, the held blocks and the guest's stats
buffer go on in the new process as if nothing happened."""

from __future__ import annotations

from dataclasses import dataclass

from fph.balloon.counters import BalloonCounters


@dataclass(frozen=True)
class HintingState:
    state: str
    """A HintState value."""
    host_cmd_id: int
    guest_cmd_id: int | None
    guest_active_id: int | None
    last_id: int
    run_blocks: int
    run_bytes: int
    held_blocks: list[tuple[int, int]]
    held_bytes: int
    rejected: int
    dropped: int
    sink_errors: int
    run_start: float | None
    """time.monotonic() of the host's request: the clock is the host's, shared by both processes."""
    run_end: float | None
    announce_done: bool


@dataclass(frozen=True)
class StatsState:
    values: dict[str, int]
    updated: float | None
    held: tuple[int, int] | None
    """(ring index, descriptor head) of the stats buffer the device holds."""


@dataclass(frozen=True)
class DeviceState:
    acked: int
    num_pages: int
    actual: int
    poison_val: int
    broken: str | None
    config_unread: bool
    counters: BalloonCounters
    stats: StatsState
    hinting: HintingState
