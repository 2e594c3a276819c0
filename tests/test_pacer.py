"""The bandwidth cap: a token bucket with no credit for idle time, judged over every 100 ms window, on a
fake clock and on a real TCP connection (metered at both sockets)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fph.ram_layout import PAGE_SIZE, RamLayout
from fph.transfer.pacer import WINDOW_S, TokenBucket, WindowMeter, slice_bytes
from fph.transfer.pagehash import page_hashes
from fph.transfer.ram_file import RamFile
from fph.transfer.receiver import RamReceiver
from fph.transfer.sender import RamSender

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_bucket_gives_no_credit_for_idle_time() -> None:
    clk = FakeClock()
    bucket = TokenBucket(10 * MiB, 64 << 10, clock=clk, sleep=clk.sleep)
    meter = WindowMeter(clock=clk)
    for _ in range(160):  # 10 MiB at 10 MiB/s: ~1 s
        bucket.take(64 << 10)
        meter.add(64 << 10)
    clk.now += 5.0  # idle: a harvest, a hint wait
    t_idle_end = clk.now
    for _ in range(160):
        bucket.take(64 << 10)
        meter.add(64 << 10)
    burst_s = clk.now - t_idle_end
    assert burst_s >= 0.99  # after idling the second 10 MiB still took a second
    assert meter.max_window_rate() <= 10 * MiB * 1.05 + (64 << 10) / WINDOW_S


def test_bucket_and_meter_bound_every_window() -> None:
    clk = FakeClock()
    rate = 128 * MiB
    bucket = TokenBucket(rate, clock=clk, sleep=clk.sleep)
    meter = WindowMeter(clock=clk)
    rng = np.random.default_rng(1)
    for n in rng.integers(1, 1 << 20, 2000).tolist():  # frames of any size, sliced as the sender does
        for off in range(0, n, slice_bytes(rate)):
            k = min(slice_bytes(rate), n - off)
            bucket.take(k)
            meter.add(k)
        if rng.random() < 0.05:
            clk.now += float(rng.random())  # idle gaps
    assert 0 < meter.max_window_rate() <= rate * 1.05


def test_meter_sliding_window() -> None:
    clk = FakeClock()
    meter = WindowMeter(clock=clk)
    for t, n in [(0.0, 100), (0.05, 100), (0.1, 100), (0.15, 1000), (0.16, 1000), (0.3, 100)]:
        clk.now = t
        meter.add(n)
    # (0.06, 0.16]: 100 + 1000 + 1000
    assert meter.max_window_rate() == pytest.approx(2100 / WINDOW_S)
    assert meter.max_window_rate(since=0.2) == 0.0  # less than a window of samples after 0.2


def test_bad_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


def _send_capped(tmp_path: Path, cap: int) -> tuple[RamSender, RamReceiver, float]:
    """~2 s of data pages through a real TCP connection capped at ``cap``: the sender, the receiver and
    when sending began."""
    layout = RamLayout.pc(64 * MiB)
    tmp_path.mkdir(parents=True, exist_ok=True)
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    rng = np.random.default_rng(7)
    src_path.write_bytes(rng.integers(0, 255, 64 * MiB, dtype=np.uint8).tobytes())
    with open(dst_path, "wb") as f:
        f.truncate(64 * MiB)
    src = RamFile(src_path, layout, writable=False)
    dst = RamFile(dst_path, layout, writable=True)
    rx = RamReceiver(dst)
    addr = rx.start()
    tx = RamSender(addr, src, bandwidth=cap)
    try:
        tx.connect()
        rx.wait_prepared(30)
        t_send = time.monotonic()
        pages = 64 * MiB // PAGE_SIZE
        step = 256
        for first in range(0, min(pages, cap * 2 // PAGE_SIZE), step):
            payload = np.array(src.pages(first, step))
            tx.send_pages(0, first, payload, page_hashes(payload))
        tx.finish({"rounds": 1})
        assert rx.wait(30).ok
    finally:
        tx.close()
        rx.stop()
        src.close()
        dst.close()
    return tx, rx, t_send


@pytest.mark.parametrize("cap_mib", [32, 128])
def test_cap_holds_at_both_sockets(tmp_path: Path, cap_mib: int) -> None:
    """Data pages through a real TCP connection under the cap: every 100 ms window within 5% at the
    sender's socket, and the receiver's socket never ahead of it on average, in every attempt; the mean
    close to the cap (a cap, not a trickle) in the better of two attempts: sender and receiver share this
    process and a 2-core host, and a background burst (a guest test's QEMU or namespace going away) once
    held the producer to 0.885 of 128 MiB/s. (The receiver's own 100 ms windows can read up to ~10% high
    after its thread waited for the GIL: data it had not read piles up in the socket buffer.)"""
    cap = cap_mib * MiB
    means = []
    for attempt in range(2):
        tx, rx, t_send = _send_capped(tmp_path / str(attempt), cap)
        assert tx.meter.max_window_rate() <= cap * 1.05, tx.meter.max_window_rate() / cap
        assert rx.meter.busy_rate(since=t_send) <= cap * 1.05, rx.meter.busy_rate(since=t_send) / cap
        means.append(tx.meter.busy_rate(since=t_send) / cap)
        if means[-1] >= 0.9:
            break
    assert max(means) >= 0.9, means
