"""`nsam serve` as a process: embedded Redis by default, /metrics, chat, graceful SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from argparse import Namespace

import pytest

from nsam.server.settings import Settings, settings_from_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_settings_from_flags_and_env(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k admin\n")
    env = {"NSAM_REDIS_URL": "redis://r:6379/0", "NSAM_MODEL": "tiny",
           "NSAM_API_KEYS_FILE": str(keys), "HOME": str(tmp_path)}
    s = settings_from_args(Namespace(), env)
    assert (s.redis_url, s.model, s.api_keys_file, s.open_mode) == ("redis://r:6379/0", "tiny", keys, False)
    s = settings_from_args(Namespace(redis_url="redis://other/1", model="default", learning="off"), env)
    assert (s.redis_url, s.model, s.learning) == ("redis://other/1", "default", False)
    assert settings_from_args(Namespace(), {"HOME": str(tmp_path)}).open_mode
    with pytest.raises(ValueError, match="tls"):
        settings_from_args(Namespace(tls_cert=keys), env)
    with pytest.raises(ValueError, match="does not exist"):
        settings_from_args(Namespace(api_keys_file=tmp_path / "missing"), {})
    assert settings_from_args(Namespace(), env).learner_queue == 64
    assert settings_from_args(Namespace(learner_queue=3), env).learner_queue == 3
    with pytest.raises(ValueError, match="--learner-queue"):
        settings_from_args(Namespace(learner_queue=0), env)
    with pytest.raises(Exception):
        Settings().port = 1  # frozen


def test_nsam_serve_process(tmp_path):
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "NSAM_MODEL": "tiny"}
    env.pop("NSAM_REDIS_URL", None)
    env.pop("NSAM_API_KEYS_FILE", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "nsam.server.cli", "serve", "--port", str(port),
         "--metrics-port", str(metrics_port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        banner = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = server.stdout.readline()
            banner.append(line)
            if "nsam chat" in line or not line:
                break
        text = "".join(banner)
        assert f"127.0.0.1:{port}" in text and "embedded Redis" in text, text
        assert "OPEN LOCAL MODE" in text

        chat = subprocess.run(
            [sys.executable, "-m", "nsam.server.cli", "chat", "--target", f"127.0.0.1:{port}",
             "--user", "alice", "--max-tokens", "5"],
            input="hello\n/memory\n/quit\n", capture_output=True, text=True, timeout=60)
        assert chat.returncode == 0, chat.stderr
        assert "[length, 5 tokens, session v1, learned]" in chat.stdout
        assert "session ended; consolidation queued" in chat.stdout

        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'nsam_requests_total{code="OK",method="ChatService/Chat"} 1.0' in body
        assert "nsam_time_to_first_token_seconds_count 1.0" in body
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0, out
    assert "draining" in out
    # the embedded Redis saved and stopped on request (no SIGTERM fallback), no thread left running
    assert "shutdown failed" not in out and "terminate called" not in out, out


def test_nsam_consolidate_process(redis_db, tmp_path):
    """An external worker process consumes jobs a server with --consolidation external queued."""
    import asyncio

    from nsam.client import AsyncClient, Sampling
    from nsam.server.app import NsamServer

    url, r = redis_db
    worker = subprocess.Popen(
        [sys.executable, "-m", "nsam.server.cli", "consolidate", "--redis-url", url,
         "--model", "tiny", "--metrics-port", "0", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    async def scenario() -> int:
        server = await NsamServer.start(Settings(
            port=0, metrics_port=0, redis_url=url, model="tiny", consolidation="external"))
        try:
            assert server.worker is None
            async with AsyncClient(f"127.0.0.1:{server.port}") as c:
                s = await c.create_session("alice")
                await c.send(s.session_id, "I live in Oslo.", Sampling(max_tokens=4))
                _, enqueued = await c.end_session(s.session_id)
                assert enqueued
                for _ in range(1200):  # the worker process imports torch first
                    version = (await c.memory("alice")).version
                    if version:
                        return version
                    await asyncio.sleep(0.1)
                return 0
        finally:
            await server.stop(1)

    try:
        version = asyncio.run(scenario())
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert version == 1, out
    assert worker.returncode == 0, out
    assert "consolidation worker" in out


def test_training_tools_run_from_the_command_line(tmp_path, capsys):
    from nsam.server.cli import main

    out = tmp_path / "fast.safetensors"
    assert main(["train-memory", "--model", "tiny", "--steps", "0", "--eval-episodes", "2",
                 "--out", str(out)]) == 0
    assert out.exists() and '"after"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train-memory", "--model", "tiny", "--read-scale", "-1", "--out", str(tmp_path / "never")])
    assert "cannot be negative" in capsys.readouterr().err
    assert main(["anchor-text", "--model", "tiny", "--tokens", "4", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "anchor.txt").exists()
