"""Layout rules for the package (issue 32), checked on the source text alone: no module is imported and no model
is loaded, so this runs in well under a second (it carries no `slow` mark and stays in `-m 'not slow'`).

- No import cycles: every import of a qilin_lite module counts, wherever it is written (top level, inside a
  function, under `if TYPE_CHECKING:`). A function-level import only postpones a cycle to the first call; it does
  not remove the two modules' dependence on each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "qilin_lite"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (a package is named by its __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _nearest_module(name: str, known: set[str]) -> str:
    """`name` itself when it is a module of the package, else its longest dotted prefix that is."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return PACKAGE


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports anywhere in its source (relative imports resolved).

    `import a.b` imports `a.b`; `from a import b` imports `a.b` when that is a module, else `a` (b is a name
    defined there).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `.` is the package the module is in: a.b for a.b.c, and a.b itself for a/b/__init__.py
                package = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 >= len(package):
                    raise AssertionError(f"{path}:{node.lineno}: relative import reaches above {PACKAGE}")
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{stem}.{alias.name}"
                targets.append(sub if alias.name != "*" and sub in known else stem)
        else:
            continue
        for target in targets:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue  # the standard library and third-party packages
            hit = _nearest_module(target, known)  # the package itself at least
            if hit != module:
                found.add(hit)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = modules(root)
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a, as module names) per group of modules that import each other."""
    return [_cycle_in(graph, component) for component in tangles(graph)]


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (each module in one reaches every other by
    imports), found by Tarjan's algorithm (iterative, so deep packages need no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return components


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (by name), found breadth-first inside it."""
    start = min(component)
    came_from: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & component):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_cycle_finder_on_a_made_up_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_resolution(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("from .one import f\n")
    (pkg / "sub" / "one.py").write_text(
        "import os\nfrom .. import top\nfrom ..top import X\nfrom . import two\n"
        "def f():\n    from qilin_lite.sub.two import g\n    import qilin_lite.top\n"
    )
    (pkg / "sub" / "two.py").write_text("from . import f\nfrom .. import __name__ as n\n")
    graph = import_graph(pkg)
    assert graph == {
        PACKAGE: set(),
        f"{PACKAGE}.top": set(),
        f"{PACKAGE}.sub": {f"{PACKAGE}.sub.one"},
        f"{PACKAGE}.sub.one": {f"{PACKAGE}.top", f"{PACKAGE}.sub.two"},
        f"{PACKAGE}.sub.two": {f"{PACKAGE}.sub", PACKAGE},
    }
    assert cycles(graph) == [[f"{PACKAGE}.sub", f"{PACKAGE}.sub.one", f"{PACKAGE}.sub.two", f"{PACKAGE}.sub"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20 and f"{PACKAGE}.eval.run" in graph  # the walk found the package
    lines = []
    for component in tangles(graph):
        cycle = _cycle_in(graph, component)
        line = " -> ".join(cycle)
        if len(component) > len(set(cycle)):
            line += f"  (modules importing each other: {', '.join(sorted(component))})"
        lines.append(line)
        print("import cycle: " + line)
    assert not lines, "import cycles (imports anywhere in a module count):\n" + "\n".join(lines)


def test_no_module_is_past_450_lines():
    """nanochat's rule of thumb: a module is read in one sitting; a longer one has found its next file names."""
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 450}
    assert not long, f"split these modules: {long}"


def test_contributing_maps_every_module():
    """CONTRIBUTING.md's map of the package names every module, so a newcomer finds each room from it."""
    text = (ROOT.parent / "CONTRIBUTING.md").read_text(encoding="utf-8")
    missing = [str(path.relative_to(ROOT)) for path in modules().values()
               if path.name not in ("__init__.py", "__main__.py") and path.name not in text]
    assert not missing, f"CONTRIBUTING.md's map does not name: {missing}"
