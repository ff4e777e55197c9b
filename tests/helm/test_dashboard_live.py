"""Every dashboard query returns data from a real Prometheus scraping a real nsam.

Starts the chart's default topology on one machine: a Redis, `nsam serve --model tiny`, one
`nsam consolidate` worker, and Debian's `prometheus` scraping both every second with the alert
rules loaded. Drives a short chat workload over gRPC, then runs each panel's PromQL through
Prometheus' HTTP API. About 30 seconds.
"""

from __future__ import annotations

import time

import pytest
import yaml

from helm_support import load_tool

live = load_tool("live_stack")
board = load_tool("build_dashboard")

pytestmark = [
    pytest.mark.skipif(live.prometheus_binary() is None,
                       reason="prometheus not installed (apt-get install prometheus)"),
    pytest.mark.timeout(240),
]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    with live.stack("tiny", tmp_path_factory.mktemp("live"), consolidation="external") as (server, prom):
        counts = live.run_workload(server.grpc_target, sessions=4, turns=3, pause_s=0.7)
        # Two finished consolidations give every consolidation series a rate (a labelled counter
        # appears at its first increment); waiting for all of them only costs time on a busy machine.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = live.finite_values(prom.query("sum(nsam_consolidation_jobs_total)"))
            if done and done[0] >= 2:
                break
            time.sleep(0.5)
        time.sleep(2.5)
        yield server, prom, counts


def test_workload_ran(scraped):
    server, prom, counts = scraped
    assert len(server.metrics_targets) == 2  # server and worker both scraped
    assert counts["turns"] == 12 and counts["tokens"] > 0 and counts["errors"] == 4 and counts["documents"] == 4
    turns = live.finite_values(prom.query('sum(nsam_requests_total{method=~".*Chat",code="OK"})'))
    assert turns == [12.0]


@pytest.mark.parametrize("panel", board.PANELS, ids=[p.title for p in board.PANELS])
def test_panel_has_data(scraped, panel):
    _, prom, _ = scraped
    for target in panel.targets:
        expr = live.expand(target.expr)
        result = prom.query(expr)
        assert result, f"no series for {panel.title!r}: {expr}"
        values = live.finite_values(result)
        assert values, f"only NaN for {panel.title!r}: {expr} -> {result}"
        if not panel.zero_when_healthy and panel.kind != "heatmap" and "quantile" not in expr:
            # rates and gauges of a workload that just ran: something is non-zero
            if "queue_depth" not in expr and "queued_turns" not in expr and "active_sessions" not in expr \
                    and "server errors" != target.legend:
                assert any(v > 0 for v in values), f"all zero for {panel.title!r}: {expr} -> {result}"


def test_error_ratio_sees_the_failed_call(scraped):
    _, prom, _ = scraped
    panel = next(p for p in board.PANELS if p.title == "Error ratio")
    ratio = live.finite_values(prom.query(live.expand(panel.targets[0].expr)))
    assert ratio and 0 < ratio[0] < 1


def test_alert_rules_evaluate_cleanly_on_live_data(scraped):
    _, prom, _ = scraped
    rules = prom.rules()
    expected = [r["alert"] for g in yaml.safe_load(live.RULES.read_text())["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(expected)
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        # Every alert waits at least a minute, so nothing can fire during this short run;
        # a healthy tiny-model workload should not even make the serving and store ones pending.
        assert rule["state"] != "firing", rule["name"]
        if rule["name"] in {"NsamHighErrorRatio", "NsamStoreErrors", "NsamLevelNonFiniteUpdates"}:
            assert rule["state"] == "inactive", (rule["name"], rule.get("alerts"))


def test_chart_test_pod_script_passes_against_the_live_server(scraped, render):
    """The `helm test` pod's script, pointed at the live server instead of the Service."""
    import subprocess
    import sys

    from helm_support import one

    server, _, _ = scraped
    script = one(render({}), "Pod")["spec"]["containers"][0]["args"][0]
    host, port = server.grpc_target.split(":")
    script = script.replace('host, port = "demo-nsam-server", 50051', f'host, port = "{host}", {port}')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SERVING" in done.stdout
