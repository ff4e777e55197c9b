"""Chat over real gRPC on loopback: streaming, resume, batching, one turn at a time."""

import asyncio
import os
import sys

import grpc
import pytest

from nsam.client import AsyncClient, NsamError, Sampling, Token, TurnResult
from nsam.server import metrics

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_chat_streams_tokens_then_commits(client):
    session = await client.create_session("alice", system_prompt="You are terse.")
    assert session.version == 0 and session.user == "alice"
    items = [item async for item in client.chat(session.session_id, "Hello there",
                                                Sampling(max_tokens=12))]
    tokens, done = items[:-1], items[-1]
    assert all(isinstance(t, Token) for t in tokens) and isinstance(done, TurnResult)
    assert len(tokens) == done.completion_tokens == 12
    assert done.finish_reason == "length"
    assert done.text == "".join(t.text for t in tokens)
    assert done.prompt_tokens > 0 and done.session_version == 1 and done.learned

    resumed = await client.get_session(session.session_id, include_transcript=True)
    assert resumed.version == 1 and resumed.turns == 1
    assert [m.role for m in resumed.transcript] == ["system", "user", "assistant"]
    assert resumed.transcript[2].content == done.text


async def test_tokens_arrive_before_the_turn_ends(server, client):
    """The first token is delivered while the model is still decoding the rest."""
    session = await client.create_session("alice")
    seen_first_while_running = False
    async for item in client.chat(session.session_id, "count", Sampling(max_tokens=64)):
        if isinstance(item, Token) and not seen_first_while_running:
            seen_first_while_running = metrics.active_sessions._value.get() >= 1
    assert seen_first_while_running


async def test_stop_sequence_and_seeded_sampling(client):
    session = await client.create_session("alice")
    a = await client.send(session.session_id, "hi", Sampling(max_tokens=16, temperature=0.9,
                                                                top_k=20, top_p=0.9, seed=7))
    s2 = await client.create_session("alice")
    b = await client.send(s2.session_id, "hi", Sampling(max_tokens=16, temperature=0.9,
                                                           top_k=20, top_p=0.9, seed=7))
    assert a.text == b.text  # same seed, same start state
    if a.text.strip():
        stop = a.text.strip()[0]
        c = await client.send((await client.create_session("alice")).session_id, "hi",
                              Sampling(max_tokens=16, temperature=0.9, top_k=20, top_p=0.9,
                                       seed=7, stop=(stop,)))
        assert stop not in c.text and c.finish_reason == "stop"


async def test_sessions_decode_in_one_batch(client):
    def steps_and_rows():
        return (metrics.registry.get_sample_value("nsam_batch_size_count"),
                metrics.registry.get_sample_value("nsam_batch_size_sum"))

    sessions = [await client.create_session(f"user{i}") for i in range(4)]
    steps0, rows0 = steps_and_rows()
    results = await asyncio.gather(*[client.send(s.session_id, "hello", Sampling(max_tokens=100))
                                     for s in sessions])
    steps1, rows1 = steps_and_rows()
    assert all(r.completion_tokens == 100 for r in results)
    assert rows1 - rows0 == 400  # every decode step of every turn was counted
    assert steps1 - steps0 < 300  # ...in far fewer steps: turns shared the batch


async def test_two_concurrent_turns_on_one_session_lose_nothing(client):
    session = await client.create_session("alice")
    r1, r2 = await asyncio.gather(
        client.send(session.session_id, "first message", Sampling(max_tokens=8)),
        client.send(session.session_id, "second message", Sampling(max_tokens=8)))
    assert {r1.session_version, r2.session_version} == {1, 2}
    s = await client.get_session(session.session_id, include_transcript=True)
    assert s.version == 2 and s.turns == 2
    users = [m.content for m in s.transcript if m.role == "user"]
    assert sorted(users) == ["first message", "second message"]
    # the second turn saw the first one: its prompt is longer than a lone first turn
    assert max(r1.prompt_tokens, r2.prompt_tokens) > min(r1.prompt_tokens, r2.prompt_tokens)


async def test_many_concurrent_turns_serialise_per_session(client):
    session = await client.create_session("alice")
    results = await asyncio.gather(*[client.send(session.session_id, f"m{i}",
                                                 Sampling(max_tokens=4)) for i in range(5)])
    assert sorted(r.session_version for r in results) == [1, 2, 3, 4, 5]
    assert (await client.get_session(session.session_id)).version == 5


