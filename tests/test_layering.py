"""The package's shape: no import cycles, the runtime package never imports the lab, every module imports on
its own, and the client side of the CLI stays light (no numba, no lab).

The graph is read from the source (module-level and function-level ``import`` statements alike), so a lazy
import inside a function cannot hide a cycle or a forbidden dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fph", "fph_lab")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``path`` imports (``from a.b import c`` counts a.b.c if that is a module)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, name, known) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            # a package's __init__ re-exporting its own modules is not a cycle of the design
            if w.startswith(v + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_runtime_package_never_imports_the_lab() -> None:
    bad = {m: sorted(d for d in deps if d.startswith("fph_lab")) for m, deps in import_graph().items()}
    assert {m: d for m, d in bad.items() if m.startswith("fph.") and d} == {}


def test_virtio_does_not_import_vhost_user() -> None:
    graph = import_graph()
    assert {
        m: sorted(d)
        for m, d in graph.items()
        if m.startswith("fph.virtio") and any(x.startswith("fph.vhost_user") for x in d)
    } == {}


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m.startswith("fph")))
def test_module_imports_alone(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=120, capture_output=True)


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, timeout=60, capture_output=True, text=True
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["vm", "list", "--help"], ["status", "--help"]],
)
def test_cli_client_commands_stay_light(argv: list[str]) -> None:
    code = f"import sys\nfrom fph.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    loaded = _loaded_after(code)
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("numba", "llvmlite", "fph_lab", "numpy"))
    assert heavy == []
