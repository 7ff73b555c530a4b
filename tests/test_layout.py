"""The package's architecture, checked: imports run one way (commands -> analysis -> sim ->
trace -> backend/schema), no module imports another that imports it back (lazy imports
included), and torch stays out of everything but the model and the runners."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG_DIRS = {"kvtier": ROOT / "kvtier", "kvtier.model": ROOT / "model",
            "kvtier.runners": ROOT / "runners", "kvtier.policies": ROOT / "policies"}

# Lower number = lower layer; a module may import its own layer or lower ones only.
LAYERS = [
    ("kvtier.schema", 0),
    ("kvtier.backend", 1),
    ("kvtier.policies", 1),
    ("kvtier.trace", 2),
    ("kvtier.sim", 3),
    ("kvtier.analysis", 4),
    ("kvtier.commands", 5),
    ("kvtier.cli", 5),
    ("kvtier.__main__", 6),
]
TORCH_FREE = ("kvtier.schema", "kvtier.backend", "kvtier.policies", "kvtier.trace", "kvtier.sim",
              "kvtier.analysis")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, d in PKG_DIRS.items():
        for path in d.rglob("*.py"):
            rel = path.relative_to(d).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "kvtier" and parts and parts[0] in ("model", "runners", "policies"):
                continue
            mods[name] = path
    return mods


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every kvtier module a file imports, at any depth of the file (lazy imports too), and
    "torch" if the module imports torch when it is imported (a lazy ``import torch`` inside a
    function that only runs when handed a torch tensor is fine)."""
    out = set()
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if (n == "torch" or n.startswith("torch.")) and id(node) in top:
                out.add("torch")
            while n and n not in MODULES:
                n = n.rpartition(".")[0]
            if n.startswith("kvtier"):
                out.add(n)
    return out


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _layer(mod: str) -> int | None:
    for prefix, rank in LAYERS:
        if mod == prefix or mod.startswith(prefix + "."):
            return rank
    return None


def _wing(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2])


def test_the_wings_exist():
    for wing in ("kvtier.trace", "kvtier.sim", "kvtier.sim.tiers", "kvtier.analysis",
                 "kvtier.backend", "kvtier.schema", "kvtier.cli", "kvtier.commands"):
        assert wing in MODULES, wing
    flat = sorted(p.name for p in (ROOT / "kvtier").glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "backend.py", "cli.py", "schema.py"]


@pytest.mark.parametrize("mod", sorted(m for m in GRAPH if _layer(m) is not None))
def test_imports_run_downward(mod):
    mine = _layer(mod)
    bad = [dep for dep in GRAPH[mod] if dep != "torch" and _layer(dep) is not None
           and _layer(dep) > mine and _wing(dep) != _wing(mod)]
    assert not bad, f"{mod} (layer {mine}) imports higher layers: {bad}"


@pytest.mark.parametrize("mod", sorted(m for m in GRAPH if m.startswith(TORCH_FREE)))
def test_no_torch_outside_model_and_runners(mod):
    assert "torch" not in GRAPH[mod], f"{mod} imports torch"


def test_no_import_cycles():
    deps = {m: {d for d in ds if d in GRAPH} for m, ds in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(deps[m]):
            # a package's __init__ importing its own submodules is not a cycle of modules
            if d.startswith(m + ".") or m.startswith(d + "."):
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m)


def test_public_names_still_import():
    import kvtier
    from kvtier.backend import HBMOnlyBackend, KVBackend, LayerAccess
    from kvtier.policies import EvictionPolicy, MigrationPolicy, PlacementPolicy, PrefetchPolicy
    from kvtier.trace.tracer import Tracer

    assert kvtier.Tracer is Tracer and kvtier.KVBackend is KVBackend
    assert kvtier.LayerAccess is LayerAccess and kvtier.HBMOnlyBackend is HBMOnlyBackend
    assert all((EvictionPolicy, MigrationPolicy, PlacementPolicy, PrefetchPolicy))
    with pytest.raises(AttributeError):
        kvtier.no_such_name  # noqa: B018
