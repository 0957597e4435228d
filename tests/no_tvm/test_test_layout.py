"""Test modules never import each other: shared models live in tests/models.py, shared helpers in tests/helpers.py."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def imported_test_modules(tree: ast.AST) -> list[str]:
    """The test modules (``test_*``) a module imports, in any form: from a test module of a tier (absolute or
    relative), a test module from a tier's package (absolute or relative), or ``import`` of a test module's path."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            relative_or_tests = node.level or module == "tests" or module.startswith("tests.")
            if not relative_or_tests:
                continue
            shown = "." * node.level + module
            if module.rpartition(".")[2].startswith("test_"):
                found.append(f"from {shown} import ...")
            found += [f"from {shown} import {a.name}" for a in node.names if a.name.startswith("test_")]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.startswith("tests.") and a.name.rpartition(".")[2].startswith("test_")]
    return found


def test_the_check_sees_every_import_form():
    # the forbidden modules are named through variables, so that grep for the forbidden imports finds none here
    tier_test, relative_test = "tests.no_tvm.test_a", ".test_b"
    source = (f"from {tier_test} import x\nfrom {relative_test} import y\nfrom tests.codegen import test_c\n"
              "from . import test_d\nimport tests.gpu.test_e\nfrom tests.models import make_mlp\n"
              "from tests.helpers import assert_same\nimport pytest\nfrom srigl_compile import test_utils\n")
    assert imported_test_modules(ast.parse(source)) == [
        f"from {tier_test} import ...", f"from {relative_test} import ...", "from tests.codegen import test_c",
        "from . import test_d", "import tests.gpu.test_e"]


def test_no_test_module_imports_another():
    offenders = [f"{path.relative_to(TESTS)}: {found}" for path in sorted(TESTS.rglob("*.py"))
                 for found in imported_test_modules(ast.parse(path.read_text()))]
    assert offenders == []
