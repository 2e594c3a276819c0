"""Shared fixtures. ``lab``: the provisioned QEMU lab (session-wide); ``vm_factory``: lab VMs that are
always torn down, also when a test fails. Real-guest tests carry ``@pytest.mark.guest``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fph_lab.provision import Lab, provision
from fph_lab.vm import VM, VMConfig


@pytest.fixture(scope="session")
def lab() -> Lab:
    """The provisioned lab (QEMU 11.1, kernel, initramfs): paths in ``lab.qemu``, ``lab.kernel``,
    ``lab.initramfs``, ``lab.guest_programs``. Provisions when needed (idempotent, ~0.2 s when done)."""
    return provision(log=lambda _msg: None)


@pytest.fixture
def vm_factory(lab: Lab) -> Iterator[Callable[..., VM]]:
    """``vm = vm_factory(VMConfig(...), name="src")`` starts a VM; every VM is stopped after the test."""
    vms: list[VM] = []

    def make(config: VMConfig | None = None, name: str = "vm", **kwargs: Any) -> VM:
        vm = VM(lab, config or VMConfig(), name=name, **kwargs)
        vms.append(vm)
        vm.start()
        return vm

    yield make
    for vm in vms:
        vm.stop()
