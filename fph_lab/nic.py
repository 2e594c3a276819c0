"""A guest NIC that receives host traffic: QEMU user networking with a forwarded UDP port, and bursts to it.

Packets reach the guest by device DMA (QEMU writes them into receive buffers the guest posted), the writes
the TCG write log does not see. The destination of a migration gets the same NIC without the forwarded port
(the source's QEMU holds it).
"""

from __future__ import annotations

import socket
import threading

DEVICE = ("-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56")
GUEST_UP = "ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up"
PAYLOAD = bytes(range(256)) * 5


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def source_nic(port: int) -> tuple[str, ...]:
    return ("-netdev", f"user,id=n0,hostfwd=udp:127.0.0.1:{port}-:9", *DEVICE)


def destination_nic() -> tuple[str, ...]:
    return ("-netdev", "user,id=n0", *DEVICE)


def rx_packets(proc_net_dev_line: str) -> int:
    """eth0's received packets from its /proc/net/dev line."""
    return int(proc_net_dev_line.split("eth0:", 1)[1].split()[1])


class UdpBursts:
    """Bursts of ``burst`` packets to the forwarded port every ``pause_s``: between bursts the guest's posted
    buffers wait, zeroed, for the next packets. A context manager; the thread ends on exit."""

    def __init__(self, port: int, burst: int = 200, pause_s: float = 0.3) -> None:
        self.port, self.burst, self.pause_s = port, burst, pause_s
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-bursts", daemon=True)

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while not self._stop.is_set():
                for _ in range(self.burst):
                    s.sendto(PAYLOAD, ("127.0.0.1", self.port))
                    self.sent += 1
                self._stop.wait(self.pause_s)

    def __enter__(self) -> UdpBursts:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
