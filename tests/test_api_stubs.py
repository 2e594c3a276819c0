"""The committed gRPC stubs are what the pinned generator makes of the committed .proto (CI check)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED_TOOLS = "1.85.1"
FILES = ("fph_pb2.py", "fph_pb2.pyi", "fph_pb2_grpc.py")


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    try:
        tools = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        pytest.fail("grpcio-tools is not installed: pip install -e '.[dev]' (it pins the generator)")
    assert tools == PINNED_TOOLS, f"stubs are generated with grpcio-tools {PINNED_TOOLS}, found {tools}"
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    for name in FILES:
        fresh = (tmp_path / "fph" / "api" / "v1" / name).read_bytes()
        committed = (ROOT / "fph" / "api" / "v1" / name).read_bytes()
        assert fresh == committed, f"fph/api/v1/{name} is stale: run scripts/gen-proto and commit"


def test_stubs_import_as_a_package() -> None:
    from fph.api.v1 import fph_pb2, fph_pb2_grpc

    assert fph_pb2.DESCRIPTOR.package == "fph.api.v1"
    assert {s for s in fph_pb2.DESCRIPTOR.services_by_name} == {
        "VmService",
        "HintingService",
        "MigrationService",
    }
    assert hasattr(fph_pb2_grpc, "add_MigrationServiceServicer_to_server")
