"""The house rules of src/eplb: dependencies point one way, no import circle, no oversized file."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "eplb"
#: Layer of each area; a module may import only areas of its own layer or below (README "Layout").
LAYER = {"errors": 0, "_atomic": 0, "_io": 0, "_safe_read": 0, "strategies": 0, "_checks": 0, "_counts": 0, "placement": 1, "metrics": 2, "policies": 2,
         "dispatch": 3, "stats": 4, "formats": 4, "datasets": 4, "synthetic": 4, "online": 5, "runtime": 6,
         "sim": 6, "integrations": 7, "offline": 7, "_fuzz": 7, "cli": 8, "__main__": 9}
TORCH_FREE = ("errors", "_atomic", "_counts", "_io", "_safe_read", "strategies", "_checks", "placement", "metrics", "policies", "formats", "online")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(f.read_text())
    return out


def _imports(tree: ast.Module, top_only: bool) -> list[str]:
    nodes = tree.body if top_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def _area(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if parts[0] == "eplb" and len(parts) > 1 else None


def test_no_upward_import():
    bad = []
    for mod, tree in _modules().items():
        a = _area(mod)
        for tgt in _imports(tree, top_only=False):
            b = _area(tgt)
            if a is None or b is None or a == b or b not in LAYER:
                continue
            if LAYER[b] > LAYER[a]:
                bad.append(f"{mod} imports {tgt}")
    assert not bad, bad


def test_policies_and_formats_stay_below_dispatch_runtime_and_stats():
    mods = _modules()
    for mod, tree in mods.items():
        targets = _imports(tree, top_only=False)
        if _area(mod) == "policies":
            assert not [t for t in targets if _area(t) in ("dispatch", "runtime")], mod
        if _area(mod) == "formats":
            assert not [t for t in targets if _area(t) == "stats"], mod
        if _area(mod) in TORCH_FREE:  # at import time (a reader of a torch file may import it when called)
            assert not [t for t in _imports(tree, top_only=True) if t.split(".")[0] == "torch"], mod


def test_no_import_circle():
    """Not even through imports inside functions (the lazy-import workaround for a circle)."""
    mods = _modules()
    graph = {m: {t for t in _imports(tree, top_only=False) if t in mods and t != m} for m, tree in mods.items()}
    # a package's __init__ importing its own submodules is not a circle with them
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not cycles, cycles


#: Known debt, each with its reason; an entry here must shrink, not grow.
OVERSIZED: dict[str, int] = {}


def test_no_source_file_much_over_600_lines():
    big = {}
    for f in PKG.rglob("*.py"):
        name, n = str(f.relative_to(SRC)), len(f.read_text().splitlines())
        if n > OVERSIZED.get(name, 600):
            big[name] = n
    assert not big, big
