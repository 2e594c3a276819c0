"""Hint sinks for tests and benchmarks that drive a balloon without a migration."""

from __future__ import annotations

from collections.abc import Sequence

from fph.balloon.sink import RecordingSink
from fph.dirty_bitmap import DirtyBitmap


class BitmapSink(RecordingSink):
    """Records every hint and applies it to a DirtyBitmap. Epochs are opened by
    ``request_hints(on_issue=sink.open_epoch)`` on the device loop, before any hint of the new id can
    arrive: the migration's way."""

    def __init__(self, bitmap: DirtyBitmap) -> None:
        super().__init__()
        self.bitmap = bitmap

    def open_epoch(self, cmd_id: int) -> None:
        self.bitmap.close_epoch()  # a migration harvests the write log here; these runs have none
        self.bitmap.open_epoch(cmd_id)

    def apply_hints(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> int:
        super().apply_hints(epoch, ranges)
        return self.bitmap.apply_hints(epoch, ranges)
