"""The import graph of pruneviz/, read from the source with ast: no cycles, no private names across modules.

Imports at any depth count (a function-level import is still an arrow). A private name is one that starts with an
underscore; importing one from another module couples to what that module may change freely.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "pruneviz"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module a (possibly relative) ``from`` import names."""
    if level == 0:
        return target or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(path: pathlib.Path, modules: set[str]) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import of ``path`` that lands inside pruneviz."""
    current, is_pkg = module_name(path), path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "pruneviz"]
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(current, is_pkg, node.level, node.module)
            if mod.split(".")[0] != "pruneviz":
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.append((sub, None) if sub in modules else (mod, alias.name))
    return found


def graph() -> tuple[dict[str, set[str]], list[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges, private = {m: set() for m in modules}, []
    for f in files:
        me = module_name(f)
        for mod, name in imports_of(f, modules):
            if mod in modules and mod != me:
                edges[me].add(mod)
            if name and name.startswith("_") and not name.startswith("__"):
                private.append(f"{me} imports {name} from {mod}")
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative DFS with colours)."""
    colour, parent = {m: 0 for m in edges}, {}
    for start in sorted(edges):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(edges[start])))]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
            elif colour[child] == 1:
                cycle, cur = [child], node
                while cur != child:
                    cycle.append(cur)
                    cur = parent[cur]
                return [child] + cycle[1:][::-1] + [child]
            elif colour[child] == 0:
                colour[child], parent[child] = 1, node
                stack.append((child, iter(sorted(edges[child]))))
    return None


def test_the_package_imports_have_no_cycle():
    edges, _ = graph()
    # a package's __init__ that imports its own submodules (the criteria auto-loader) is not a cycle of code
    for m in edges:
        edges[m] = {t for t in edges[m] if not (m.startswith(t + ".") and (PKG.parent / t.replace(".", "/")).is_dir())}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_private_name_of_another():
    _, private = graph()
    assert private == []


def test_the_core_never_imports_the_ui():
    edges, _ = graph()
    core = [m for m in edges if not m.startswith("pruneviz.ui") and m not in ("pruneviz.cli", "pruneviz.__main__")]
    assert [(m, t) for m in core for t in edges[m] if t.startswith("pruneviz.ui") or t == "pruneviz.cli"] == []


def test_the_checker_finds_a_cycle_and_a_private_import(tmp_path):
    """The checker itself can fail: a two-module cycle and a private import are caught."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) in (["a", "b", "a"], ["b", "a", "b"])
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    src = tmp_path / "pruneviz" / "x.py"
    src.parent.mkdir()
    src.write_text("from .y import _hidden, shown\nimport pruneviz.z\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = imports_of(src, {"pruneviz.x", "pruneviz.y", "pruneviz.z"})
    finally:
        ROOT = saved
    assert ("pruneviz.y", "_hidden") in found and ("pruneviz.z", None) in found


@pytest.mark.parametrize("low, high", [("pruneviz.offload", "pruneviz.loading"),
                                       ("pruneviz.plan", "pruneviz.importance"),
                                       ("pruneviz.allocate", "pruneviz.criteria.slimgpt"),
                                       ("pruneviz.surgery", "pruneviz.criteria")])
def test_lower_layers_do_not_reach_up(low, high):
    edges, _ = graph()
    assert not any(t == high or t.startswith(high + ".") for t in edges[low]), f"{low} imports {high}"
