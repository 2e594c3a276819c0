"""Provisioning logic that needs no network: stamps read back equal (else every run re-provisions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fph_lab.provision import QEMU_ACCEPT, QEMU_SOURCES, QemuSource, _source_stamp, _stamp_ok, _write_stamp


@pytest.mark.parametrize("src", QEMU_SOURCES, ids=lambda s: s.name)
def test_qemu_source_stamp_survives_json(src: QemuSource, tmp_path: Path) -> None:
    stamp = tmp_path / "qemu.json"
    key = _source_stamp(src)
    _write_stamp(stamp, key)
    assert json.loads(stamp.read_text()) == key
    assert _stamp_ok(stamp, key)


def test_only_11_1_is_accepted() -> None:
    assert QEMU_ACCEPT.match("11.1.2") and QEMU_ACCEPT.match("11.1.3")
    for v in ("11.2.0", "11.10.1", "10.2.0", "7.2.22"):
        assert not QEMU_ACCEPT.match(v), v
