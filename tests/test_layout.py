"""The code's layout stays as README "How the code is laid out" describes it.

Every import in the package counts, also the ones inside functions: a lazy import that closes
a circle still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import flipsearch

PACKAGE = Path(flipsearch.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a ``from a.b import c`` names a.b, and
    a.b.c when that is a module)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                wanted = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name].update(w for w in wanted if w in files and w != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with one path back to it."""
    found = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for target in sorted(graph[node]):
                if target == start:
                    found.append([*path, start])
                    stack = []
                    break
                if target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c", "a"],
        ["b", "c", "a", "b"],
        ["c", "a", "b", "c"],
    ]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_module_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_the_wings_never_import_each_other():
    graph = import_graph()
    for wing, other in (("backends", "judging"), ("judging", "backends")):
        for module, imports in graph.items():
            if module.startswith(f"flipsearch.{wing}"):
                crossing = {i for i in imports if i.startswith(f"flipsearch.{other}")}
                assert not crossing, f"{module} imports {crossing}"


def test_implementations_import_only_their_wings_contract():
    """An implementation sees its wing's ``_base`` (and its own helpers), never the registry
    at the wing's face nor another implementation, so adding one touches nothing else."""
    allowed = {
        # Its training data, and the refusal judge's reading of an answer as features.
        "flipsearch.judging.classifier": {
            "flipsearch.judging.agreement",
            "flipsearch.judging.refusal",
        },
    }
    graph = import_graph()
    for wing in ("backends", "judging"):
        face = f"flipsearch.{wing}"
        for module, imports in graph.items():
            if not module.startswith(face + ".") or module.endswith("._base"):
                continue
            inside = {i for i in imports if i == face or i.startswith(face + ".")}
            extra = inside - {f"{face}._base"} - allowed.get(module, set())
            assert not extra, f"{module} imports {extra}"


def test_the_faces_load_no_implementation():
    """The registries name their implementations by string; the only one a face imports is
    the wrapper that turns any callable into a judge (it has no dependencies)."""
    graph = import_graph()
    for wing in ("backends", "judging"):
        face = f"flipsearch.{wing}"
        allowed = {f"{face}._base", "flipsearch.errors", "flipsearch.judging.function"}
        assert graph[face] <= allowed, graph[face]
