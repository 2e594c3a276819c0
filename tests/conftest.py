"""Shared fixtures. ``lab``: the provisioned QEMU lab (session-wide); ``vm_factory``: lab VMs that are
always torn down, also when a test fails; ``receiver``: fph's balloon on a thread; ``fph_vm``: a lab VM
booted with fph's balloon on ``balloon_socket``; ``ram``: guest RAM for the fake front-end
(tests/fake_frontend.py); ``shm_files``: sparse RAM files. Real-guest tests carry ``@pytest.mark.guest``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fph.hint_receiver import ThreadedHintReceiver
from fph_lab.provision import Lab, provision
from fph_lab.vm import VM, VMConfig
from tests.fake_frontend import GuestRam, MiB


@pytest.fixture(scope="session")
def lab() -> Lab:
    """The provisioned lab (QEMU 11.1, kernel, initramfs): paths in ``lab.qemu``, ``lab.kernel``,
    ``lab.initramfs``, ``lab.guest_programs``. Provisions when needed (idempotent, ~0.2 s when done)."""
    return provision(log=lambda _msg: None)


@pytest.fixture
def vm_factory(lab: Lab) -> Iterator[Callable[..., VM]]:
    """``vm = vm_factory(VMConfig(...), name="src")`` starts a VM (``vm_class``: a subclass of VM); every
    VM is stopped after the test."""
    vms: list[VM] = []

    def make(config: VMConfig | None = None, name: str = "vm", vm_class: type[VM] = VM, **kwargs: Any) -> VM:
        vm = vm_class(lab, config or VMConfig(), name=name, **kwargs)
        vms.append(vm)
        vm.start()
        return vm

    yield make
    for vm in vms:
        vm.stop()


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[ThreadedHintReceiver]:
    """fph's balloon on an event-loop thread of its own; closed after the test, with the guests given
    the module's ``RECEIVER_CLOSE_S`` (default 2 s) to read DONE."""
    rx = ThreadedHintReceiver()
    yield rx
    rx.close(timeout=getattr(request.module, "RECEIVER_CLOSE_S", 2.0))


@pytest.fixture
def balloon_socket(tmp_path: Path) -> str:
    """The vhost-user socket a test's fph balloon listens on (serve it before ``fph_vm`` boots)."""
    return str(tmp_path / "vu.sock")


@pytest.fixture
def fph_vm(vm_factory: Callable[..., VM], balloon_socket: str) -> Callable[..., VM]:
    """``vm = fph_vm("name")``: a lab VM whose virtio-balloon is fph's vhost-user back-end on
    ``balloon_socket`` (``ctl = receiver.add_vm(balloon_socket)`` first), booted to the guest's ready
    line; stopped after the test."""

    def boot(
        name: str,
        *,
        mem_mib: int = 1024,
        vm_class: type[VM] = VM,
        ready_s: float = 120,
        balloon_queues: int = 4,
    ) -> VM:
        config = VMConfig(
            mem_mib=mem_mib, balloon="fph", vhost_user_socket=balloon_socket, balloon_queues=balloon_queues
        )
        vm = vm_factory(config, name=name, vm_class=vm_class)
        vm.wait_ready(ready_s)
        return vm

    return boot


@pytest.fixture
def ram(request: pytest.FixtureRequest) -> Iterator[GuestRam]:
    """Guest RAM for the fake front-end (tests/fake_frontend.py): 64 MiB above 4 GiB, or the
    ``GUEST_RAM = (size, gpa)`` of the test's module."""
    size, gpa = getattr(request.module, "GUEST_RAM", (64 * MiB, 0x1_0000_0000))
    with GuestRam(size, gpa=gpa) as r:
        yield r


@pytest.fixture
def shm_files(tmp_path: Path) -> Iterator[Callable[..., list[Path]]]:
    """``src, dst = shm_files(size, "src", "dst")``: sparse files of ``size`` bytes in /dev/shm (guest RAM
    files: in RAM, not on disk; in ``tmp_path`` where /dev/shm is not writable), removed after the test."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    made: list[Path] = []

    def make(size: int, *names: str) -> list[Path]:
        paths = [base / f"fph-test-{name}-{os.getpid()}.ram" for name in names]
        for p in paths:
            made.append(p)
            with open(p, "wb") as f:
                f.truncate(size)
        return paths

    yield make
    for p in made:
        p.unlink(missing_ok=True)
