"""fph.daemon.qemu_exit: a listening socket's owner PID, and a process's exit awaited through a pidfd."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fph.daemon.qemu_exit import ProcessExit, socket_owner_pid


def test_socket_owner_pid_is_the_listener(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    child = subprocess.Popen(
        [sys.executable, "-c", f"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind({str(path)!r}); "
         "s.listen(1); print(1, flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"1"
        assert socket_owner_pid(path) == child.pid
    finally:
        child.kill()
        child.wait()
    assert socket_owner_pid(path) is None  # nobody listens any more: refused
    assert socket_owner_pid(tmp_path / "missing.sock") is None
    with socket.socket(socket.AF_UNIX) as s:  # a socket file bound but never listening
        s.bind(str(tmp_path / "bound.sock"))
        assert socket_owner_pid(tmp_path / "bound.sock") is None


def test_process_exit_resolves_when_the_process_dies_and_not_before() -> None:
    async def main() -> None:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        watch = ProcessExit(child.pid)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(watch.wait(), 0.3)
            child.kill()
            await asyncio.wait_for(watch.wait(), 5.0)
        finally:
            watch.close()
            child.wait()
        watch.close()  # twice: harmless

    asyncio.run(main())


def test_process_exit_of_a_process_already_gone_is_an_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()

    async def main() -> None:
        with pytest.raises(ProcessLookupError):
            ProcessExit(child.pid)

    asyncio.run(main())
