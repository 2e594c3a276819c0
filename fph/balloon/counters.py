"""What one balloon device has done since it started: plain counters, read by status and metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BalloonCounters:
    inflated_pages: int = 0
    deflated_pages: int = 0
    discarded_bytes: int = 0
    reported_bytes: int = 0
    reports_not_discarded: int = 0
    invalid_pfns: int = 0
    max_ring_backlog: int = 0
    config_reads: int = 0


@dataclass(frozen=True)
class HintMetrics:
    """``latency_ns``: per accepted hint, popped from the ring -> handed to the sink."""

    latency_ns: list[int]
    max_ring_backlog: int
