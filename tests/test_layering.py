"""Architecture rules that keep the layers apart (DESIGN.md section 1, STYLE.md habit 4)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_models_import_no_distributed_code():
    files = sorted((ROOT / "megaflamingo" / "models").glob("*.py"))
    assert files
    for path in files:
        source = path.read_text()
        bad = {n for n in _imports(path) if n.startswith(("torch.distributed", "deepspeed"))}
        assert not bad, f"{path.name} imports {bad}"
        assert "torch.distributed" not in source and "deepspeed" not in source, path.name


def test_the_check_itself_catches_an_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import torch.distributed as dist\nfrom deepspeed import comm\n")
    assert _imports(sample) == {"torch.distributed", "deepspeed"}
