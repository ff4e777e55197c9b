"""The flags the chart passes are the flags `nsam` takes: each container's args, with the
`$(VAR)` references expanded from the ConfigMap as the kubelet would, go through the real
`nsam.server.cli.main` and come out as the intended Settings."""

from __future__ import annotations

import re


from helm_support import one

from nsam.server import cli  # noqa: E402


def expand(text: str, env: dict) -> str:
    """The kubelet's $(VAR) expansion."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def container_argv(docs, suffix, tmp_path):
    cm = one(docs, "ConfigMap", "-nsam")["data"]
    container = one(docs, "Deployment", suffix)["spec"]["template"]["spec"]["containers"][0]
    env = dict(cm)
    secrets = {"NSAM_REDIS_URL": "redis://from-secret:6379/0", "REDIS_PASSWORD": "pw"}
    for e in container.get("env", []):  # in order: a value may refer to an earlier variable
        env[e["name"]] = expand(e["value"], env) if "value" in e else secrets[e["name"]]
    argv = [expand(a, env) for a in container["args"]]
    # The API-keys Secret is mounted at /etc/nsam/api-keys; settings check the file exists.
    (tmp_path / "api-keys").write_text("key-alice-0001 user:alice\n")
    return [a.replace("/etc/nsam/api-keys/", f"{tmp_path}/") for a in argv]


def run_cli(monkeypatch, argv):
    seen = {}

    async def record(settings):
        seen["settings"] = settings

    monkeypatch.setattr(cli, "serve", record)
    monkeypatch.setattr(cli, "consolidate", record)
    for name in ("NSAM_REDIS_URL", "NSAM_MODEL", "NSAM_API_KEYS_FILE", "NSAM_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(argv) == 0
    return seen["settings"]


def test_server_args_parse(render, monkeypatch, tmp_path):
    docs = render({"model": {"dtype": "bfloat16", "maxBatch": 16, "consolidateEveryTurns": 4, "learnerQueue": 9}})
    s = run_cli(monkeypatch, container_argv(docs, "-server", tmp_path))
    assert (s.host, s.port, s.metrics_port) == ("0.0.0.0", 50051, 9464)
    assert (s.model, s.dtype, s.max_batch) == ("default", "bfloat16", 16)
    assert s.consolidation == "external" and s.learning and s.consolidate_every_turns == 4
    assert s.learner_queue == 9
    assert s.redis_url == "redis://:pw@demo-nsam-redis:6379/0"
    assert s.api_keys_file is not None and s.api_keys_file.name == "api-keys"
    assert str(s.data_dir) == "/data"


def test_server_args_parse_inprocess_external_redis(render, monkeypatch, tmp_path):
    docs = render({"worker": {"enabled": False}, "model": {"learning": False},
                   "redis": {"enabled": False}, "externalRedis": {"existingSecret": "r"}})
    s = run_cli(monkeypatch, container_argv(docs, "-server", tmp_path))
    assert s.consolidation == "inprocess" and not s.learning
    assert s.redis_url == "redis://from-secret:6379/0"


def test_worker_args_parse(render, monkeypatch, tmp_path):
    s = run_cli(monkeypatch, container_argv(render({}), "-worker", tmp_path))
    assert s.metrics_port == 9464 and s.model == "default"
    assert s.redis_url == "redis://:pw@demo-nsam-redis:6379/0"


def test_worker_metrics_listen_on_all_interfaces(render, monkeypatch, tmp_path):
    s = run_cli(monkeypatch, container_argv(render({}), "-worker", tmp_path))
    assert s.host == "0.0.0.0"
