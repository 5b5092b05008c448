"""The package's import graph, by module: floors (1 = imports nothing of the package), arrows,
arrows that run back up, and circles. Reads imports as text (`ast`), function-level ones included.

    .venv/bin/python scripts/import_graph.py                # the summary and the modules by floor
    .venv/bin/python scripts/import_graph.py --rev 3e700a0  # the same at another commit (git show)
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sources(rev: str | None) -> dict[str, tuple[str, str]]:
    """{module name: (its package, its source)} of mergesearch/ in the working tree or at `rev`."""
    if rev is None:
        paths = sorted(f.relative_to(ROOT).as_posix() for f in (ROOT / "mergesearch").rglob("*.py"))
        read = lambda p: (ROOT / p).read_text()  # noqa: E731
    else:
        paths = subprocess.run(
            ["git", "ls-tree", "-r", "--name-only", rev, "mergesearch"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split()
        read = lambda p: (
            subprocess.run(  # noqa: E731
                ["git", "show", f"{rev}:{p}"], cwd=ROOT, capture_output=True, text=True
            ).stdout
        )
    out = {}
    for p in paths:
        if p.endswith(".py"):
            mod = p[:-3].replace("/", ".")
            package = mod.removesuffix(".__init__") if mod.endswith(".__init__") else mod.rpartition(".")[0]
            out[mod.removesuffix(".__init__")] = (package, read(p))
    return out


def imports(modules: dict[str, tuple[str, str]]) -> dict[str, set[str]]:
    """Arrows: module → the package's modules it imports (a name from a package counts as its
    module when one exists, else the package)."""
    out = {}
    for mod, (package, text) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    if target in modules and target != mod:
                        deps.add(target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules and a.name != mod}
        out[mod] = deps - {"mergesearch"}  # the package's face re-exports nothing the others need
    return out


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """1 + the longest chain of imports below a module (a circle counts as one floor)."""
    comp_of = {m: i for i, c in enumerate(circles(graph)) for m in c}
    memo: dict[str, int] = {}

    def floor(m: str, seen: frozenset) -> int:
        if m in memo:
            return memo[m]
        below = [
            floor(d, seen | {m}) for d in graph[m] if d not in seen and comp_of.get(d, d) != comp_of.get(m, m)
        ]
        memo[m] = 1 + max(below, default=0)
        return memo[m]

    return {m: floor(m, frozenset()) for m in graph}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="a git commit (default: the working tree)")
    args = ap.parse_args()
    mods = sources(args.rev)
    graph = imports(mods)
    fl = floors(graph)
    up = sum(1 for m, ds in graph.items() for d in ds if fl[d] >= fl[m])
    cs = circles(graph)
    print(
        f"{len(graph)} modules, {max(fl.values())} floors, {sum(map(len, graph.values()))} arrows, "
        f"{up} running back up or level, {len(cs)} circle(s)"
    )
    for c in cs:
        print("circle:", " ↔ ".join(c))
    for f in sorted(set(fl.values()), reverse=True):
        names = sorted(m for m in fl if fl[m] == f)
        print(f"floor {f:2d}  " + ", ".join(n.removeprefix("mergesearch.") or "mergesearch" for n in names))


if __name__ == "__main__":
    main()
