"""The layering rule of the package, checked: ``python -m pipeline.tools.import_graph``.

Layers, lowest first; a module may import from its own layer and the layers
below it, never from a layer above::

    errors, config, host, runtime, plots  <  data  <  store  <  encode  <  model
        <  training  <  eval  <  runs  <  sweep, bench, demo, serve  <  api (pipeline/__init__, pipeline/api)

Every import counts, the ones inside functions too. Three checks: no import
cycle between modules, no import from a layer above, and no ``_private`` name
imported from another module (a private name is its module's own business).
Exit code 1 and one line per violation when any is found.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]

LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.errors", "pipeline.config", "pipeline.host", "pipeline.runtime", "pipeline.plots"),
    ("pipeline.data",),
    ("pipeline.store",),
    ("pipeline.encode",),
    ("pipeline.model",),
    ("pipeline.training",),
    ("pipeline.eval",),
    ("pipeline.runs",),
    ("pipeline.sweep", "pipeline.bench", "pipeline.demo", "pipeline.serve"),
    ("pipeline.api", "pipeline"),
    ("pipeline.tools",),
)


def layer_of(module: str) -> int:
    """Index of the longest layer prefix that names ``module`` (``pipeline`` itself is the API)."""
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank < 0:
        raise ValueError(f"module {module} is in no layer")
    return rank


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    names: tuple[str, ...]
    line: int


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def edges_of(path: Path, known: set[str], package: Path = PACKAGE) -> list[Edge]:
    """Every import of a pipeline module in ``path``, at any depth."""
    source = module_name(path, package)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("pipeline"):
                continue
            names = tuple(a.name for a in node.names)
            # `from pipeline.x import y` may name a submodule y rather than an attribute.
            for name in names:
                target = f"{node.module}.{name}"
                if target in known:
                    out.append(Edge(source, target, (), node.lineno))
                else:
                    out.append(Edge(source, node.module, (name,), node.lineno))
        elif isinstance(node, ast.Import):
            out += [Edge(source, a.name, (), node.lineno) for a in node.names if a.name.startswith("pipeline")]
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a closed path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


def check(package: Path = PACKAGE) -> list[str]:
    """Violations of the layering rule, one line each (empty when the package follows it)."""
    files = sorted(package.rglob("*.py"))
    known = {module_name(f, package) for f in files}
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for path in files:
        for edge in edges_of(path, known, package):
            if edge.target not in known:
                problems.append(f"{path}:{edge.line}: imports unknown module {edge.target}")
                continue
            if edge.target == edge.source:
                continue
            # A package's __init__ importing its own submodules is not an edge that can cycle upward.
            graph.setdefault(edge.source, set()).add(edge.target)
            if layer_of(edge.target) > layer_of(edge.source):
                problems.append(f"{path}:{edge.line}: {edge.source} (layer {layer_of(edge.source)}) imports "
                                f"{edge.target} (layer {layer_of(edge.target)}), a layer above it")
            private = [n for n in edge.names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{path}:{edge.line}: {edge.source} imports private {', '.join(private)} "
                                f"from {edge.target}")
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def main() -> int:
    problems = check()
    for line in problems:
        print(line)
    if not problems:
        print(f"import graph of {PACKAGE.name}: no cycle, no import from a layer above, no private name imported")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
