"""The import structure of stdit/ and parallel/, read from the source with `ast` (nothing is imported):

- parallel/ never imports stdit (it is the generic layer: torch, megatron-core, DeepSpeed);
- no import cycle among the project's modules, counting every import statement, function-local ones included;
- stdit/models/ never imports torch.distributed, megatron, deepspeed or parallel (models are plain torch);
- layers: stdit/cli.py > stdit/commands/ > libraries; nothing imports a layer above its own.

`python tests/test_structure.py` prints the cycles and upward imports it finds and the line counts of the tree.
"""
from __future__ import annotations

import ast
import statistics
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stdit", "parallel")


def module_files() -> dict[str, Path]:
    """Module name -> file, for every .py under the project's packages (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_main_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` -- its body runs only when the file is the program (as module __main__), never
    when the module is imported, so its imports are not the module's (`python -m stdit.train` calls stdit.cli)."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def imported_names(name: str, path: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of everything a module imports, anywhere in it (function-local imports too; not under
    a top-level `if __name__ == "__main__":`). `from a.b import c` gives a.b.c (which resolve() maps to a.b when c
    is not a module); relative imports are made absolute."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    tree.body = [stmt for stmt in tree.body if not _is_main_guard(stmt)]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out += [(f"{base}.{a.name}" if a.name != "*" else base, node.lineno) for a in node.names]
    return out


def resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    """The project module a dotted import name lands in (its longest prefix that is a module), or None."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, list[tuple[str, int]]]]:
    """(project edges: module -> {imported project module: first line}, every imported name per module)."""
    modules = module_files()
    edges, names = {}, {}
    for mod, path in modules.items():
        names[mod] = imported_names(mod, path)
        edges[mod] = {}
        for dotted, line in names[mod]:
            target = resolve(dotted, modules)
            if target is not None and target != mod:
                edges[mod].setdefault(target, line)
    return edges, names


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components, those with more than one module (the import cycles)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def cycle_through(start: str, comp: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest import cycle start -> ... -> start inside one component (breadth-first)."""
    members, came_from, queue = set(comp), {}, deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if w in members and w not in came_from:
                came_from[w] = v
                queue.append(w)
    return [start]


def describe_cycles(edges: dict[str, dict[str, int]]) -> list[str]:
    """One line per cycle: its modules, then one concrete loop with the file:line of each import."""
    modules = module_files()
    lines = []
    for comp in strongly_connected(edges):
        loop = cycle_through(comp[0], comp, edges)
        steps = " -> ".join(f"{b} ({modules[a].relative_to(ROOT)}:{edges[a][b]})" for a, b in zip(loop, loop[1:]))
        lines.append(f"cycle of {len(comp)} modules {comp}: {loop[0]} -> {steps}")
    return lines


def layer(mod: str) -> int:
    """0: libraries, 1: stdit.commands, 2: stdit.cli."""
    if mod == "stdit.cli":
        return 2
    return 1 if mod == "stdit.commands" or mod.startswith("stdit.commands.") else 0


def _starts(dotted: str, prefixes) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)


def violations(prefix: str, forbidden, names: dict[str, list[tuple[str, int]]]) -> list[str]:
    """`file:line imports X` for every module under `prefix` importing a name under one of `forbidden`."""
    modules = module_files()
    return [f"{modules[m].relative_to(ROOT)}:{line} imports {dotted}" for m in sorted(names) if _starts(m, [prefix])
            for dotted, line in names[m] if _starts(dotted, forbidden)]


def upward_imports(edges: dict[str, dict[str, int]]) -> list[str]:
    """Imports of a higher layer (cli > commands > libraries) from a lower one."""
    modules = module_files()
    return [f"{modules[a].relative_to(ROOT)}:{line} imports {b} (a layer above it)" for a in sorted(edges)
            for b, line in sorted(edges[a].items()) if layer(b) > layer(a)]


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------

def test_the_graph_sees_every_kind_of_import():
    edges, _ = import_graph()
    assert "stdit.config" in edges["stdit.estimate"]            # from stdit.config import ...
    assert "stdit.grid" in edges["stdit.models.vae"]            # from stdit import grid (a module)
    assert "stdit.commands.plan" in edges["stdit.cli"]          # function-local: from stdit.commands import plan
    assert "stdit.models.vae" in edges["stdit.estimate"]        # function-local: from stdit.models.vae import ...


def test_cycle_finder_on_a_made_up_graph():
    edges = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"e": 1}}
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert cycle_through("a", ["a", "b", "c"], edges) == ["a", "b", "c", "a"]


def test_parallel_never_imports_stdit():
    _, names = import_graph()
    found = violations("parallel", ["stdit"], names)
    assert not found, "parallel/ is the generic layer and must not import stdit:\n" + "\n".join(found)


def test_no_import_cycles():
    edges, _ = import_graph()
    found = describe_cycles(edges)
    assert not found, "import cycles (break them by moving code, not with function-local imports):\n" + "\n".join(found)


def test_models_are_plain_torch():
    _, names = import_graph()
    found = violations("stdit.models", ["torch.distributed", "megatron", "deepspeed", "parallel"], names)
    assert not found, "stdit/models must not import distributed code:\n" + "\n".join(found)


def test_libraries_never_import_commands_or_cli():
    edges, _ = import_graph()
    found = upward_imports(edges)
    assert not found, "layers are cli > commands > libraries; these import upward:\n" + "\n".join(found)


# ----------------------------------------------------------------------------------------------------------
# Report: python tests/test_structure.py
# ----------------------------------------------------------------------------------------------------------

def test_files_stay_small():
    """House rule (DESIGN.md section 6, issue 12): no source file over 600 lines, the median under 250."""
    counts = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in module_files().values()}
    big = {path: n for path, n in counts.items() if n > 600}
    assert not big, f"split these files (over 600 lines): {big}"
    assert statistics.median(counts.values()) < 250, f"median file length {statistics.median(counts.values())}"


def report() -> str:
    edges, names = import_graph()
    modules = module_files()
    out = [f"{len(modules)} modules, {sum(len(e) for e in edges.values())} project imports"]
    for title, found in (("cycles", describe_cycles(edges)), ("upward imports", upward_imports(edges)),
                         ("parallel -> stdit", violations("parallel", ["stdit"], names)),
                         ("models -> distributed", violations("stdit.models", ["torch.distributed", "megatron",
                                                                               "deepspeed", "parallel"], names))):
        out.append(f"\n{title}: {len(found) or 'none'}")
        out += [f"  {line}" for line in found]
    counts = {path.relative_to(ROOT): len(path.read_text().splitlines()) for path in modules.values()}
    out.append("\nlines per file:")
    out += [f"  {path}: {n}" for path, n in sorted(counts.items())]
    out.append(f"{len(counts)} files, {sum(counts.values())} lines; median {statistics.median(counts.values()):g}, "
               f"max {max(counts.values())} ({max(counts, key=counts.get)})")
    return "\n".join(out)


if __name__ == "__main__":
    print(report())
