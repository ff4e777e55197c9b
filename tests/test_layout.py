"""The serving code stays readable: no module in server/ or client/ over 500 lines, no function
there over 80, and the training tools stay out of the serving package."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
SERVING = [p for d in ("server", "client") for p in sorted((ROOT / d).glob("*.py"))]


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_serving_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in SERVING if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_no_serving_function_over_80_lines():
    long = [f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
            for p in SERVING for name, line, n in _functions(p) if n > 80]
    assert not long, long


def test_serving_never_imports_the_training_tools():
    importers = [str(p.relative_to(ROOT)) for p in SERVING if p.name != "cli.py"
                 and "nsam.model.training" in p.read_text(encoding="utf-8")]
    assert not importers, importers
