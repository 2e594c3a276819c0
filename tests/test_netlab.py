"""fph_lab.netlab: two network namespaces joined by a tbf-shaped veth pair. The ``twohost`` tests set up real
namespaces (root, ip, tc); the rest are pure. Rates are printed (``pytest -s``) and in failure messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fph_lab import netlab
from fph_lab.errors import LabError
from fph_lab.netlab import LinkConfig, NetLabError, TwoHostLink, leftover_namespaces
from fph_lab.provision import Lab, QemuInstall
from fph_lab.vm import VM, VMConfig
from fph_lab.wire_rate import WireSampler, WireSeries

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="needs root and iproute2 (ip, tc): network namespaces, veth and tc need CAP_NET_ADMIN",
)

MiB = 1 << 20
PORT = 5201

# Serves each connection on a thread of its own (a transfer stalled by a cut link must not block the next):
# reads it to EOF and answers with the byte count (8 bytes).
RECEIVER = f"""
import socket, sys, threading
def serve(c):
    n = 0
    while b := c.recv(1 << 20):
        n += len(b)
    c.sendall(n.to_bytes(8, "big"))
    c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], {PORT}))
s.listen(8)
print("READY", flush=True)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

# Sends argv[2] bytes to argv[1] with socket timeout argv[3], once connected and (argv[4] == "go") a line
# was read on stdin; prints JSON: ok, received, elapsed (start of sending to the receiver's count read:
# every byte arrived), error.
SENDER = f"""
import json, socket, sys, time
size, timeout = int(sys.argv[2]), float(sys.argv[3])
out = {{"ok": False, "received": 0, "elapsed": None, "error": None}}
buf = memoryview(bytes(1 << 20))
try:
    c = socket.create_connection((sys.argv[1], {PORT}), timeout=timeout)
    print("CONNECTED", flush=True)
    if sys.argv[4:] == ["go"]:
        sys.stdin.readline()
    t0 = time.monotonic()
    left = size
    while left:
        left -= c.send(buf[: min(left, len(buf))])
    c.shutdown(socket.SHUT_WR)
    out["received"] = int.from_bytes(c.recv(8), "big")
    out["elapsed"] = time.monotonic() - t0
    out["ok"] = out["received"] == size
except OSError as e:
    out["error"] = f"{{type(e).__name__}}: {{e}}"
print(json.dumps(out), flush=True)
"""


def _python(script: str, *args: str) -> list[str]:
    return [sys.executable, "-I", "-c", script, *args]


