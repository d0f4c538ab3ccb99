"""The package's import structure: no import cycles in ``dfmvr/`` (counting imports inside
functions, which only hide a cycle until the wrong module is imported first), no import that
runs up the layers (:data:`LAYERS`), the library never imports ``sharding`` (the packing tools
build on the library, not the other way round), and every module imports on its own in a fresh
interpreter in any order."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dfmvr"


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imported(name: str, file: Path, modules: dict[str, Path] | None = None) -> set[str]:
    """Every module named by an import anywhere in ``file`` (except under ``if TYPE_CHECKING:``)."""
    found: set[str] = set()
    package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names}
            # ``from dfmvr import tracking`` imports the submodule, not the package's own API
            named = {n for n in subs if modules is not None and n in modules}
            found.update(named)
            if len(named) < len(subs) or modules is None:
                found.add(module)
                found.update(subs - named)

    Visitor().visit(ast.parse(file.read_text(), str(file)))
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(internal, raw)``: edges between dfmvr modules, and every imported name per module."""
    modules = _modules()
    internal, raw = {}, {}
    for name, file in modules.items():
        names = _imported(name, file, modules)
        raw[name] = names
        edges = set()
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            # a package's __init__ re-exporting its own submodules is not a cycle
            if n and n != name and not n.startswith(name + "."):
                edges.add(n)
        internal[name] = edges
    return internal, raw


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


LAYERS: tuple[tuple[str, ...], ...] = (
    # foundations: the typed config and presets, MLflow's helpers
    ("dfmvr.tune.settings", "dfmvr.config", "dfmvr.presets", "dfmvr.tracking"),
    # the face model and the renderer
    ("dfmvr.facemodel", "dfmvr.render"),
    # data (shards, synthetic data, loaders), the networks, the loss terms
    ("dfmvr.data", "dfmvr.nets", "dfmvr.losses"),
    # the DF-MVR network
    ("dfmvr.model",),
    # the training pieces inference shares: the objective, metrics, checkpoints, schedules
    ("dfmvr.train.objective", "dfmvr.train.metrics", "dfmvr.train.checkpoint", "dfmvr.train.schedule",
     "dfmvr.train.weights"),
    # inference and evaluation: inputs, detection, fitting, loading, reconstruction, pictures,
    # the model bundle in MLflow, the evaluators
    ("dfmvr.inputs", "dfmvr.visualize", "dfmvr.pictures", "dfmvr.facemesh", "dfmvr.detect", "dfmvr.capture",
     "dfmvr.fit", "dfmvr.serving", "dfmvr.reconstruct", "dfmvr.bundle", "dfmvr.evaluate"),
    # the training jobs (the loop, Ray Train, parse-net training), then the sweeps
    ("dfmvr.train",),
    ("dfmvr.tune",),
    # the package's own API (dfmvr.load) and the command line
    ("dfmvr", "dfmvr.cli"),
)
"""Layers, lowest first: a module may import its own layer and those below, never one above.
A module belongs to the longest prefix listed (``dfmvr.train.objective`` before ``dfmvr.train``)."""


def _layer(module: str) -> int | None:
    best, found = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    return found


def test_every_module_has_a_layer():
    graph, _ = _graph()
    assert [m for m in sorted(graph) if _layer(m) is None] == []


def test_no_import_runs_up_the_layers():
    graph, _ = _graph()
    upward = sorted(f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
                    for m, names in graph.items() for n in names
                    if _layer(m) is not None and _layer(n) is not None and _layer(n) > _layer(m))
    assert upward == []


def test_the_layer_checker_finds_an_upward_import():
    assert _layer("dfmvr.train.objective") < _layer("dfmvr.fit") < _layer("dfmvr.train.loop")
    assert _layer("dfmvr.data.synth") > _layer("dfmvr.render.camera")


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_dfmvr():
    graph, _ = _graph()
    assert len(graph) > 50
    assert _cycles(graph) == []


def test_the_library_does_not_import_sharding():
    _, raw = _graph()
    offenders = {m: sorted(n for n in names if n == "sharding" or n.startswith("sharding."))
                 for m, names in raw.items()}
    assert {m: n for m, n in offenders.items() if n} == {}


@pytest.mark.parametrize("seed", [0, 1])
def test_every_module_imports_in_a_fresh_interpreter_in_random_order(seed):
    names = sorted(_modules())
    random.Random(seed).shuffle(names)
    code = "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % names
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"order (seed {seed}): {names}\n{res.stderr[-3000:]}"
