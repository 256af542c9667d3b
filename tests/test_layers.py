"""The package's imports point one way (docs/architecture.md): no cycle, networks free of the framework.

The import graph is built from the source with `ast`, every `import` statement counted wherever it
sits (module top or inside a function), and an import of `a.b.c` also depends on the packages `a.b`
and `a` whose `__init__` Python runs first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scalegen"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement in the file names (absolute, relative ones resolved)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it makes Python import (the module and its parent packages)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        deps: set[str] = set()
        for name in imported_names(path, module, path.name == "__init__.py"):
            parts = name.split(".")
            prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            found = [p for p in prefixes if p in files]
            if not found:
                continue
            # The module named is a dependency, and so are the packages Python initializes on the way;
            # but not this module's own parent packages, unless named (`from pkg import name`): they are
            # already running when it is imported through them.
            deps.add(found[-1])
            deps.update(p for p in found[:-1] if not module.startswith(p + "."))
        deps.discard(module)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_names_a_cycle_and_passes_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_counts_imports_inside_functions_and_parent_packages(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg import top\n")
    (pkg / "sub" / "leaf.py").write_text("import pkg.sub.other\n\ndef f():\n    from ..top import x\n")
    (pkg / "sub" / "other.py").write_text("from pkg.sub import leaf\n")
    (pkg / "top.py").write_text("import pkg.sub.leaf\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.leaf"] == {"pkg.top", "pkg.sub.other"}  # not its own parent package pkg.sub
    assert graph["pkg.sub.other"] == {"pkg.sub", "pkg.sub.leaf"}  # a parent it names is a dependency
    assert graph["pkg.top"] == {"pkg.sub", "pkg.sub.leaf"}  # importing pkg.sub.leaf runs pkg/sub/__init__
    assert find_cycle(graph) == ["pkg.sub", "pkg.top", "pkg.sub"]


def test_no_import_cycle_in_the_package() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


FORBIDDEN_IN_NETS = ("lightning", "pytorch_lightning", "omegaconf", "deepspeed", "wandb", "scalegen.config",
                     "scalegen.families", "scalegen.runtime", "scalegen.distributed", "scalegen.callbacks")


@pytest.mark.parametrize("path", sorted((PACKAGE / "nets").glob("*.py")), ids=lambda p: p.name)
def test_networks_import_no_framework_and_call_no_collective(path: Path) -> None:
    module = "scalegen.nets." + path.stem
    for name in imported_names(path, module, path.name == "__init__.py"):
        assert not any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_IN_NETS), (
            f"{path.name} imports {name}: networks are single-device PyTorch only")
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "distributed":
            pytest.fail(f"{path.name}:{node.lineno} uses torch.distributed: collectives belong to the family")


def test_no_private_lightning_attribute_in_the_package() -> None:
    """No `trainer._x`, `strategy._x`, `lightning...._private` in the package (documented API only)."""
    offenders = []
    for module, path in module_files().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightning":
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private or any(p.startswith("_") for p in node.module.split(".")):
                    offenders.append(f"{module}:{node.lineno} imports {node.module} {private}")
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name)
                    and node.value.id in ("trainer", "strategy", "pl_module", "connector", "loop")):
                offenders.append(f"{module}:{node.lineno} reads {node.value.id}.{node.attr}")
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Attribute) and node.value.attr in ("trainer", "strategy")):
                offenders.append(f"{module}:{node.lineno} reads .{node.value.attr}.{node.attr}")
    assert not offenders, "\n".join(offenders)
