"""Architecture rules that keep the layers apart (DESIGN.md section 1, STYLE.md habit 4), checked on
the package import graph computed from the source (AST; module-level and function-level imports).

Nodes: each subpackage of megaflamingo (models, parallel, training, data, eval, convert, planning),
each top-level module (config, resolve, builder), the package facade (`megaflamingo/__init__`),
and the top-level folders kernels (installed as megaflamingo.kernels), launcher, benchmarks. The rules:

1. No import cycle between nodes.
2. Dependencies point down the layers of `LAYERS`: config and kernels at the bottom; data and
   models are leaves above them (neither imports the other); parallel on models; resolve (the
   config, resolved once) on those; training on resolve and parallel, and never on convert,
   builder or eval (the launcher hands it a `build_model`); convert beside training (it reads
   training checkpoints to export them); builder on convert (an OpenFlamingo checkpoint); eval
   and planning read training's outputs; launcher and benchmarks on top.
3. models/ is free of torch.distributed and deepspeed.
4. Only `DEEPSPEED_FILES` import deepspeed: the engine builder (engines, the distributed backend,
   gathered ZeRO-3 parameters), the pipeline module (a `PipelineModule` subclass) with the
   topology object it is built on, and the checkpoint side (DeepSpeed's ZeRO-3 checkpoint format;
   the layout-free state read from and written into any engine). The step function, the loop,
   models, data, convert, eval, launchers and benchmarks never touch DeepSpeed directly.

`test_the_checks_catch_broken_rules` runs every check on a copy of the tree with forbidden imports
added, so each rule is shown to fail when broken.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("kernels", "launcher", "benchmarks")

LAYERS = {  # node -> layer; a node imports only nodes of lower layers
    "config": 0, "kernels": 0,
    "data": 1, "models": 1,
    "parallel": 2,
    "resolve": 3,
    "training": 4,
    "convert": 5,  # reads training checkpoints to export them
    "builder": 6,  # the model a config names, OpenFlamingo checkpoint imported (convert/)
    "megaflamingo": 7,  # the facade: megaflamingo.build_model, megaflamingo.Flamingo
    "eval": 8, "planning": 8,
    "launcher": 9, "benchmarks": 9,
}
DEEPSPEED_FILES = {
    "megaflamingo/training/engine.py",
    "megaflamingo/training/checkpoint.py",
    "megaflamingo/training/layout_free.py",
    "megaflamingo/parallel/pipeline.py",
    "megaflamingo/parallel/topology.py",
}


# ----------------------------------------------------------------------------- the graph


def python_files(root: Path) -> list[Path]:
    return sorted(p for top in ("megaflamingo", *TOP_FOLDERS) for p in (root / top).rglob("*.py"))


def node_of_module(root: Path, dotted: str) -> str | None:
    """The graph node of an imported module name, or None outside the project."""
    parts = dotted.split(".")
    if parts[0] in TOP_FOLDERS:
        return parts[0]
    if parts[0] != "megaflamingo":
        return None
    if len(parts) == 1:
        return "megaflamingo"
    if parts[1] == "kernels":  # setup.py installs the top-level kernels/ as megaflamingo.kernels
        return "kernels"
    target = root / "megaflamingo" / parts[1]
    return parts[1] if target.is_dir() or target.with_suffix(".py").is_file() else "megaflamingo"


def node_of_file(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[0] != "megaflamingo":
        return parts[0]
    return "megaflamingo" if parts[1] == "__init__" else parts[1]


def imported_names(root: Path, path: Path) -> set[str]:
    """Every module a file imports anywhere in it (relative imports made absolute; `from a import b`
    also yields a.b, which may be a module)."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = list(package[: len(package) - node.level + 1]) if node.level else []
            base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> dict[str, dict[str, set[str]]]:
    """node -> imported node -> the files (relative paths) that import it."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in python_files(root):
        source = node_of_file(root, path)
        for name in imported_names(root, path):
            target = node_of_module(root, name)
            if target is not None and target != source:
                graph.setdefault(source, {}).setdefault(target, set()).add(str(path.relative_to(root)))
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def layer_violations(graph: dict[str, dict[str, set[str]]]) -> list[str]:
    out = []
    for source, targets in sorted(graph.items()):
        for target, files in sorted(targets.items()):
            if source not in LAYERS or target not in LAYERS:
                out.append(f"{source} -> {target}: a node missing from LAYERS ({sorted(files)[0]})")
            elif LAYERS[target] >= LAYERS[source]:
                out.append(f"{source} (layer {LAYERS[source]}) imports {target} (layer {LAYERS[target]}) "
                           f"in {sorted(files)}")
    return out


def files_importing(root: Path, prefixes: tuple[str, ...], under: str = "") -> dict[str, set[str]]:
    """relative path -> the imported names that start with one of `prefixes`."""
    found = {}
    for path in python_files(root):
        rel = str(path.relative_to(root))
        if rel.startswith(under):
            bad = {n for n in imported_names(root, path) if n.split(".")[0] in prefixes or n.startswith(prefixes)}
            if bad:
                found[rel] = bad
    return found


# ----------------------------------------------------------------------------- the rules


def check_no_cycle(root: Path) -> list[str] | None:
    graph = import_graph(root)
    return find_cycle({source: set(targets) for source, targets in graph.items()})


def check_models_distributed_free(root: Path) -> dict[str, set[str]]:
    return files_importing(root, ("torch.distributed", "deepspeed"), under="megaflamingo/models/")


def check_deepspeed_files(root: Path) -> set[str]:
    return set(files_importing(root, ("deepspeed",))) - DEEPSPEED_FILES


def test_package_graph_has_no_cycle():
    assert import_graph(ROOT)["training"]  # the graph is really computed
    assert check_no_cycle(ROOT) is None


def test_dependencies_point_down_the_layers():
    assert layer_violations(import_graph(ROOT)) == []


def test_models_import_no_distributed_code():
    assert list((ROOT / "megaflamingo" / "models").glob("*.py"))
    assert check_models_distributed_free(ROOT) == {}


def test_only_the_engine_side_imports_deepspeed():
    assert check_deepspeed_files(ROOT) == set()
    assert "megaflamingo/training/engine.py" in files_importing(ROOT, ("deepspeed",))


def test_the_checks_catch_broken_rules(tmp_path: Path) -> None:
    """Each rule fails on a copy of the tree with one forbidden import added (and a cycle found by
    the checker on a synthetic graph)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    for path in python_files(ROOT):  # the tree's Python files only
        (tmp_path / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp_path / path.relative_to(ROOT))
    assert check_no_cycle(tmp_path) is None and layer_violations(import_graph(tmp_path)) == []
    bad = tmp_path / "megaflamingo" / "models" / "bad.py"
    bad.write_text("def f():\n    from ..training import engine  # function-level, relative\n")
    assert check_no_cycle(tmp_path) is not None  # models -> training -> models
    assert any(v.startswith("models (layer 1) imports training") for v in layer_violations(import_graph(tmp_path)))
    bad.write_text("import torch.distributed as dist\n")
    assert check_models_distributed_free(tmp_path) == {"megaflamingo/models/bad.py": {"torch.distributed"}}
    (tmp_path / "megaflamingo" / "training" / "step.py").write_text("from deepspeed import comm\n")
    assert check_deepspeed_files(tmp_path) == {"megaflamingo/training/step.py"}
