"""Fixtures for the chart tests: render the chart offline with Helm's Go library
(helm-python-sdk, no helm binary, no cluster) and list the metrics nsam declares."""

from __future__ import annotations

import pytest
import yaml

from helm_support import CHART, NAMESPACE, RELEASE


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


@pytest.fixture(scope="session")
def metric_names() -> set[str]:
    """Every sample name nsam.server.metrics exposes (with _total/_bucket/_sum/_count)."""
    from nsam.server import metrics
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
