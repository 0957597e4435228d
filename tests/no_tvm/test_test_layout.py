"""Test modules never import each other: shared models live in tests/models.py, shared helpers in tests/helpers.py."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_test_module_imports_another():
    offenders = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                name = node.module.rpartition(".")[2]
                if name.startswith("test_") and (node.level or node.module.startswith("tests.")):
                    offenders.append(f"{path.relative_to(TESTS)}: from {'.' * node.level}{node.module}")
    assert offenders == []
