"""Imports run one way: clcalib (the library) <- jobs (what the API and workers share) <-
service (the API) and worker; the API and the worker never import each other. Checked on
every import statement, including the lazy ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the first-party packages it may import
ALLOWED = {
    "clcalib": {"clcalib"},
    "jobs": {"clcalib", "jobs"},
    "service": {"clcalib", "jobs", "service"},
    "worker": {"clcalib", "jobs", "worker"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package):
    bad = []
    for f in sorted((ROOT / package).rglob("*.py")):
        for top in _imports(f) & set(ALLOWED):
            if top not in ALLOWED[package]:
                bad.append(f"{f.relative_to(ROOT)} imports {top}")
    assert not bad, "\n".join(bad)
