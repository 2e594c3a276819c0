"""Ending the balloon workers a lab daemon started: they outlive ``fph serve`` by design (they hold QEMU's
connections), so whoever started the daemon ends them, by the PIDs in ``<state dir>/workers/*.ctl.pid``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from fph.balloon.worker_client import process_running


def worker_pids(state_dir: Path) -> list[int]:
    """PIDs of the live balloon workers of a daemon's state directory (checked against their command line,
    so a recycled PID is never signalled)."""
    pids = []
    for pid_file in sorted((state_dir / "workers").glob("*.ctl.pid")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"fph.balloon.worker" in cmdline and str(pid_file)[: -len(".pid")].encode() in cmdline:
                pids.append(pid)
    return pids


def end_workers(state_dir: Path, timeout: float = 3.0) -> list[int]:
    """SIGTERM (DONE, then exit within 2 s), SIGKILL past ``timeout``; returns the PIDs it signalled."""
    pids = worker_pids(state_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while process_running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if process_running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def stop_daemon(proc: subprocess.Popen[Any], state_dir: Path, timeout: float = 30.0) -> None:
    """End a lab's ``fph serve`` (SIGTERM, SIGKILL past ``timeout``), then the balloon workers it
    started, which outlive it by design."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    end_workers(state_dir)