async def test_cancelled_turn_writes_nothing(server, client, redis_db):
    session = await client.create_session("alice")
    stream = client.chat(session.session_id, "write a lot", Sampling(max_tokens=400))
    async for item in stream:
        break  # the caller walks away after the first token
    await stream.aclose()
    for _ in range(100):  # the lease is released once the server saw the cancellation
        if not [k for k in redis_db[1].keys() if b":lease:" in k]:
            break
        await asyncio.sleep(0.05)
    s = await client.get_session(session.session_id, include_transcript=True)
    assert s.version == 0 and s.transcript == ()
    # and the session is usable again at once
    r = await client.send(session.session_id, "again", Sampling(max_tokens=3))
    assert r.session_version == 1


async def test_ended_session_refuses_turns(client):
    session = await client.create_session("alice")
    await client.send(session.session_id, "hi", Sampling(max_tokens=2))
    ended, enqueued = await client.end_session(session.session_id)
    assert ended.ended and enqueued
    with pytest.raises(NsamError) as err:
        await client.send(session.session_id, "more")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_learning_off_keeps_the_state(start_server, settings):
    from nsam.client import AsyncClient
    server = await start_server(settings, learning=False)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        r = await c.send(s.session_id, "hi", Sampling(max_tokens=4))
        assert r.session_version == 1 and not r.learned
        _, enqueued = await c.end_session(s.session_id)
        assert not enqueued
    state_before = await server.store.get_session(s.session_id, with_state=True)
    assert state_before.state is not None


async def test_graceful_shutdown_drains_turns(start_server, settings):
    from nsam.client import AsyncClient
    server = await start_server(settings)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        stream = c.chat(s.session_id, "long", Sampling(max_tokens=200))
        first = await stream.__anext__()
        assert isinstance(first, Token)
        stopping = asyncio.create_task(server.stop(grace=20))
        rest = [item async for item in stream]
        await stopping
    assert isinstance(rest[-1], TurnResult) and rest[-1].session_version == 1
    # committed: a new server on the same store sees it
    server2 = await start_server(settings)
    assert (await server2.store.get_session(s.session_id)).version == 1


async def test_a_long_turn_keeps_its_lease(start_server, settings):
    """The lease is renewed while a turn runs: a second turn waits instead of stealing it."""
    import time

    from nsam.client import AsyncClient
    server = await start_server(settings, lease_ms=600)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        stream = c.chat(s.session_id, "long", Sampling(max_tokens=50))
        assert isinstance(await stream.__anext__(), Token)  # the turn is decoding now
        # hold the decode thread for 2 s: the turn outlives its 0.6 s lease several times
        stall = asyncio.ensure_future(server.threads[0].call(time.sleep, 2.0))
        await asyncio.sleep(1.0)
        quick = await c.send(s.session_id, "short", Sampling(max_tokens=2))
        long = [item async for item in stream][-1]
        await stall
    assert (long.session_version, quick.session_version) == (1, 2)


async def test_idle_sessions_expire(start_server, settings):
    from nsam.client import AsyncClient
    server = await start_server(settings, session_ttl_s=1)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        await asyncio.sleep(1.3)
        with pytest.raises(NsamError) as err:
            await c.get_session(s.session_id)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert (await c.memory("alice")).levels[1:] == ()  # dropped from the index too


async def test_learning_never_stalls_decoding(server, client):
    """Medium updates and consolidation run on their own model copies: while both are busy,
    another session's tokens still stream at once."""
    import time
    decode, learn, consolidate = server.threads
    assert decode.model is not learn.model is not consolidate.model
    if sys.platform == "linux":  # the OS schedules the learning threads below decoding
        nice = [os.getpriority(os.PRIO_PROCESS, t._thread.native_id) for t in server.threads]
        assert nice[1] > nice[0] and nice[2] > nice[0]
    stalls = [asyncio.ensure_future(t.call(time.sleep, 3.0)) for t in (learn, consolidate)]
    await asyncio.sleep(0.1)
    s = await client.create_session("bob")
    started = time.perf_counter()
    stream = client.chat(s.session_id, "hi", Sampling(max_tokens=8))
    assert isinstance(await stream.__anext__(), Token)
    assert time.perf_counter() - started < 1.5  # the first token did not wait for the stall
    done = [item async for item in stream][-1]  # nor did the turn: its medium update is queued
    assert not stalls[0].done() and done.learned and done.learnt_turns == 0  # the learner is still held
    assert (await client.get_session(s.session_id)).learnt_turns == 0
    await asyncio.gather(*stalls)
    await server.engine.learner_queue.drain(s.session_id)
    assert (await client.get_session(s.session_id)).learnt_turns == 1

