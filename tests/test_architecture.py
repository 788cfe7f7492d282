"""
The layout of docs/architecture.md holds: no import cycle in focal_det (imports inside functions
included), every import goes to the importer's layer or a lower one (the doc's table), and the
doc's tree lists exactly the package's modules.

Imports are read with ``ast`` from every module, relative ones resolved. Importing ``a.b.c``
also runs the ``__init__`` of ``a.b`` (and of ``a``), so those packages are edges too, except
the importer's own enclosing packages (already being imported when it runs).
"""
import ast
import os
import re

import pytest
from repo_scripts import REPO  # noqa: I001  (tests/ helper)

PKG = os.path.join(REPO, "focal_det")
DOC = os.path.join(REPO, "docs", "architecture.md")


def _modules():
    """{dotted name: (path relative to focal_det/, is_package)} of every module of focal_det."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), PKG).replace(os.sep, "/")
                parts = ["focal_det"] + rel[: -len(".py")].split("/")
                is_pkg = parts[-1] == "__init__"
                out[".".join(parts[:-1] if is_pkg else parts)] = (rel, is_pkg)
    return out


MODULES = _modules()


def _enclosing(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imported(name, is_pkg, node):
    """The focal_det modules one import statement names (submodule where one is imported)."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        if node.level:
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            base = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module
                                                                   else []))  # fmt: skip
        else:
            base = node.module or ""
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                   for a in node.names]  # fmt: skip
    out = []
    for t in targets:
        if t.split(".")[0] != "focal_det":
            continue
        while t not in MODULES:  # "import focal_det.x.y as z" of a name inside a module
            t = t.rpartition(".")[0]
        out.append(t)
    return out


def _graph():
    graph = {}
    for name, (rel, is_pkg) in MODULES.items():
        tree = ast.parse(open(os.path.join(PKG, rel)).read(), rel)
        mine = _enclosing(name) | {name}
        edges = set()
        for node in ast.walk(tree):  # every import, at module level or inside a function
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(name, is_pkg, node):
                    edges |= ({target} | _enclosing(target)) - mine
        graph[name] = edges
    return graph


GRAPH = _graph()


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_walker_sees_relative_lazy_and_package_imports():
    # What the cycle test relies on, on modules whose imports are known.
    assert "focal_det.losses.modules" in GRAPH["focal_det.losses.softmax"]  # from .modules import
    assert "focal_det.modeling.meta_arch" in GRAPH["focal_det.engine.hooks"]  # from ..modeling.x
    assert "focal_det.modeling" in GRAPH["focal_det.engine.hooks"]  # its package __init__ runs
    assert "focal_det.export" not in GRAPH["focal_det.export.exporters"]  # its own: no edge
    lazy = ast.parse("def f():\n    from ..engine import Trainer\n").body[0].body[0]
    assert _imported("focal_det.demo.job", False, lazy) == ["focal_det.engine"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_focal_det_has_no_import_cycle():
    cycles = _cycles(GRAPH)
    described = [
        " <-> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(GRAPH[m] & set(c))}" for m in c)
        for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def _doc_layers():
    """[(layer, entry)] of the doc's table, entry a file ("config.py") or a folder ("losses/")."""
    rows = []
    for line in open(DOC).read().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            rows += [(int(m[1]), e) for e in re.findall(r"`([^`]+)`", m[2])]
    return rows


def _layer_of(rel, rows):
    hits = [layer for layer, e in rows if rel == e or (e.endswith("/") and rel.startswith(e))]
    return hits[0] if len(hits) == 1 else None


def test_every_module_has_one_layer_and_imports_only_downwards():
    rows = _doc_layers()
    assert len(rows) >= 10, rows
    layers = {name: _layer_of(rel, rows) for name, (rel, _) in MODULES.items()}
    unplaced = sorted(MODULES[n][0] for n, layer in layers.items() if layer is None)
    assert not unplaced, f"modules in no (or several) rows of docs/architecture.md: {unplaced}"
    upward = sorted(
        f"{m} (layer {layers[m]}) imports {t} (layer {layers[t]})"
        for m, targets in GRAPH.items() for t in targets if layers[t] > layers[m]
    )  # fmt: skip
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)


def test_the_tree_of_the_doc_lists_every_module():
    text = open(DOC).read()
    tree = text.split("```\nfocal_det/\n", 1)[1].split("```", 1)[0]
    listed = {line.split()[0] for line in tree.splitlines() if line.strip()}
    actual = {rel for rel, is_pkg in MODULES.values() if not is_pkg or rel == "__init__.py"}
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))


@pytest.mark.parametrize("lower", ["focal_det.losses", "focal_det.modeling"])
def test_the_papers_code_imports_no_operations_and_no_demo(lower):
    # The layer rule, said for the paper's code in words: nothing of checkpoint, data,
    # evaluation, engine, demo is reachable from the losses or the detector.
    reach, todo = set(), [m for m in MODULES if m == lower or m.startswith(lower + ".")]
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo += GRAPH[m]
    ops = ("checkpoint", "data", "evaluation", "export", "engine", "model_zoo", "demo",
           "config_check")  # fmt: skip
    assert not [m for m in reach if m.partition(".")[2].split(".")[0] in ops], sorted(reach)
