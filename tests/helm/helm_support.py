"""Paths and helpers shared by the chart tests (a uniquely named module: several test folders
have a conftest.py, so `from conftest import ...` would be ambiguous)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "nsam"
RULES = CHART / "rules" / "nsam-alerts.yaml"
RULE_TESTS = CHART / "rules" / "tests" / "nsam-alerts.test.yaml"
DASHBOARD = CHART / "dashboards" / "nsam.json"
RELEASE, NAMESPACE = "demo", "llm"


def load_tool(name: str):
    """Import a script from helm/tools/ (not a package) by file name."""
    path = REPO / "helm" / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"helm_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def find(docs: list[dict], kind: str, name_suffix: str = "") -> list[dict]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = find(docs, kind, name_suffix)
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]
