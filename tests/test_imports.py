"""The import graph of src/tuneforge, read with `ast` (nothing is imported): no cycle, and no `_private` name
imported from another package. Helpers used by several layers live below all of their users under public names.

Edges: every `import` / `from ... import` (top-level and inside functions, relative ones resolved), and the hidden
ones behind importlib: a string literal naming a tuneforge module ("tuneforge.x.y" or "tuneforge.x.y:ATTR", as in
the task registry `TASKS`) is an edge from the module that holds it. `import a.b.c` imports a, a.b and a.b.c:
edges to each, except to the importer's own packages (already being imported when it runs); `from a.b import NAME`
is an edge to a.b (or to the module a.b.NAME when it is one). So a module importing a name from its own package's
__init__ is a cycle only when that __init__ imports it back. Imports under `if TYPE_CHECKING:` never run: no edge.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "tuneforge"
MODULE_STRING = re.compile(r"tuneforge(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?")


@dataclass(frozen=True)
class Import:
    line: int
    source: str          # the statement or string, for the failure message
    targets: tuple       # modules the statement imports by name (before their packages are added)
    private: tuple = ()  # `_names` it takes from a module


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
    found = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def packages_of(name: str) -> list[str]:
    """The packages above `name`, outermost first: a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the statements inside `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _logger_names(tree: ast.AST) -> set[int]:
    """ids of the string arguments of logging.getLogger(...): a logger's name is not an import."""
    return {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "getLogger" for arg in node.args}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import the module `name` makes, importlib's included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped, loggers = _type_checking_blocks(tree), _logger_names(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == ROOT:
                    found.append(Import(node.lineno, f"import {alias.name}", (alias.name,),
                                        tuple(p for p in alias.name.split(".") if is_private(p))))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != ROOT:
                continue
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            private = [p for p in base.split(".") if is_private(p)] + [a.name for a in node.names if is_private(a.name)]
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            found.append(Import(node.lineno, text, tuple(dict.fromkeys(targets)), tuple(private)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in loggers:
            if MODULE_STRING.fullmatch(node.value) and node.value.partition(":")[0] in modules:
                found.append(Import(node.lineno, repr(node.value), (node.value.partition(":")[0],)))
    return found


def import_graph(src: Path = SRC) -> tuple[dict[str, dict[str, Import]], dict[str, list[Import]]]:
    """(module -> {imported module: the first statement importing it}, module -> its imports)."""
    modules = module_files(src)
    graph: dict[str, dict[str, Import]] = {}
    statements = {}
    for name, path in modules.items():
        statements[name] = imports_of(name, path, modules)
        own = set(packages_of(name)) | {name}
        edges: dict[str, Import] = {}
        for imp in statements[name]:
            for target in imp.targets:
                # the target's packages run first, unless they are the importer's own (already running)
                for module in [*packages_of(target), target]:
                    if module in modules and module != name and (module not in own or module == target):
                        edges.setdefault(module, imp)
        graph[name] = edges
    _behaviour_edges(graph, modules)
    return graph, statements


def _behaviour_edges(graph: dict[str, dict[str, Import]], modules: dict[str, Path]) -> None:
    """tasks/behaviour.py imports each task's behaviour by convention, `<the spec's package>.task`, not by a string
    literal: those edges are added here from the TASKS entries, so a cycle through them is seen too."""
    loader, registry = f"{ROOT}.tasks.behaviour", modules.get(f"{ROOT}.tasks")
    if loader not in graph or registry is None:
        return
    tree = ast.parse(registry.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict) \
                and "TASKS" in ast.unparse(node.targets[0] if isinstance(node, ast.Assign) else node.target):
            for value in node.value.values:
                target = value.value.partition(":")[0].rpartition(".")[0] + ".task"
                if target in modules:
                    graph[loader].setdefault(target, Import(0, f"behaviour_module(): {target}", (target,)))


def find_cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The shortest cycle through each module that is on one (Tarjan's strongly connected components, then the
    shortest path back to each of their modules), each cycle once."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles, seen = [], set()
    for component in components:
        for start in sorted(component):  # the shortest cycle through each module: every one named is a real loop
            cycle = [start, *_path_back(graph, component, start)]
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def _path_back(graph: dict[str, dict], component: set[str], start: str) -> list[str]:
    """The shortest path from start back to start inside the component (breadth first), start excluded."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w in component and w not in previous:
                    previous[w] = v
                    nxt.append(w)
        if start in previous:
            path, v = [start], previous[start]
            while v != start:
                path.append(v)
                v = previous[v]
            return path[::-1]
        frontier = nxt
    raise AssertionError(f"no path back to {start} in {sorted(component)}")


