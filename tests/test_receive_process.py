"""The destination receiver as its own process (``python -m fph.transfer.receiver``), driven by a source."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fph.dirty_bitmap import DirtyBitmap
from fph.migration.precopy import Precopy
from fph.ram_layout import PAGE_SIZE, RamLayout
from fph.transfer.channel import ChannelError
from fph.transfer.ram_file import RamFile
from fph.transfer.sender import RamSender

MiB = 1 << 20


@pytest.fixture
def files(shm_files: Callable[..., list[Path]]) -> tuple[Path, Path]:
    src, dst = shm_files(64 * MiB, "src", "dst")
    return src, dst


def start_receiver(dst: Path, mem_mib: int) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fph.transfer.receiver",
            "--ram",
            str(dst),
            "--mem-mib",
            str(mem_mib),
            "--timeout",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:1] == ["FPH-RECEIVER"], (line, proc.stderr.read() if proc.stderr else "")
    return proc, (line[1], int(line[2]))


def test_a_source_migrates_into_a_receiver_process(files: tuple[Path, Path]) -> None:
    src_path, dst_path = files
    layout = RamLayout.pc(64 * MiB)
    src = RamFile(src_path, layout, writable=True)
    src.buf[: 40 * MiB] = np.random.default_rng(3).integers(0, 255, 40 * MiB, dtype=np.uint8)
    proc, addr = start_receiver(dst_path, 64)
    try:
        channel = RamSender(addr, RamFile(src_path, layout, writable=False))
        channel.connect()
        bitmap = DirtyBitmap(layout)
        pc = Precopy(bitmap, channel.ram, channel, lambda: np.zeros(bitmap.nwords, dtype=np.uint64))
        pc.start()
        pc.run_round()
        pc.final_round()
        ack = channel.finish({"rounds": pc.round})
        assert ack["ok"] and ack["counters"]["pages"] == 40 * MiB // PAGE_SIZE
        out, _err = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert '"ok": true' in out
        assert np.array_equal(np.fromfile(src_path, dtype=np.uint8), np.fromfile(dst_path, dtype=np.uint8))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        src.close()


def test_a_layout_mismatch_is_refused_by_the_receiver_process(files: tuple[Path, Path]) -> None:
    src_path, dst_path = files
    proc, addr = start_receiver(dst_path, 32)  # the destination thinks the guest has 32 MiB
    try:
        channel = RamSender(addr, RamFile(src_path, RamLayout.pc(64 * MiB), writable=False))
        channel.connect()
        with pytest.raises(ChannelError, match="differs from the destination"):
            channel.finish({})
        _out, _err = proc.communicate(timeout=30)
        assert proc.returncode == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_missing_ram_file_fails_at_once(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fph.transfer.receiver", "--ram", str(tmp_path / "none"), "--mem-mib", "64"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "cannot open guest RAM file" in r.stderr
