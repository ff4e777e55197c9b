"""A user's memory: consolidation, export/import, rollback, forget, isolation between users."""

import asyncio

import grpc
import pytest

from nsam.client import AsyncClient, NsamError, Sampling
from nsam.server.store import STREAM
from server_support import damage_state

pytestmark = pytest.mark.asyncio(loop_scope="session")

GREEDY = Sampling(max_tokens=16)


async def learn_something(client: AsyncClient, user: str, text: str = "My dog's name is Rex.") -> None:
    s = await client.create_session(user)
    await client.send(s.session_id, text, Sampling(max_tokens=6))
    await client.end_session(s.session_id, consolidate=False)
    [result] = await client.consolidate_now(user, s.session_id)
    assert result.outcome == "accepted", result


async def test_consolidation_via_the_stream_worker(client):
    s = await client.create_session("alice")
    await client.send(s.session_id, "My dog's name is Rex.", Sampling(max_tokens=6))
    _, enqueued = await client.end_session(s.session_id)
    assert enqueued
    for _ in range(200):
        if (await client.memory("alice")).version == 1:
            break
        await asyncio.sleep(0.05)
    info = await client.memory("alice")
    assert info.version == 1 and info.versions[0].source == "consolidation"
    # each note the level was taught: what it is about, its value, and the answer rehearsed
    assert [(f.key, f.value, f.answer) for f in info.facts] == [("My dog's name is", "Rex", "Your dog's name is Rex.")]
    for _ in range(200):  # the worker records the job's outcome just after it commits the level
        health = await client.memory_health()
        if health.jobs_by_outcome.get("accepted") == 1 and health.queue_depth == 0:
            break
        await asyncio.sleep(0.05)
    assert health.jobs_by_outcome.get("accepted") == 1 and health.queue_depth == 0
    # a new session starts from the new user level
    s2 = await client.create_session("alice")
    assert s2.user_memory_version == 1
    # consolidating the same session again has nothing new
    [again] = await client.consolidate_now("alice", s.session_id)
    assert again.outcome == "skipped"


async def import_empty(client: AsyncClient, user: str):
    """A new version without a consolidation: the empty level, imported."""
    empty = await client.export_memory("nobody-" + user)
    return await client.import_memory(empty.state, user)


async def test_rollback_restores_earlier_version_byte_for_byte(client):
    assert (await import_empty(client, "alice")).version == 1
    v1 = await client.export_memory("alice")
    await learn_something(client, "alice", "My dog's name is Rex.")
    v2 = await client.export_memory("alice")
    assert (v1.version, v2.version) == (1, 2) and v1.state != v2.state
    restored = await client.rollback(1, "alice")
    assert restored.version == 3 and restored.source == "rollback"
    now = await client.export_memory("alice")
    assert now.version == 3 and now.state == v1.state
    assert (await client.export_memory("alice", version=2)).state == v2.state
    info = await client.memory("alice")
    assert [v.version for v in info.versions] == [3, 2, 1]
    # a session started now reads the restored level
    assert (await client.create_session("alice")).user_memory_version == 3


async def test_only_the_last_versions_are_kept(start_server, settings):
    server = await start_server(settings, user_versions_kept=2)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        for _ in range(3):
            await import_empty(c, "alice")
        info = await c.memory("alice")
        assert [v.version for v in info.versions] == [3, 2]
        with pytest.raises(NsamError) as err:
            await c.rollback(1, "alice")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_export_import_roundtrip(client):
    await learn_something(client, "alice")
    exported = await client.export_memory("alice")
    assert exported.state[:8] and exported.model_fingerprint
    imported = await client.import_memory(exported.state, "bob")
    assert imported.version == 1 and imported.source == "import"
    assert (await client.export_memory("bob")).state == exported.state
    # compare-and-set guard
    with pytest.raises(NsamError) as err:
        await client.import_memory(exported.state, "bob", expected_version=0)
    assert err.value.code == grpc.StatusCode.ABORTED
    assert (await client.memory("bob")).version == 1


async def test_export_of_a_new_user_is_the_empty_level(client):
    exported = await client.export_memory("nobody")
    assert exported.version == 0 and len(exported.state) > 0


async def test_forget_user_leaves_no_key(client, redis_db):
    r = redis_db[1]
    await learn_something(client, "alice")
    s = await client.create_session("alice")
    await client.send(s.session_id, "hello", Sampling(max_tokens=3))
    await client.end_session(s.session_id)  # a queued job that names alice
    await import_empty(client, "bob")
    assert r.keys("nsam:{alice}:*")
    deleted = await client.forget("alice")
    assert deleted > 0
    assert r.keys("*alice*") == []
    assert all(b"alice" not in v for _, f in r.xrange(STREAM) for v in f.values())
    assert r.keys("nsam:{bob}:*")  # bob untouched
    assert (await client.memory("alice")).version == 0
    with pytest.raises(NsamError) as err:
        await client.get_session(s.session_id)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_another_users_learning_leaves_my_outputs_unchanged(client):
    bob = await client.create_session("bob")
    before = await client.send(bob.session_id, "Tell me a story.", GREEDY)
    await learn_something(client, "alice", "My dog's name is Rex. I live in Oslo.")
    assert (await client.memory("alice")).version == 1
    bob2 = await client.create_session("bob")
    after = await client.send(bob2.session_id, "Tell me a story.", GREEDY)
    assert after.text == before.text and after.user_memory_version == 0


async def test_rollback_to_a_bad_version_is_refused(client):
    await learn_something(client, "alice")
    for version in (0, 1, 7):
        with pytest.raises(NsamError) as err:
            await client.rollback(version, "alice")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await client.memory("alice")).version == 1


async def test_a_damaged_stored_level_is_refused_with_what_to_do_and_rollback_recovers(client, redis_db):
    r = redis_db[1]
    await import_empty(client, "alice")
    await import_empty(client, "alice")
    damage_state(r, "nsam:{alice}:level:2")
    with pytest.raises(NsamError) as err:
        await client.create_session("alice")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "corrupt" in err.value.message and "RollbackMemory" in err.value.message
    info = await client.memory("alice")  # still lists the versions to roll back to
    assert [v.version for v in info.versions] == [2, 1] and info.facts == ()
    await client.rollback(1, "alice")
    assert (await client.create_session("alice")).user_memory_version == 3


async def test_a_damaged_session_state_fails_the_turn_and_keeps_the_session(client, redis_db):
    r = redis_db[1]
    s = await client.create_session("alice")
    damage_state(r, f"nsam:{{alice}}:session:{s.session_id}")
    with pytest.raises(NsamError) as err:
        await client.send(s.session_id, "hello", Sampling(max_tokens=3))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "create a new session" in err.value.message
    assert (await client.get_session(s.session_id)).turns == 0
    fresh = await client.create_session("alice")
    assert (await client.send(fresh.session_id, "hello", Sampling(max_tokens=3))).text
