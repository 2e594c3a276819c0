"""The write-log interface the migration engine uses, and the figures every provider reports.

A write log records the guest-physical pages written since its last harvest. fph's correctness rests on
two properties (an exhaustive model check of hint/write/harvest orders; its losing traces are replayed
against the real bitmap in tests/test_dirty_bitmap.py): tracking is armed for all pages before the first
command id is issued (``start()``), and every ``harvest()`` is an atomic fetch-and-clear, so a write is
either in this harvest or in the next one, never in neither. Providers that cannot clear atomically
(soft-dirty) must stop the vCPUs around read and clear, and report that pause.

Harvested words use fph's DirtyBitmap layout: page ``p`` at bit ``p & 63`` of ``uint64`` word ``p >> 6``,
``nwords = ceil(layout.span_pages / 64)``: pass them to ``DirtyBitmap.merge_write_log``.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fph.ram_layout import RamLayout
from fph.writelog.errors import WriteLogStateError

Words = npt.NDArray[np.uint64]


def words_for(nbits: int) -> int:
    """Number of ``uint64`` words of a bitmap of ``nbits`` pages."""
    return (nbits + 63) // 64


def count_bits(words: Words) -> int:
    """Population count of a word array (pages marked)."""
    return int(np.unpackbits(words.view(np.uint8)).sum()) if words.size else 0


def full_words(nbits: int) -> Words:
    """Every page of ``nbits`` set: the conservative answer when a provider knows it lost track."""
    out = np.full(words_for(nbits), np.uint64(0xFFFF_FFFF_FFFF_FFFF), dtype=np.uint64)
    tail = nbits & 63
    if tail:
        out[-1] = np.uint64((1 << tail) - 1)
    return out


@dataclass
class HarvestStats:
    """Figures over a log's harvests. ``pause``: time the vCPUs were stopped for the harvest (0 for
    atomic providers, which never stop the guest); ``duration``: wall time of the whole harvest."""

    harvests: int = 0
    pages_total: int = 0
    pages_last: int = 0
    pause_total_s: float = 0.0
    pause_last_s: float = 0.0
    pause_max_s: float = 0.0
    duration_total_s: float = 0.0
    duration_last_s: float = 0.0
    duration_max_s: float = 0.0
    conservative_harvests: int = 0
    """Harvests that returned every page because the provider knew it had missed a write."""

    def record(self, pages: int, duration_s: float, pause_s: float) -> None:
        self.harvests += 1
        self.pages_last = pages
        self.pages_total += pages
        self.pause_last_s = pause_s
        self.pause_total_s += pause_s
        self.pause_max_s = max(self.pause_max_s, pause_s)
        self.duration_last_s = duration_s
        self.duration_total_s += duration_s
        self.duration_max_s = max(self.duration_max_s, duration_s)

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["pause_mean_s"] = self.pause_total_s / self.harvests if self.harvests else 0.0
        d["duration_mean_s"] = self.duration_total_s / self.harvests if self.harvests else 0.0
        return d


class WriteLog(abc.ABC):
    """A source of "pages written since the last harvest" for one guest.

    Life cycle: construct, optionally ``prepare()`` (begins arming without waiting), ``start()`` (arms
    tracking for all pages: writes before it are not reported, so round 0 must copy everything after it),
    ``harvest()`` per precopy round and once more with the vCPUs stopped (``vcpus_stopped=True``),
    ``close()`` (disarms what ``start()`` armed). Usable as a context manager.
    """

    kind: str = "abstract"
    """Short provider name for reports: ``tcg-plugin``, ``soft-dirty``, ``device``, ``combined``."""
    atomic: bool = True
    """True when a harvest is an atomic fetch-and-clear without stopping the guest."""
    arms_on_guest_code: bool = False
    """True when arming completes only once a vCPU runs guest code (the TCG plugin): a paused guest's log
    cannot be armed."""

    def __init__(self, layout: RamLayout) -> None:
        self.layout = layout
        self.nbits = layout.span_pages
        self.nwords = words_for(self.nbits)
        self.stats = HarvestStats()
        self.started = False
        self.closed = False

    # -- to implement

    @abc.abstractmethod
    def _start(self) -> None: ...

    @abc.abstractmethod
    def _harvest(self, vcpus_stopped: bool) -> tuple[Words, float]:
        """Return (words, seconds the vCPUs were stopped for it)."""

    def _prepare(self) -> None:  # noqa: B027 - optional hook
        """Begin arming without waiting (default: nothing to begin)."""

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (default: nothing)."""

    def _details(self) -> dict[str, Any]:
        return {}

    # -- public API

    def prepare(self) -> None:
        """Begin arming, without waiting, where arming takes time (the TCG plugin retranslates the guest's
        code): a caller with other setup to do lets it run meanwhile. ``start()`` still must be called."""
        self._check_open()
        if not self.started:
            self._prepare()

    def start(self) -> None:
        """Arm tracking for all pages; everything written from now on shows up in a harvest."""
        self._check_open()
        if self.started:
            raise WriteLogStateError(f"{self.kind} write log already started")
        self._start()
        self.started = True

    def harvest(self, *, vcpus_stopped: bool = False) -> Words:
        """Atomically take and clear the pages written since the last harvest (or ``start()``).

        ``vcpus_stopped=True``: the caller has already stopped the guest (the final harvest at
        switch-over); a provider that pauses the vCPUs itself must then leave them stopped.
        """
        self._check_ready()
        t0 = time.perf_counter()
        words, pause_s = self._harvest(vcpus_stopped)
        self._record(words, time.perf_counter() - t0, pause_s)
        return words

    async def aharvest(self, *, vcpus_stopped: bool = False) -> Words:
        """``harvest()`` for asyncio callers; providers that pause the guest await their pause callables."""
        return self.harvest(vcpus_stopped=vcpus_stopped)

    def close(self) -> None:
        """Stop using the log (idempotent). Does not end the VM."""
        if not self.closed:
            self.closed = True
            self._close()

    def describe(self) -> dict[str, Any]:
        """Figures for reports: provider, atomicity, size, harvest and pause times, provider counters."""
        return {
            "kind": self.kind,
            "atomic": self.atomic,
            "nbits": self.nbits,
            "nwords": self.nwords,
            "started": self.started,
            **self.stats.as_dict(),
            **self._details(),
        }

    # -- helpers

    def _record(self, words: Words, duration_s: float, pause_s: float) -> None:
        if words.dtype != np.uint64 or words.shape != (self.nwords,):
            raise WriteLogStateError(
                f"{self.kind} harvest returned {words.dtype}{words.shape}, expected uint64[{self.nwords}]"
            )
        self.stats.record(count_bits(words), duration_s, pause_s)

    def _check_open(self) -> None:
        if self.closed:
            raise WriteLogStateError(f"{self.kind} write log is closed")

    def _check_ready(self) -> None:
        self._check_open()
        if not self.started:
            raise WriteLogStateError(
                f"{self.kind} write log not started: call start() before the first harvest (it arms "
                "tracking for all pages)"
            )

    def __enter__(self) -> WriteLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
