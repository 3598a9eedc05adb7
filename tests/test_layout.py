"""The package layout keeps its shape: no import cycles (function-level imports included), core
never imports the layers above it, and modules stay of one job (bounded size)."""
from __future__ import annotations

import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "adaspec_hf"
MAX_MODULE_LINES = 420  # "roughly 400": a module past this has grown a second job
# lowest first; a package may import only itself and packages listed before it
LAYERS = ["_version", "compat", "machine", "slo", "config", "core", "efficiency", "profiling", "policies", "sim",
          "integrations", "serving", "metrics", "pair", "bench", "cli"]


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("adaspec_hf",) + parts).removesuffix(".__init__")
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        type_only = {id(n) for node in ast.walk(tree)
                     if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
                     for n in ast.walk(node)}  # annotations only: not a runtime edge
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adaspec_hf"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                edges[name].update(subs)
                if len(subs) < len(node.names) and node.module in mods:
                    edges[name].add(node.module)
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name in mods)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(modules()):
        if v not in index:
            visit(v)
    return out


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers_only_import_downwards():
    bad = []
    for src, targets in import_graph().items():
        a = top(src)
        for t in targets:
            b = top(t)
            if a and b and a != b and a in LAYERS and b in LAYERS and LAYERS.index(b) > LAYERS.index(a):
                bad.append(f"{src} -> {t}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_every_package_is_in_a_layer():
    assert {top(m) for m in modules() if top(m)} <= set(LAYERS)


def test_modules_stay_small():
    big = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in big.items() if k > MAX_MODULE_LINES} == {}
