"""The Grafana dashboard is current with its builder, well formed, covers what operators need,
and queries only metrics declared in nsam.server.metrics."""

from __future__ import annotations

import json
import re

from helm_support import DASHBOARD, load_tool

METRIC = re.compile(r"\bnsam_[a-z0-9_]+\b")


def panels():
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_dashboard_json_is_current():
    builder = load_tool("build_dashboard")
    assert DASHBOARD.read_text() == builder.render_json(), "run: python helm/tools/build_dashboard.py"


def test_dashboard_uses_only_declared_metrics(metric_names):
    used = {m for p in panels() for t in p["targets"] for m in METRIC.findall(t["expr"])}
    board = json.loads(DASHBOARD.read_text())
    used |= {m for v in board["templating"]["list"] for m in METRIC.findall(v.get("definition", ""))}
    assert used - metric_names == set()


def test_dashboard_covers_every_declared_metric(metric_names):
    """A metric nobody can see is a metric nobody watches."""
    used = {m for p in panels() for t in p["targets"] for m in METRIC.findall(t["expr"])}
    family = lambda n: re.sub(r"_(bucket|sum|count|total)$", "", n)  # noqa: E731
    assert {family(n) for n in metric_names} - {family(n) for n in used} == set()


def test_dashboard_structure():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["schemaVersion"] >= 36
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "namespace", "level"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Serving", "Memory health (per level)", "Learner (medium updates after turns)", "State store",
                    "Consolidation"]
    for p in panels():
        assert p["type"] in {"timeseries", "heatmap", "stat"}
        assert p["datasource"]["uid"] == "${datasource}"
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            # every selector is scoped by the namespace variable
            assert all('namespace=~"$namespace"' in s for s in re.findall(r"nsam_\w+\{[^}]*\}", t["expr"]))
            if p["type"] == "heatmap":
                assert t["format"] == "heatmap" and "_bucket" in t["expr"]
    titles = {p["title"] for p in panels()}
    for needed in ("Requests per second", "Error ratio", "Time to first token", "Inter-token latency",
                   "Tokens per second", "Active sessions and queued turns", "Decode batch size",
                   "Surprise (inner loss)", "Update norm", "State norm", "Drift from parent level",
                   "Rejected updates", "Forgetting probe loss vs baseline", "Store latency",
                   "Committed state size", "CAS conflicts", "Store errors", "Queue depth",
                   "Lag (enqueue to start)", "Job outcomes", "Job duration", "Learner queue", "Coalesced turns"):
        assert needed in titles
