"""Where accepted free page hints go: the :class:`HintSink` protocol and a sink that records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fph.virtio.memory import PAGE_SIZE


class HintSink(Protocol):
    """Where accepted hints go (fph.dirty_bitmap.DirtyBitmap implements it).

    ``ranges`` are (GPA start, length in bytes), page aligned and inside guest RAM; ``epoch`` is the
    command id they were hinted under. Returns the number of pages it acted on; raises ValueError on
    ranges it refuses.
    """

    def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int: ...


class RecordingSink:
    """A HintSink that keeps everything it is given (tests, benchmarks)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[tuple[int, int]]]] = []

    def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int:
        self.calls.append((epoch, list(ranges)))
        return sum(n for _, n in ranges) // PAGE_SIZE

    def ranges(self, epoch: int | None = None) -> list[tuple[int, int]]:
        return [r for e, rs in self.calls for r in rs if epoch is None or e == epoch]


class CountingSink:
    """A HintSink that counts and keeps nothing: the default outside migrations (a RecordingSink would grow
    without bound on a long-lived VM)."""

    def __init__(self) -> None:
        self.pages = 0

    def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int:
        n = sum(length for _, length in ranges) // PAGE_SIZE
        self.pages += n
        return n
