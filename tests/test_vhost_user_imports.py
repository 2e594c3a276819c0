"""Every module of the vhost-user/virtio stack imports on its own (fph.virtio raises fph.vhost_user errors and
fph.vhost_user uses fph.virtio: an eager package import would be circular for some entry points)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "fph.virtio.memory",
    "fph.virtio.chain",
    "fph.virtio.queue",
    "fph.virtio.mock",
    "fph.vhost_user",
    "fph.vhost_user.errors",
    "fph.vhost_user.message",
    "fph.vhost_user.vring",
    "fph.vhost_user.backend",
    "fph.vhost_user.handler",
    "fph.vhost_user.connection",
    "fph.vhost_user.server",
    "fph.hint_receiver",
]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=60, capture_output=True)


def test_lazy_package_names() -> None:
    import fph.vhost_user as vu

    assert vu.VhostUserServer.__name__ == "VhostUserServer"
    assert set(vu.__all__) <= set(dir(vu)) | set(vu._LAZY)
    with pytest.raises(AttributeError):
        _ = vu.NoSuchThing  # type: ignore[attr-defined]
