"""The layering of DESIGN.md section 1: imports point one way only.

    experiments -> asyncnn (the face) -> runtime -> math -> backends

Every import in a file counts, at module level or inside a function, except those under
``if TYPE_CHECKING:`` (annotations only, never executed). Two leaf modules, ``asyncnn._errors``
and ``asyncnn._version``, import nothing of asyncnn and may be used by every layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEAVES = {"asyncnn._errors", "asyncnn._version"}
# Benchmarks of private machinery that has no public face: the wire protocol between workers;
# GPU kernels switched on and off against the code they replaced.
PRIVATE_BENCHMARKS = {"bench_transport.py", "bench_launch_cuts.py"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "backends":
        parts = ["asyncnn", "backends", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str | None:
    """The layer of an asyncnn module: backends, math, runtime or face (None: not asyncnn)."""
    if module in LEAVES:
        return "leaf"
    parts = module.split(".")
    if parts[0] != "asyncnn":
        return None
    if len(parts) > 1 and parts[1] == "backends":
        return "backends"
    if len(parts) > 1 and parts[1] == "_math":
        return "math"
    if len(parts) > 1 and parts[1] == "_runtime":
        return "runtime"
    return "face"


# what each layer may import (besides itself and the leaves)
ALLOWED = {
    "backends": {"backends"},
    "math": {"math", "backends"},
    "runtime": {"runtime", "math", "backends"},
    "face": {"face", "runtime", "math", "backends"},
}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every executed import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            for child in getattr(node, "orelse", []):
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from asyncnn import ops" imports the module asyncnn.ops
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub) else mod))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_module(name: str) -> bool:
    parts = name.split(".")
    if parts[:2] == ["asyncnn", "backends"]:
        base = ROOT / "backends" / Path(*parts[2:]) if parts[2:] else ROOT / "backends"
    elif parts[0] == "asyncnn":
        base = ROOT / Path(*parts)
    else:
        return False
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def package_files() -> list[Path]:
    return sorted((ROOT / "asyncnn").rglob("*.py")) + sorted((ROOT / "backends").rglob("*.py"))


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    own = layer(module_name(path))
    assert own is not None
    if own == "leaf":
        bad = [(n, m) for n, m in imports(path) if layer(m) is not None]
    else:
        bad = [
            (n, m)
            for n, m in imports(path)
            if layer(m) not in (None, "leaf") and layer(m) not in ALLOWED[own]
        ]
    assert not bad, f"{path.relative_to(ROOT)} ({own}) imports upward: {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_experiments_use_only_the_public_api(path: Path) -> None:
    if path.name in PRIVATE_BENCHMARKS:
        pytest.skip("benchmarks private machinery with no public face (see PRIVATE_BENCHMARKS)")
    private = [
        (n, m)
        for n, m in imports(path)
        if m.startswith("asyncnn") and any(p.startswith("_") for p in m.split("."))
    ]
    assert not private, f"experiments/{path.name} imports private modules: {private}"


def runtime_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "asyncnn" / "_runtime").glob("*.py"))
    graph: dict[str, set[str]] = {}
    for f in files:
        name = module_name(f)
        graph[name] = {m for _, m in imports(f) if m.startswith("asyncnn._runtime.")} - {name}
    return graph


def test_no_import_circle_among_the_runtime_files() -> None:
    graph = runtime_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # the test above can fail: an upward import in a math file is found
    bad = ROOT / "asyncnn" / "_math" / "_layering_probe.py"
    bad.write_text("def f():\n    from asyncnn._runtime import _run\n")
    try:
        assert imports(bad) == [(2, "asyncnn._runtime._run")]
        assert layer("asyncnn._runtime._run") not in ALLOWED["math"]
    finally:
        bad.unlink()


def _folder_imports(path: Path) -> list[tuple[int, str]]:
    """Imports of ``backends`` by its folder's name in ``path``."""
    return [(n, m) for n, m in imports(path) if m == "backends" or m.startswith("backends.")]


def test_tests_and_experiments_import_the_backends_only_as_asyncnn_backends() -> None:
    # the folder backends/ is the package asyncnn.backends; imported as "backends" (the
    # repository's root is on the path in tests) it is a second copy of every module, one the
    # runtime never calls: a test that patches it changes nothing (test_fused_nn.py did, and
    # compared the fused kernels with themselves, until 2026-12-05)
    files = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "experiments").glob("*.py"))
    bad = {str(p.relative_to(ROOT)): found for p in files if (found := _folder_imports(p))}
    assert not bad, f"import asyncnn.backends (or from asyncnn.backends ...) instead: {bad}"


def test_the_folder_import_check_sees_one() -> None:
    probe = ROOT / "tests" / "_layering_probe_folder.py"
    probe.write_text("def f():\n    from backends._cupy import CupyBackend\n")
    try:
        assert _folder_imports(probe) == [(2, "backends._cupy")]
    finally:
        probe.unlink()
