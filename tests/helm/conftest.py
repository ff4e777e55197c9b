"""Shared fixtures for the chart tests: render the chart offline with Helm's Go library
(helm-python-sdk, no helm binary, no cluster) and split the output into objects."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture(scope="session")
def chart():
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart):
    """render(values) -> list of manifest dicts (NOTES.txt excluded), in template order."""
    cache: dict[str, list[dict]] = {}

    def _render(values: dict | None = None) -> list[dict]:
        key = repr(values)
        if key not in cache:
            files = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE,
                                 is_install=True)
            docs = []
            for path, text in sorted(files.items()):
                if path.endswith("NOTES.txt"):
                    continue
                docs += [d for d in yaml.safe_load_all(text) if d]
            cache[key] = docs
        return cache[key]

    return _render


def find(docs: list[dict], kind: str, name_suffix: str = "") -> list[dict]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = find(docs, kind, name_suffix)
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


@pytest.fixture(scope="session")
def metric_names() -> set[str]:
    """Every sample name nsam.server.metrics exposes (with _total/_bucket/_sum/_count)."""
    metrics = pytest.importorskip("nsam.server.metrics")
    from prometheus_client import Counter, Gauge, Histogram, Summary

    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, Counter):
            names.add(obj._name + "_total")  # prometheus_client strips _total from the family name
        elif isinstance(obj, Histogram):
            names |= {obj._name + s for s in ("_bucket", "_sum", "_count")}
        elif isinstance(obj, Summary):
            names |= {obj._name + s for s in ("_sum", "_count")}
        elif isinstance(obj, Gauge):
            names.add(obj._name)
    assert names, "nsam.server.metrics declares no metrics"
    return names
