"""The arrows of DESIGN.md point one way: no module imports a layer above its own, not even lazily
inside a function (the one cycle there was, isq.imatrix -> eval.perplexity -> model -> isq.apply,
is gone: chunking text lives in jaxquant.text, below both)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# importer package -> packages it must never import
FORBIDDEN = {
    "jaxquant.isq": ("jaxquant.eval", "jaxquant.model", "jaxquant.generate", "jaxquant.cli"),
    "jaxquant.text": ("jaxquant.eval", "jaxquant.isq", "jaxquant.model", "jaxquant.models"),
    "jaxquant.formats": ("jaxquant.isq", "jaxquant.io", "jaxquant.models", "jaxquant.eval", "jaxquant.model"),
    "jaxquant.io": ("jaxquant.models", "jaxquant.isq", "jaxquant.eval", "jaxquant.model", "jaxquant.generate"),
    "jaxquant.models": ("jaxquant.isq", "jaxquant.eval", "jaxquant.io", "jaxquant.model", "jaxquant.generate"),
    "pallas_kernels": ("jaxquant.models", "jaxquant.isq", "jaxquant.eval", "jaxquant.io"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (module level and inside functions), with its line."""
    package = list(path.relative_to(ROOT).parts[:-1])  # what a relative import starts from
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_up(package):
    where = ROOT / Path(*package.split("."))
    files = [where.with_suffix(".py")] if where.with_suffix(".py").is_file() else sorted(where.rglob("*.py"))
    assert files, package
    bad = [f"{f.relative_to(ROOT)}:{line} imports {name}" for f in files for line, name in _imports(f)
           if any(_within(name, up) for up in FORBIDDEN[package])]
    assert not bad, "\n".join(bad)
