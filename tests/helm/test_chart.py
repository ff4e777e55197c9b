"""The chart lints, renders for every optional part, and each manifest is a valid Kubernetes
object; the pieces that must agree (selectors, labels, ports, embedded files) do."""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from helm_support import CHART, DASHBOARD, NAMESPACE, RULES, find, one

kv = pytest.importorskip("kubernetes_validate")
helm = pytest.importorskip("helm_python")

# Newest Kubernetes the validator knows, and the oldest the chart supports (grpc probes GA).
KUBE_VERSIONS = (kv.utils.latest_version(), "1.27")

EVERYTHING_ON = {
    "server": {
        "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
        "podDisruptionBudget": {"enabled": True},
        "gpu": {"enabled": True, "count": 2},
        "tls": {"enabled": True, "secretName": "nsam-tls"},
        "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
        "extraArgs": ["--max-batch=16"],
        "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "4"}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "image": {"variant": "cuda"},
    "apiKeys": {"keys": [{"key": "key-alice-0001", "principal": "user:alice"},
                         {"key": "key-operator-0001", "principal": "admin"}]},
    "worker": {"replicaCount": 3},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
    },
}

SCENARIOS = {
    "defaults": {},
    "everything-on": EVERYTHING_ON,
    "external-redis-url": {"redis": {"enabled": False},
                           "externalRedis": {"url": "redis://:pw@redis-master:6379/2"}},
    "external-redis-secret": {"redis": {"enabled": False},
                              "externalRedis": {"existingSecret": "my-redis", "existingSecretKey": "url"}},
    "inprocess-consolidation": {"worker": {"enabled": False}},
    "no-auth-no-persistence": {"apiKeys": {"enabled": False}, "redis": {"persistence": {"enabled": False}},
                               "networkPolicy": {"enabled": False}, "tests": {"enabled": False}},
    "existing-api-keys": {"apiKeys": {"existingSecret": "team-keys", "secretKey": "keys.txt"},
                          "server": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"}}},
}

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_clean(scenario):
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{kv.utils.latest_version()}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert report["total_charts_linted"] == 1 and not problems, problems


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_manifests_validate(render, scenario):
    docs = render(SCENARIOS[scenario])
    assert docs
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE or doc["kind"] == "ConfigMap"
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"
        if doc["kind"] in CRD_KINDS:
            continue  # no OpenAPI schema shipped for CRDs; see test_crd_structure
        for version in KUBE_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as err:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid on {version}: {err}")


def kinds(docs):
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


def test_defaults_render_the_small_install(render):
    got = kinds(render({}))
    assert got == sorted([
        ("ConfigMap", "demo-nsam"), ("Secret", "demo-nsam-api-keys"), ("ServiceAccount", "demo-nsam"),
        ("Deployment", "demo-nsam-server"), ("Service", "demo-nsam-server"),
        ("Deployment", "demo-nsam-worker"), ("Service", "demo-nsam-worker"),
        ("StatefulSet", "demo-nsam-redis"), ("Service", "demo-nsam-redis"),
        ("Secret", "demo-nsam-redis-auth"),
        ("NetworkPolicy", "demo-nsam-redis"), ("Pod", "demo-nsam-test-grpc-health"),
    ])


def test_everything_on_adds_each_optional_part(render):
    got = {k for k, _ in kinds(render(EVERYTHING_ON))}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"} <= got
    dash = one(render(EVERYTHING_ON), "ConfigMap", "-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(dash["data"]["nsam.json"]) == json.loads(DASHBOARD.read_text())


def pod_labels(deploy):
    return deploy["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_selectors_match_their_pods(render, scenario):
    docs = render(SCENARIOS[scenario])
    workloads = find(docs, "Deployment") + find(docs, "StatefulSet")
    for w in workloads:
        assert selects(w["spec"]["selector"]["matchLabels"], pod_labels(w))
    for svc in find(docs, "Service"):
        matched = [w for w in workloads if selects(svc["spec"]["selector"], pod_labels(w))]
        assert len(matched) == 1, svc["metadata"]["name"]
        ports = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def test_server_probes_use_grpc_health(render):
    server = one(render({}), "Deployment", "-server")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["grpc"] == {"port": 50051}
    # a Redis outage takes replicas out of the Service but does not restart them
    assert server["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    assert "--host=0.0.0.0" in server["args"] and server["args"][:2] == ["--log-level=$(NSAM_LOG_LEVEL)", "serve"]
    assert "--consolidation=$(NSAM_CONSOLIDATION)" in server["args"]
    assert "nvidia.com/gpu" not in server["resources"].get("limits", {})


def test_gpu_and_tls(render):
    pod = one(render(EVERYTHING_ON), "Deployment", "-server")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert server["resources"]["limits"]["memory"] == "8Gi"
    assert server["image"].endswith(":0.1.0-cuda")
    assert "--tls-cert=/etc/nsam/tls/tls.crt" in server["args"]
    # Kubernetes' grpc probe has no TLS: it falls back to TCP.
    assert server["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert {"name": "tls", "secret": {"secretName": "nsam-tls", "defaultMode": 0o440}} in pod["volumes"]


def test_consolidation_mode_follows_worker_switch(render):
    def mode(values):
        return one(render(values), "ConfigMap", "-nsam")["data"]["NSAM_CONSOLIDATION"]
    assert mode({}) == "external"
    assert mode({"worker": {"enabled": False}}) == "inprocess"
    assert not find(render({"worker": {"enabled": False}}), "Deployment", "-worker")


def env_of(deploy) -> dict:
    return {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_redis_url_sources(render):
    # In-chart Redis with its password: the URL is assembled from the Secret in the pod.
    docs = render({})
    password = one(docs, "Secret", "-redis-auth")["data"]["redis-password"]
    assert len(base64.b64decode(password)) == 32
    for deploy in find(docs, "Deployment"):
        env = env_of(deploy)
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "demo-nsam-redis-auth", "key": "redis-password"}
        assert env["NSAM_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@demo-nsam-redis:6379/0"
        names = list(env)
        assert names.index("REDIS_PASSWORD") < names.index("NSAM_REDIS_URL")  # $(VAR) needs order
    assert "NSAM_REDIS_URL" not in one(docs, "ConfigMap", "-nsam")["data"]

    docs = render({"redis": {"auth": {"enabled": False}}})
    assert not find(docs, "Secret", "-redis-auth")
    assert env_of(one(docs, "Deployment", "-server"))["NSAM_REDIS_URL"]["value"] == "redis://demo-nsam-redis:6379/0"

    docs = render({"redis": {"auth": {"existingSecret": "ops-redis", "existingSecretKey": "pw"}}})
    assert not find(docs, "Secret", "-redis-auth")
    assert env_of(one(docs, "Deployment", "-worker"))["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "ops-redis", "key": "pw"}

    docs = render(SCENARIOS["external-redis-url"])
    assert not find(docs, "StatefulSet") and not find(docs, "NetworkPolicy") and not find(docs, "Secret", "-redis-auth")
    secret = one(docs, "Secret", "-redis-url")
    assert secret["stringData"]["redis-url"] == "redis://:pw@redis-master:6379/2"

    docs = render(SCENARIOS["external-redis-secret"])
    assert not find(docs, "Secret", "-redis-url")
    for deploy in find(docs, "Deployment"):
        assert env_of(deploy)["NSAM_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "url"}


def test_redis_requires_the_password(render):
    container = one(render({}), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e for e in container["env"]}
    assert env["REDISCLI_AUTH"]["value"] == "$(REDIS_PASSWORD)"  # for the redis-cli probes
    container = one(render({"redis": {"auth": {"enabled": False}}}), "StatefulSet")["spec"]["template"]["spec"][
        "containers"][0]
    assert "--requirepass" not in container["args"] and "env" not in container


def test_redis_persists_with_aof(render):
    sts = one(render({}), "StatefulSet")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    no_pvc = one(render(SCENARIOS["no-auth-no-persistence"]), "StatefulSet")
    assert "volumeClaimTemplates" not in no_pvc["spec"]
    assert {"name": "data", "emptyDir": {}} in no_pvc["spec"]["template"]["spec"]["volumes"]


def test_network_policy_admits_only_server_and_worker(render):
    docs = render({})
    policy = one(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(one(docs, "StatefulSet")))
    peers = [p["podSelector"]["matchLabels"] for p in policy["spec"]["ingress"][0]["from"]]
    admitted = {d["metadata"]["name"] for d in find(docs, "Deployment") + find(docs, "Pod")
                if any(selects(p, pod_labels(d) if d["kind"] != "Pod" else d["metadata"]["labels"]) for p in peers)}
    assert admitted == {"demo-nsam-server", "demo-nsam-worker"}


def test_api_keys_secret_and_mount(render):
    docs = render(EVERYTHING_ON)
    secret = one(docs, "Secret", "-api-keys")
    assert secret["stringData"]["api-keys"].splitlines() == ["key-alice-0001 user:alice", "key-operator-0001 admin"]
    server = one(docs, "Deployment", "-server")["spec"]["template"]["spec"]["containers"][0]
    assert "--api-keys-file=/etc/nsam/api-keys/api-keys" in server["args"]

    docs = render(SCENARIOS["existing-api-keys"])
    assert not find(docs, "Secret", "-api-keys")
    pod = one(docs, "Deployment", "-server")["spec"]["template"]["spec"]
    assert "--api-keys-file=/etc/nsam/api-keys/keys.txt" in pod["containers"][0]["args"]
    assert any(v.get("secret", {}).get("secretName") == "team-keys" for v in pod["volumes"])
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == "25%" and "minAvailable" not in pdb
    assert pdb["selector"]["matchLabels"] == one(docs, "Deployment", "-server")["spec"]["selector"]["matchLabels"]

    server = one(render(SCENARIOS["no-auth-no-persistence"]), "Deployment", "-server")
    assert not any(a.startswith("--api-keys-file") for a in server["spec"]["template"]["spec"]["containers"][0]["args"])


def test_hpa_targets_server_and_drops_replicas(render):
    docs = render(EVERYTHING_ON)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "demo-nsam-server"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu", "memory"]
    assert "replicas" not in one(docs, "Deployment", "-server")["spec"]


def test_pods_run_as_non_root(render):
    for doc in find(render(EVERYTHING_ON), "Deployment") + find(render({}), "StatefulSet"):
        spec = doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_config_change_rolls_pods(render):
    def checksum(values):
        return one(render(values), "Deployment", "-server")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"]
    assert checksum({}) != checksum({"model": {"dtype": "bfloat16"}})


# --- CRDs: no schema ships with kubernetes-validate, so check the fields the operator needs ---

def test_crd_structure(render):
    docs = render(EVERYTHING_ON)
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    endpoint, = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "10s"
    # The selector finds exactly the server and worker Services, and both name a `metrics` port.
    exprs = sm["spec"]["selector"]["matchExpressions"]
    picked = [s for s in find(docs, "Service")
              if all(s["metadata"]["labels"].get(e["key"]) in e["values"] for e in exprs)]
    assert sorted(s["metadata"]["name"] for s in picked) == ["demo-nsam-server", "demo-nsam-worker"]
    assert all("metrics" in {p["name"] for p in s["spec"]["ports"]} for s in picked)

    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "rules", "interval", "limit"}
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert isinstance(r["expr"], str) and r["labels"]["severity"] in {"warning", "critical"}


def test_notes_mention_endpoint_and_warnings(chart):
    notes = chart.render(values={}, name="demo", namespace=NAMESPACE)["nsam/templates/NOTES.txt"]
    assert "demo-nsam-server.llm.svc:50051" in notes
    assert "apiKeys.keys is empty" in notes
    notes = chart.render(values={"apiKeys": {"enabled": False}}, name="demo", namespace=NAMESPACE)[
        "nsam/templates/NOTES.txt"]
    assert "unauthenticated" in notes


def test_chart_test_pod_checks_grpc_health(render):
    pod = one(render({}), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "HealthStub" in script and 'host, port = "demo-nsam-server", 50051' in script
    compile(script, "test-grpc-health", "exec")
    tls_script = one(render(EVERYTHING_ON), "Pod")["spec"]["containers"][0]["args"][0]
    assert "set_alpn_protocols" in tls_script and "HealthStub" not in tls_script
    compile(tls_script, "test-grpc-health", "exec")