def _start_receiver(link: TwoHostLink) -> subprocess.Popen[str]:
    rx = link.popen(link.dst_ns, _python(RECEIVER, link.dst_ip), stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    assert rx.stdout.readline().strip() == "READY"
    return rx


def _send(link: TwoHostLink, size: int, timeout: float) -> dict[str, object]:
    tx = link.popen(
        link.src_ns, _python(SENDER, link.dst_ip, str(size), str(timeout)), stdout=subprocess.PIPE, text=True
    )
    out, _ = tx.communicate(timeout=30)
    return dict(json.loads(out.splitlines()[-1]))


def _transfer(link: TwoHostLink, size: int, window_s: float = 0.2) -> dict[str, float]:
    """One ``size``-byte transfer src -> dst. Rates: the payload over the sender's time (goodput), the source
    veth's tx counter over the same time (wire), and that counter in fixed ``window_s`` windows read by
    ``fph_lab.wire_rate.WireSampler`` inside the namespace (a burst above the cap shows there, not in the
    mean)."""
    argv = _python(SENDER, link.dst_ip, str(size), "30", "go")
    tx = link.popen(link.src_ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert tx.stdin is not None and tx.stdout is not None
    assert tx.stdout.readline().strip() == "CONNECTED"
    sampler = WireSampler(link, "src", window_s).start()
    time.sleep(2 * window_s)  # a sample or two before the transfer
    tx.stdin.write("go\n")
    tx.stdin.flush()
    out = tx.communicate(timeout=30)[0]
    series = sampler.stop()
    result = json.loads(out.splitlines()[-1])
    assert result["ok"], result
    assert len(series.times) >= 2, (series, result)  # an unshaped transfer can fit in one window
    wire = series.tx_bytes[-1] - series.tx_bytes[0]
    # Windows wholly inside the transfer (the last one ends after the sender is done: partly idle).
    windows = [r * 8 for _, r in series.window_rates()[:-1]]
    return {
        "elapsed_s": result["elapsed"],
        "wire_bytes": wire,
        "goodput_bits_per_s": size * 8 / result["elapsed"],
        "wire_bits_per_s": wire * 8 / result["elapsed"],
        "max_window_bits_per_s": max(windows, default=0.0),
    }


def _mbit(d: dict[str, float]) -> str:
    return ", ".join(f"{k}={v / 1e6:.1f}M" if "bits" in k else f"{k}={v:.3f}" for k, v in d.items())


def _ours() -> set[str]:
    return {n for n in leftover_namespaces() if n.rsplit("-", 2)[-2] == str(os.getpid())}


STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
)

# -- pure


def test_wire_series_windows_and_the_cap() -> None:
    series = WireSeries((10.0, 10.1, 10.2, 10.3), (1000, 1000 + 10_000, 1000 + 30_000, 1000 + 30_000))
    rates = series.window_rates()
    assert [round(t, 3) for t, _ in rates] == [10.1, 10.2, 10.3]
    assert [round(r) for _, r in rates] == [100_000, 200_000, 0]
    assert round(series.max_window_rate_bps() or 0) == 200_000
    assert series.windows_over(190_000) == 1 and series.windows_over(195_000) == 0  # 5 % tolerance
    assert series.relative(9.0)[1] == [1.1, 10_000]
    empty = WireSeries((), ())
    assert empty.max_window_rate_bps() is None and empty.relative(0.0) == [] and empty.window_rates() == []


def test_wire_sampler_refuses_a_bad_interval_and_a_stop_before_start() -> None:
    link = TwoHostLink.__new__(TwoHostLink)  # never set up: neither call reaches it
    with pytest.raises(ValueError, match="interval_s"):
        WireSampler(link, "src", 0)
    with pytest.raises(LabError, match="never started"):
        WireSampler(link, "src").stop()


def test_link_config_defaults_and_validation() -> None:
    c = LinkConfig()
    assert (c.rate_bits_per_s, c.burst_bytes, c.latency_ms, c.shape_both_directions) == (
        1_000_000_000, 256 * 1024, 50, True,
    )  # fmt: skip
    assert (c.src_ip, c.dst_ip, c.prefix_len) == ("10.9.0.1", "10.9.0.2", 24)
    with pytest.raises(ValueError, match="rate_bits_per_s"):
        LinkConfig(rate_bits_per_s=0)
    with pytest.raises(ValueError, match="subnet"):
        LinkConfig(dst_ip="10.9.1.2")
    with pytest.raises(ValueError):
        LinkConfig(src_ip="10.9.0.300")


def test_not_root_or_no_iproute2_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _ours()
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    with pytest.raises(NetLabError, match="needs root"):
        TwoHostLink()
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netlab.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    with pytest.raises(NetLabError, match=r"tc not found.*install iproute2"):
        TwoHostLink()
    assert _ours() == before


@pytest.fixture
def fake_lab(tmp_path: Path) -> Lab:
    """A lab whose "QEMU" is a Python that sleeps (argv_prefix runs it; the rest of the argv is ignored)."""
    q = QemuInstall(
        kind="chroot",
        version="11.1.2",
        package_version="1:11.1.2+ds-3",
        binary="qemu-system-x86_64",
        argv_prefix=(sys.executable, "-I", "-c", "import time; time.sleep(60)"),
        data_dirs=("/c/share",),
    )
    return Lab(
        root=str(tmp_path), qemu=q, kernel="/k/vmlinuz", kernel_version="6.1.0-56-amd64",
        kernel_package="linux-image-6.1.0-56-amd64", initramfs="/k/initramfs.cpio.gz", guest_programs={},
        guest_sources="/src",
    )  # fmt: skip


def test_vm_netns_prefixes_the_qemu_argv(
    fake_lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FPH_RUN_DIR", str(tmp_path / "run"))
    plain = VM(fake_lab, VMConfig(balloon="none"), name="t")
    inside = VM(fake_lab, VMConfig(balloon="none", netns="fph-src-1-0"), name="t")
    assert plain.command()[0] == sys.executable
    argv = inside.command()
    assert argv[:3] == ["nsenter", "--net=/run/netns/fph-src-1-0", "--"]
    # The rest is the same QEMU command line (only the run directory differs between the two VMs).
    assert argv[3:] == [a.replace(str(plain.run_dir), str(inside.run_dir)) for a in plain.command()]
    for vm in (plain, inside):
        vm.stop()


# -- two hosts (root)


def test_tcp_counters_parse_this_hosts_proc_net() -> None:
    """The Tcp and TcpExt sections of the real files, and nothing from the other sections."""
    text = Path("/proc/net/snmp").read_text() + Path("/proc/net/netstat").read_text()
    counters = netlab.tcp_counters(text)
    assert {"RetransSegs", "OutSegs", "TCPTimeouts", "TCPLossProbes"} <= counters.keys(), sorted(counters)
    assert "InReceives" not in counters  # Ip: and Udp: are left out
    assert counters["OutSegs"] >= 0 and counters["MaxConn"] == -1


@pytest.mark.twohost
@needs_root
def test_shaped_link_holds_the_cap_and_unshaped_is_faster() -> None:
    cap = 200_000_000
    with TwoHostLink(LinkConfig(rate_bits_per_s=cap)) as link:
        _start_receiver(link)
        before = link.tcp_counters("src")
        shaped = _transfer(link, 40 * MiB)
        sent = link.tcp_counters("src")["OutSegs"] - before["OutSegs"]
        assert sent >= 40 * MiB // 65536, f"the source namespace's own TCP counters: {sent} segments out"
    with TwoHostLink(LinkConfig(rate_bits_per_s=None)) as link:
        _start_receiver(link)
        unshaped = _transfer(link, 40 * MiB)
    print(f"\nshaped at {cap / 1e6:.0f} Mbit/s: {_mbit(shaped)}\nunshaped: {_mbit(unshaped)}")
    msg = f"shaped: {_mbit(shaped)}; unshaped: {_mbit(unshaped)}"
    assert shaped["wire_bytes"] >= 40 * MiB, msg
    for key in ("wire_bits_per_s", "goodput_bits_per_s"):
        assert 0.9 * cap <= shaped[key] <= 1.1 * cap, f"{key} off the cap by more than 10 %: {msg}"
    assert shaped["max_window_bits_per_s"] <= 1.1 * cap, f"a 200 ms window above the cap: {msg}"
    assert unshaped["goodput_bits_per_s"] > 2 * shaped["goodput_bits_per_s"], msg


@pytest.mark.twohost
@needs_root
def test_link_down_fails_connects_and_transfers_and_up_restores() -> None:
    with TwoHostLink(LinkConfig(rate_bits_per_s=200_000_000)) as link:
        _start_receiver(link)
        assert _send(link, MiB, 2.0)["ok"]
        link.set_link(False)
        down = _send(link, MiB, 1.0)
        assert not down["ok"] and down["error"], down
        link.set_link(True)
        assert _send(link, MiB, 2.0)["ok"]
        # An established transfer (40 MiB at 200 Mbit/s: ~1.7 s) stalls when the link goes down mid-way.
        tx = link.popen(
            link.src_ns, _python(SENDER, link.dst_ip, str(40 * MiB), "1.0"), stdout=subprocess.PIPE, text=True
        )
        assert tx.stdout is not None and tx.stdout.readline().strip() == "CONNECTED"
        time.sleep(0.3)
        link.set_link(False)
        cut = json.loads(tx.communicate(timeout=10)[0].splitlines()[-1])
        assert not cut["ok"] and "timed out" in str(cut["error"]), cut
        link.set_link(True)
        assert _send(link, MiB, 2.0)["ok"]
        print(f"\nlink down: {down['error']}; transfer cut mid-way: {cut['error']}")


@pytest.mark.twohost
@needs_root
def test_teardown_after_an_exception_ends_processes_and_namespaces() -> None:
    with pytest.raises(RuntimeError, match="body failed"), TwoHostLink() as link:
        names = {link.src_ns, link.dst_ns}
        assert names <= set(leftover_namespaces())
        procs = [link.popen(ns, ["sleep", "60"]) for ns in (link.src_ns, link.dst_ns)]
        # A SIGTERM-ignoring child is SIGKILLed after the timeout.
        stubborn = link.popen(link.src_ns, _python(STUBBORN), stdout=subprocess.PIPE)
        assert stubborn.stdout is not None and stubborn.stdout.readline()
        pids = link.pids
        # nsenter execs the program: the PID recorded is the program's own (what close() signals).
        assert Path(f"/proc/{procs[0].pid}/comm").read_text().strip() == "sleep"
        raise RuntimeError("body failed")
    assert not names & set(leftover_namespaces())
    assert [p.returncode for p in procs] == [-15, -15] and stubborn.returncode == -9
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), pid
    link.close()  # idempotent
    with pytest.raises(NetLabError, match="closed"):
        link.popen(link.src_ns, ["true"])


@pytest.mark.twohost
@needs_root
def test_a_setup_step_failing_half_way_undoes_the_earlier_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _ours()
    made: list[str] = []

    def fail(self: TwoHostLink, side: str, rate: int) -> None:
        made.extend(n for n in (self.src_ns, self.dst_ns) if n in leftover_namespaces())
        raise NetLabError("tc: injected failure")

    monkeypatch.setattr(TwoHostLink, "_shape", fail)
    with pytest.raises(NetLabError, match="injected"):
        TwoHostLink()
    assert len(made) == 2  # both namespaces (and the veth) existed when shaping failed
    assert _ours() == before


@pytest.mark.twohost
@needs_root
def test_a_link_never_closed_is_removed_at_exit() -> None:
    script = (
        "from fph_lab.netlab import TwoHostLink\n"
        "link = TwoHostLink()\n"
        "p = link.popen(link.dst_ns, ['sleep', '60'])\n"
        "print(link.src_ns, link.dst_ns, p.pid, flush=True)\n"
        "raise RuntimeError('test died')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parents[1],
    )
    assert res.returncode == 1 and "test died" in res.stderr, res.stderr
    src, dst, pid = res.stdout.split()
    assert not {src, dst} & set(leftover_namespaces())
    assert not Path(f"/proc/{pid}").exists()


@pytest.mark.twohost
@needs_root
def test_vm_in_a_namespace_runs_there_and_stop_ends_it(
    fake_lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """VM.stop() signals ``self.proc.pid``: with the netns prefix that is still the "QEMU" itself."""
    monkeypatch.setenv("FPH_RUN_DIR", str(tmp_path / "run"))
    with TwoHostLink(LinkConfig(rate_bits_per_s=None)) as link:
        vm = VM(fake_lab, VMConfig(balloon="none", netns=link.src_ns), name="t")
        vm.proc = subprocess.Popen(vm.command(), env=fake_lab.qemu.environ())
        deadline = time.monotonic() + 5
        while Path(f"/proc/{vm.proc.pid}/exe").resolve() != Path(sys.executable).resolve():
            assert time.monotonic() < deadline, "nsenter did not exec the program"
            time.sleep(0.02)
        ns_inode = os.stat(f"{netlab.NETNS_DIR}/{link.src_ns}").st_ino
        assert os.stat(f"/proc/{vm.proc.pid}/ns/net").st_ino == ns_inode
        # only the network is the namespace's: files and cgroup mounts (the vCPU throttle's) are the host's
        assert os.stat(f"/proc/{vm.proc.pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
        assert vm.stop(timeout=0.5) == -15
        assert not Path(f"/proc/{vm.proc.pid}").exists()