def describe(graph: dict[str, dict[str, Import]], cycle: list[str]) -> str:
    steps = [f"  {a} (line {graph[a][b].line}: {graph[a][b].source}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n".join([" -> ".join(cycle), *steps])


def private_imports(src: Path = SRC) -> list[str]:
    """`file:line: statement (names)` for each `_private` name a module imports from another package."""
    modules = module_files(src)
    _, statements = import_graph(src)
    offences = []
    for name, imports in statements.items():
        package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for imp in imports:
            for target in imp.targets:
                home = target if modules[target].name == "__init__.py" else target.rpartition(".")[0]
                if imp.private and home != package:
                    offences.append(f"{modules[name].relative_to(src)}:{imp.line}: {imp.source} ({', '.join(imp.private)})")
    return sorted(set(offences))


# ---------------------------------------------------------------------------------------------------- the tests

FAKE = {  # a package that holds each kind of import the reader must see, and two cycles
    "__init__.py": "",
    "low.py": "X = 1\n_hidden = 2\n",
    "reg/__init__.py": 'ENTRIES = {"thing": "tuneforge.reg.plugin:THING"}\n',         # importlib's hidden edge
    "reg/plugin.py": "def run():\n    from ..top import main\n",                        # function-local, relative
    "top.py": "import tuneforge.reg\nfrom tuneforge.low import X\n\ndef main():\n    pass\n",
    "typed.py": ("import logging\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tuneforge.top import main\n"
                 "log = logging.getLogger('tuneforge.top')\n"),                           # neither is an import
    "sub/__init__.py": "from tuneforge.sub.child import Y\n",
    "sub/child.py": "from tuneforge.sub.sibling import Z\nY = 1\n",                   # its own package: no edge
    "sub/sibling.py": "from tuneforge.low import _hidden\nZ = 2\n",                   # a private name of another package
    "other.py": "from tuneforge.sub.child import Y\n",                                 # runs sub/__init__.py first
    "loop/__init__.py": "from tuneforge.loop.a import A\nB = 1\n",
    "loop/a.py": "from tuneforge.loop import B\nA = 1\n",                             # its own __init__, which imports it
}


def test_the_reader_sees_every_kind_of_import(tmp_path):
    for rel, text in FAKE.items():
        (tmp_path / ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ROOT / rel).write_text(text)
    graph, _ = import_graph(tmp_path)
    assert "tuneforge.reg.plugin" in graph["tuneforge.reg"]
    assert "tuneforge.top" in graph["tuneforge.reg.plugin"]
    assert {"tuneforge.reg", "tuneforge.low"} <= set(graph["tuneforge.top"])
    assert graph["tuneforge.typed"] == {}
    assert set(graph["tuneforge.sub.child"]) == {"tuneforge.sub.sibling"}
    assert set(graph["tuneforge.other"]) == {"tuneforge.sub", "tuneforge.sub.child"}
    assert sorted(sorted(c[:-1]) for c in find_cycles(graph)) == [
        ["tuneforge.loop", "tuneforge.loop.a"], ["tuneforge.reg", "tuneforge.reg.plugin", "tuneforge.top"]]
    assert [o.split(":")[0] for o in private_imports(tmp_path)] == [str(Path(ROOT, "sub", "sibling.py"))]


def test_the_registry_entries_are_edges():
    """Each `TASKS` entry of tasks/__init__.py names a module, and the graph has the registry's edge to it."""
    graph, _ = import_graph()
    registry = ast.parse((SRC / ROOT / "tasks" / "__init__.py").read_text(encoding="utf-8"))
    entries = [node.value for node in ast.walk(registry) if isinstance(node, (ast.Assign, ast.AnnAssign))
               and "TASKS" in ast.unparse(node.targets[0] if isinstance(node, ast.Assign) else node.target)]
    assert entries and isinstance(entries[0], ast.Dict), "tasks/__init__.py has no TASKS dict"
    for value in entries[0].values:
        module = value.value.partition(":")[0]
        assert module in graph, f"TASKS entry {value.value!r} names no module under src/"
        assert module in graph["tuneforge.tasks"], f"the registry's entry {value.value!r} is not an edge"
        behaviour = module.rpartition(".")[0] + ".task"
        assert behaviour in graph["tuneforge.tasks.behaviour"], f"{behaviour} (the loader's import) is not an edge"


def test_no_import_cycle():
    graph, _ = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, (f"{len(cycles)} import cycle(s) in src/tuneforge (move what both sides need below both):\n"
                        + "\n".join(describe(graph, c) for c in cycles))


def test_no_private_name_imported_across_packages():
    """A module that needs another package's `_name` is asking for that name to be public, or to move."""
    offences = private_imports()
    assert not offences, "private names imported across packages:\n" + "\n".join(offences)


def test_named_cycles_are_gone():
    """The three cycles of issue 20, by name: the report helpers and the serving seam."""
    graph, _ = import_graph()
    assert "tuneforge.evaluation.report" not in graph["tuneforge.tuning.report"]
    for task in ("classification", "token_classification", "causal_lm"):
        assert "tuneforge.evaluation.report" not in graph[f"tuneforge.tasks.{task}.report"]
    assert not [m for m in graph if m.startswith("tuneforge.tasks.") and "tuneforge.serving.app" in graph[m]]
    assert not [m for m in graph["tuneforge.html"] if m != "tuneforge.errors"], "html.py is a leaf below every report"
