"""The package layers point one way: core/ knows nothing of training/, operators/, app/ or deploy/;
training.cyclegan and training.train do not import each other both ways (what both need lives in
training.shards)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_core_imports_no_upper_layer():
    offenders = {}
    for path in sorted((REPO / "core").rglob("*.py")):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("training", "operators", "app", "deploy", "bench")}
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}


def test_imported_modules_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    from training.sim.anatomy import x\n")
    assert imported_modules(f) == {"os", "training.sim.anatomy"}


def test_cyclegan_does_not_import_train():
    assert not any(m.startswith("training.train") for m in imported_modules(REPO / "training" / "cyclegan.py"))
    assert "training.shards" in imported_modules(REPO / "training" / "cyclegan.py")
