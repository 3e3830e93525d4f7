"""No import circle among sigmarec's modules (read with ``ast``: nothing is imported).

Every import counts, at module level, inside a function or under ``if TYPE_CHECKING:``: an
import that closes a circle there still makes two modules depend on each other's insides, which
is what the layering forbids (a function-level import only hides it from the interpreter).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "sigmarec"


def _modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in (src / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name imported from a package that is a
    submodule counts as that submodule)."""
    modules = _modules(src)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import sigmarec.a.b` names a module's parent
                    t = t.rpartition(".")[0]
                if t.startswith(PACKAGE) and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles among sigmarec modules: " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_checker_finds_a_circle(tmp_path: Path) -> None:
    # Circles closed by a function-level import and by a TYPE_CHECKING one are both found.
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from sigmarec.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from sigmarec import a\n")
    (pkg / "sub" / "d.py").write_text("import sigmarec.c\n")
    (pkg / "e.py").write_text("import sigmarec.sub.d\n")
    g = import_graph(tmp_path)
    assert find_cycles(g) == [["sigmarec.a", "sigmarec.sub.b"]]
    assert g["sigmarec.c"] == {"sigmarec.a"} and g["sigmarec.e"] == {"sigmarec.sub.d"}
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from sigmarec import e\n")
    assert find_cycles(import_graph(tmp_path)) == [
        ["sigmarec.a", "sigmarec.sub.b"], ["sigmarec.c", "sigmarec.e", "sigmarec.sub.d"]]


@pytest.mark.parametrize("module", ["sigmarec.cli_common", "sigmarec.serving.overlay"])
def test_shared_modules_import_no_command(module: str) -> None:
    g = import_graph()
    assert module in g
    assert not any(m == "sigmarec.cli" or ".cli_" in m and m != "sigmarec.cli_common"
                   for m in g[module])
