"""values.yaml is documented key by key, and values.schema.json refuses invalid values."""

from __future__ import annotations

import re

import pytest

from helm_support import CHART

helm = pytest.importorskip("helm_python")

INVALID = {
    "unknown top-level key": {"replicas": 3},
    "unknown nested key": {"server": {"autoscaling": {"enable": True}}},
    "dtype not in enum": {"model": {"dtype": "int8"}},
    "image variant not in enum": {"image": {"variant": "rocm"}},
    "replica count negative": {"server": {"replicaCount": -1}},
    "replica count as string": {"worker": {"replicaCount": "2"}},
    "port out of range": {"server": {"grpcPort": 70000}},
    "service type not in enum": {"server": {"service": {"type": "ExternalName"}}},
    "appendfsync not in enum": {"redis": {"appendfsync": "sometimes"}},
    "bad principal": {"apiKeys": {"keys": [{"key": "secret-key-123", "principal": "root"}]}},
    "key missing principal": {"apiKeys": {"keys": [{"key": "secret-key-123"}]}},
    "short api key": {"apiKeys": {"keys": [{"key": "abc", "principal": "admin"}]}},
    "no redis at all": {"redis": {"enabled": False}},
    "external redis url not a redis url": {"redis": {"enabled": False}, "externalRedis": {"url": "http://x"}},
    "tls without a secret": {"server": {"tls": {"enabled": True}}},
    "gpu with the cpu image": {"server": {"gpu": {"enabled": True}}},
    "gpu count zero": {"server": {"gpu": {"enabled": True, "count": 0}}, "image": {"variant": "cuda"}},
    "bad scrape interval": {"metrics": {"serviceMonitor": {"interval": "fast"}}},
    "enabled as string": {"metrics": {"prometheusRule": {"enabled": "yes"}}},
    "pdb percent malformed": {"server": {"podDisruptionBudget": {"maxUnavailable": "half"}}},
    "env var without name": {"server": {"extraEnv": [{"value": "1"}]}},
    "pvc size malformed": {"redis": {"persistence": {"size": "lots"}}},
}


@pytest.mark.parametrize("case", INVALID)
def test_schema_refuses(chart, case):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(INVALID[case])
    with pytest.raises(helm.HelmError):  # and so does an install
        chart.render(values=INVALID[case], name="demo", namespace="llm")


def test_schema_accepts_defaults_and_real_overrides(chart):
    chart.validate_schema({})
    chart.validate_schema({
        "server": {"gpu": {"enabled": True, "count": 1}, "podDisruptionBudget": {"minAvailable": "50%"}},
        "image": {"variant": "cuda", "tag": "sha-abc123"},
        "redis": {"enabled": False, "maxmemory": "2gb"},
        "externalRedis": {"url": "rediss://user:pw@redis.example:6380/0"},
        "apiKeys": {"keys": [{"key": "k3y-with-8-chars", "principal": "user:tenant-a/alice"}]},
    })


# Kubernetes objects passed through verbatim: their inner keys are Kubernetes' own, not ours.
PASSTHROUGH = {"resources", "podSecurityContext", "securityContext"}


def test_every_values_key_has_a_comment():
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing, stack = [], []  # stack of (indent, key)
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_passthrough = any(k in PASSTHROUGH for _, k in stack)
        stack.append((indent, key))
        if inside_passthrough:
            continue
        prev = next((p for p in reversed(lines[:i]) if p.strip()), "")
        if not prev.strip().startswith("#"):
            missing.append(f"values.yaml:{i + 1}: {key}")
    assert not missing, "keys without a comment line above:\n" + "\n".join(missing)


def test_every_values_key_is_in_the_schema(chart):
    schema = chart.schema

    def walk(values, node, path):
        for key, value in values.items():
            props = node.get("properties", {})
            assert key in props, f"{path}{key} missing from values.schema.json"
            if isinstance(value, dict) and props[key].get("additionalProperties") is False:
                walk(value, props[key], f"{path}{key}.")

    walk(chart.values, schema, "")
