"""Alert rules pass `promtool check rules` and their unit tests, every alert has a firing test,
and every metric they use is declared in nsam.server.metrics."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from helm_support import RULE_TESTS, RULES

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
METRIC = re.compile(r"\bnsam_[a-z0-9_]+\b")


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


@needs_promtool
def test_promtool_check_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests():
    out = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    fired, quiet = set(), set()
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fired == set(), "alerts never seen firing in a unit test"
    assert names - quiet == set(), "alerts never checked to stay quiet"


def test_alerts_are_documented_and_labelled():
    for alert in alerts():
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]


def test_rules_use_only_declared_metrics(metric_names):
    used = set(METRIC.findall(RULES.read_text()))
    assert used, "no nsam_ metric found in the rules"
    assert used - metric_names == set()


def test_forgetting_alert_compares_with_the_baseline_gauge():
    expr = next(a["expr"] for a in alerts() if a["alert"] == "NsamForgettingProbeAboveBaseline")
    assert "nsam_forgetting_probe_baseline_loss" in expr and "nsam_forgetting_probe_loss" in expr
