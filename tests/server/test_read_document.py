"""ReadDocument over real gRPC on loopback: a long text goes into the session's levels, not its
transcript; bad requests are refused with a clear error and change nothing."""

import grpc
import pytest

from nsam.client import AsyncClient, NsamError, Sampling
from nsam.server import metrics

from server_support import damage_state

pytestmark = pytest.mark.asyncio(loop_scope="session")

# ~2,400 bytes: ten 256-token chunks for the tiny model's byte tokenizer.
DOCUMENT = " ".join(f"The lighthouse keeper of island {i} logged the weather at dawn and dusk." for i in range(32))


async def test_a_document_is_read_into_memory_and_committed(server, client):
    session = await client.create_session("alice", system_prompt="You are terse.")
    before = await server.store.get_session(session.session_id, with_state=True)
    tokens_before = metrics.document_tokens_total._value.get()
    read = await client.read_document(session.session_id, DOCUMENT)
    assert read.session_version == 1 and read.rejected_updates == 0
    assert read.tokens == len(DOCUMENT.encode()) and read.chunks == -(-read.tokens // 256)
    assert 1.0 < read.perplexity < 1e6
    assert metrics.document_tokens_total._value.get() - tokens_before == read.tokens
    after = await client.get_session(session.session_id, include_transcript=True)
    assert after.version == 1 and after.turns == 1
    assert [m.role for m in after.transcript] == ["system"]  # the text is not in the transcript
    stored = await server.store.get_session(session.session_id, with_state=True)
    assert stored.state != before.state  # ...but in the levels
    r = await client.send(session.session_id, "What did the keeper log?", Sampling(max_tokens=4))
    assert r.session_version == 2


async def test_bad_requests_are_refused_and_change_nothing(server, client):
    session = await client.create_session("alice")
    for text, code, words in (("   ", grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"),
                              ("x" * 200_001, grpc.StatusCode.INVALID_ARGUMENT, "at most 200000"),
                              ("a\x00b", grpc.StatusCode.INVALID_ARGUMENT, "NUL")):
        with pytest.raises(NsamError) as err:
            await client.read_document(session.session_id, text)
        assert err.value.code == code and words in err.value.message
    with pytest.raises(NsamError) as err:
        await client.read_document("alice:" + "f" * 24, DOCUMENT)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert (await client.get_session(session.session_id)).version == 0
    await client.end_session(session.session_id, consolidate=False)
    with pytest.raises(NsamError) as err:
        await client.read_document(session.session_id, DOCUMENT)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "ended" in err.value.message


async def test_a_server_that_does_not_learn_refuses_documents(start_server, settings):
    server = await start_server(settings, learning=False)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        with pytest.raises(NsamError) as err:
            await c.read_document(s.session_id, DOCUMENT)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "learning off" in err.value.message
        assert (await c.get_session(s.session_id)).version == 0


async def test_a_damaged_session_state_fails_the_read_and_keeps_the_session(client, redis_db):
    r = redis_db[1]
    s = await client.create_session("alice")
    key = f"nsam:{{alice}}:session:{s.session_id}"
    damage_state(r, key)
    damaged = r.hget(key, "state")
    with pytest.raises(NsamError) as err:
        await client.read_document(s.session_id, DOCUMENT)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "create a new session" in err.value.message
    assert (await client.get_session(s.session_id)).turns == 0 and r.hget(key, "state") == damaged
