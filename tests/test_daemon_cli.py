"""``fph serve`` as a real process and the ``fph`` commands that talk to it (the daemon is ended by PID)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fph.balloon.worker import ORPHAN_GRACE_S
from fph.waiting import poll_until
from fph_lab.workers import end_workers, worker_pids

pytestmark = pytest.mark.timeout(120)
FPH = [sys.executable, "-m", "fph.cli"]


def fph(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FPH, *args], capture_output=True, text=True, timeout=60)


def test_serve_cli_and_clean_shutdown(tmp_path: Path) -> None:
    state = tmp_path / "state"
    sock = tmp_path / "run" / "fph.sock"
    cfg = tmp_path / "fph.toml"
    cfg.write_text(f'state_dir = "{state}"\nlog_format = "json"\n')
    proc = subprocess.Popen(
        [*FPH, "serve", "--config", str(cfg), "--socket", str(sock), "--metrics-address", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def listening() -> bool:
            if sock.exists():
                return True
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return False

        assert poll_until(listening, 30), "the daemon never created its socket"
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        (state / "a").mkdir()
        r = fph(
            "vm",
            "register",
            "a",
            "--socket",
            str(sock),
            "--qmp-socket",
            f"{state}/a/qmp.sock",
            "--ram-file",
            f"{state}/a/ram",
            "--balloon-socket",
            f"{state}/a/b.sock",
            "--memory-mib",
            "512",
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "VM_STATE_REGISTERED"
        r = fph("vm", "list", "--socket", str(sock))
        assert [v["spec"]["name"] for v in json.loads(r.stdout)["vms"]] == ["a"]
        r = fph(
            "vm",
            "register",
            "b",
            "--socket",
            str(sock),
            "--qmp-socket",
            "/etc/q.sock",
            "--ram-file",
            f"{state}/a/ram2",
            "--memory-mib",
            "512",
        )
        assert r.returncode == 2 and r.stderr.startswith("fph: INVALID_ARGUMENT: qmp_socket '/etc/q.sock'")
        r = fph("hint", "start", "a", "--socket", str(sock))
        assert r.returncode == 1 and "FAILED_PRECONDITION: no QEMU is connected" in r.stderr
        r = fph("hint", "status", "nope", "--socket", str(sock))
        assert r.returncode == 1 and "NOT_FOUND" in r.stderr
        r = fph("migration", "cancel", "a", "--socket", str(sock))
        assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "nothing to cancel" in r.stderr
        r = fph("migrate", "--socket", str(sock), "--vm", "a", "--dest-vm", "nope")
        assert r.returncode == 1 and "NOT_FOUND" in r.stderr
        # a second daemon on the live socket, or on the same state directory, refuses and touches nothing
        second = fph("serve", "--socket", str(sock), "--state-dir", str(tmp_path / "state2"))
        assert second.returncode == 2 and "another process serves" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        second = fph("serve", "--socket", str(tmp_path / "run" / "other.sock"), "--state-dir", str(state))
        assert second.returncode == 2 and f"(pid {proc.pid}) uses the state directory" in second.stderr
        assert sock.exists() and fph("vm", "list", "--socket", str(sock)).returncode == 0
        t_term = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t_term < 2.0, "SIGTERM must end the daemon within 2 s"
        assert not sock.exists()
        # VM a's balloon worker outlives the daemon (it would hold QEMU's connection); with no daemon and
        # no QEMU it is an orphan and exits by itself, its socket removed
        assert poll_until(lambda: not (state / "a" / "b.sock").exists(), ORPHAN_GRACE_S + 5)
        assert poll_until(lambda: not worker_pids(state), 5)
        logs = [json.loads(line) for line in (proc.stderr.read() if proc.stderr else "").splitlines() if line]
        msgs = [entry["msg"] for entry in logs]
        assert "serving" in msgs and "vm registered" in msgs and msgs[-1] == "stopped", msgs
        assert next(e for e in logs if e["msg"] == "vm registered")["vm"] == "a"
        rejected = [e for e in logs if e["msg"] == "rpc rejected"]
        assert {e["rpc"] for e in rejected} >= {"RegisterVm", "StartHinting", "GetHintingStatus"}, rejected
        reg = next(e for e in rejected if e["rpc"] == "RegisterVm")
        assert reg["code"] == "INVALID_ARGUMENT" and "/etc/q.sock" in reg["reason"] and reg["peer"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        end_workers(state)


def test_serve_refuses_tcp_without_mutual_tls_and_a_non_socket(tmp_path: Path) -> None:
    r = fph(
        "serve", "--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path), "--tcp", "127.0.0.1:0"
    )
    assert r.returncode == 2 and "mutual TLS" in r.stderr
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    proc = subprocess.run(
        [*FPH, "serve", "--socket", str(not_a_socket), "--state-dir", str(tmp_path / "st")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "is not a socket" in proc.stderr and "Traceback" not in proc.stderr
    assert not_a_socket.read_text() == "x"


def test_configuration_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("socket = 3\n")
    broken_toml = tmp_path / "broken.toml"
    broken_toml.write_text("socket = \n")
    st = str(tmp_path / "st")
    broken_state = tmp_path / "broken-state"
    broken_state.mkdir()
    (broken_state / "state.json").write_text("{not json")
    cases = {
        "a flag that does not exist": ["serve", "--bogus"],
        "a mode that is not octal": ["serve", "--socket", str(tmp_path / "s"), "--socket-mode", "9z"],
        "a key of the wrong type": ["serve", "--config", str(bad_toml)],
        "a file that is not TOML": ["serve", "--config", str(broken_toml)],
        "a group that does not exist": ["serve", "--state-dir", st, "--socket-group", "no-such-grp"],
        "a log level that does not exist": ["serve", "--state-dir", st, "--log-level", "loud"],
        "a saved state that is not JSON": ["serve", "--state-dir", str(broken_state), "--socket", f"{st}/x"],
    }  # fmt: skip
    for what, args in cases.items():
        r = fph(*args)
        assert r.returncode == 2, (what, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (what, r.stderr)


def test_socket_group_is_set(tmp_path: Path) -> None:
    import grp

    others = [g for g in grp.getgrall() if g.gr_gid != os.getegid()]
    if not others:
        pytest.skip("no second group on this host")
    group = others[0]
    sock = tmp_path / "run" / "fph.sock"
    proc = subprocess.Popen(
        [*FPH, "serve", "--socket", str(sock), "--state-dir", str(tmp_path / "st"), "--socket-mode", "0660",
         "--socket-group", group.gr_name],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert poll_until(lambda: sock.exists() or proc.poll() is not None, 30)
        assert poll_until(lambda: os.stat(sock).st_gid == group.gr_gid, 5), proc.stderr
        assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    finally:
        proc.terminate()
        proc.wait(10)
