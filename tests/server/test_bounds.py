"""Every bad field is refused with the right status code before anything runs, and changes
nothing in the store."""

import grpc
import pytest

from nsam.protos import nsam_pb2 as pb
from nsam.protos import nsam_pb2_grpc as pb_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def snapshot(r) -> dict:
    return {k: (r.type(k), r.dump(k)) for k in sorted(r.keys("*"))}


@pytest.fixture
async def stubs(server):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield (pb_grpc.ChatServiceStub(channel), pb_grpc.MemoryServiceStub(channel),
           pb_grpc.AdminServiceStub(channel))
    await channel.close()


@pytest.fixture
async def session_id(server, stubs):
    chat, _, _ = stubs
    s = await chat.CreateSession(pb.CreateSessionRequest(user="alice"))
    async for _ in chat.Chat(pb.ChatRequest(session_id=s.session_id, message="hi",
                                            sampling=pb.SamplingParams(max_tokens=2))):
        pass
    await server.engine.learner_queue.drain(s.session_id)  # the turn's medium update has committed
    return s.session_id


async def expect(code, call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    assert err.value.code() == code, err.value.details()
    return err.value.details()


BAD_SAMPLING = [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=100_000), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=7.0), "temperature"),
    (dict(top_k=5000), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=0.3), "repetition_penalty"),
    (dict(seed=2**63), "seed"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(stop=["x"] * 20), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(stop=["y" * 500]), "stop"),
    (dict(stop_token_ids=list(range(100))), "stop_token_ids"),
]


@pytest.mark.parametrize("fields,name", BAD_SAMPLING, ids=[n + str(i) for i, (_, n) in enumerate(BAD_SAMPLING)])
async def test_bad_sampling_is_invalid_and_writes_nothing(stubs, session_id, redis_db, fields, name):
    chat, _, _ = stubs
    before = snapshot(redis_db[1])
    details = await expect(INVALID, lambda: chat.Chat(pb.ChatRequest(
        session_id=session_id, message="hello", sampling=pb.SamplingParams(**fields))))
    assert name in details
    assert snapshot(redis_db[1]) == before


BAD_CHAT = [
    (dict(message=""), INVALID, "message"),
    (dict(message="   "), INVALID, "message"),
    (dict(message="x" * 20_000), INVALID, "message"),
    (dict(message="a\x00b"), INVALID, "message"),
    (dict(message="y " * 9000, sampling=pb.SamplingParams(max_tokens=16)), INVALID, "message"),
    (dict(session_id=""), INVALID, "session_id"),
    (dict(session_id="not-a-session"), INVALID, "session_id"),
    (dict(session_id="alice:" + "0" * 24), grpc.StatusCode.NOT_FOUND, "not found"),
    (dict(session_id="../../etc:" + "0" * 24), INVALID, "session_id"),
]


@pytest.mark.parametrize("fields,code,word", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
async def test_bad_chat_fields(stubs, session_id, redis_db, fields, code, word):
    chat, _, _ = stubs
    before = snapshot(redis_db[1])
    request = dict(session_id=session_id, message="hello")
    request.update(fields)
    details = await expect(code, lambda: chat.Chat(pb.ChatRequest(**request)))
    assert word in details
    assert snapshot(redis_db[1]) == before


async def test_message_that_fills_the_window_is_refused(stubs, session_id, redis_db, server):
    chat, _, _ = stubs
    before = snapshot(redis_db[1])
    window = server.engine.context_window
    details = await expect(INVALID, lambda: chat.Chat(pb.ChatRequest(
        session_id=session_id, message="z" * (window - 50),
        sampling=pb.SamplingParams(max_tokens=100))))
    assert "context window" in details
    assert snapshot(redis_db[1]) == before


BAD_OTHER = [
    ("CreateSession", lambda c, m, a: c.CreateSession(pb.CreateSessionRequest(user="")), INVALID),
    ("CreateSession", lambda c, m, a: c.CreateSession(pb.CreateSessionRequest(user="a b")), INVALID),
    ("CreateSession", lambda c, m, a: c.CreateSession(pb.CreateSessionRequest(user="x" * 200)), INVALID),
    ("CreateSession", lambda c, m, a: c.CreateSession(pb.CreateSessionRequest(user="{alice}")), INVALID),
    ("CreateSession", lambda c, m, a: c.CreateSession(
        pb.CreateSessionRequest(user="alice", system_prompt="s" * 20_000)), INVALID),
    ("CreateSession", lambda c, m, a: c.CreateSession(   # fits the characters, not the window
        pb.CreateSessionRequest(user="alice", system_prompt="s" * 15_000)), INVALID),
    ("GetSession", lambda c, m, a: c.GetSession(pb.GetSessionRequest(session_id="nope")), INVALID),
    ("GetSession", lambda c, m, a: c.GetSession(
        pb.GetSessionRequest(session_id="bob:" + "1" * 24)), grpc.StatusCode.NOT_FOUND),
    ("EndSession", lambda c, m, a: c.EndSession(
        pb.EndSessionRequest(session_id="bob:" + "1" * 24)), grpc.StatusCode.NOT_FOUND),
    ("GetMemory", lambda c, m, a: m.GetMemory(pb.GetMemoryRequest(user="*")), INVALID),
    ("ExportMemory", lambda c, m, a: m.ExportMemory(
        pb.ExportMemoryRequest(user="alice", version=5)), grpc.StatusCode.NOT_FOUND),
    ("ImportMemory", lambda c, m, a: m.ImportMemory(
        pb.ImportMemoryRequest(user="alice", state=b"")), INVALID),
    ("ImportMemory", lambda c, m, a: m.ImportMemory(
        pb.ImportMemoryRequest(user="alice", state=b"not safetensors at all")), INVALID),
    ("RollbackMemory", lambda c, m, a: m.RollbackMemory(
        pb.RollbackMemoryRequest(user="alice", version=0)), INVALID),
    ("ForgetUser", lambda c, m, a: m.ForgetUser(pb.ForgetUserRequest(user="al*")), INVALID),
    ("ConsolidateNow", lambda c, m, a: a.ConsolidateNow(
        pb.ConsolidateNowRequest(session_id="bad")), INVALID),
    ("ConsolidateNow", lambda c, m, a: a.ConsolidateNow(pb.ConsolidateNowRequest(user="")), INVALID),
]


@pytest.mark.parametrize("rpc,call,code", BAD_OTHER, ids=[f"{r}{i}" for i, (r, _, _) in enumerate(BAD_OTHER)])
async def test_bad_fields_of_other_rpcs(stubs, session_id, redis_db, rpc, call, code):
    before = snapshot(redis_db[1])
    await expect(code, lambda: call(*stubs))
    assert snapshot(redis_db[1]) == before


async def test_state_from_another_kind_is_refused(stubs, session_id, server, redis_db):
    """A session state (or a corrupted user level) cannot be imported as a user level."""
    _, memory, _ = stubs
    session = await server.store.get_session(session_id, with_state=True)
    exported = await memory.ExportMemory(pb.ExportMemoryRequest(user="alice"))
    before = snapshot(redis_db[1])
    for data in (session.state, exported.state[:100], b"\xff" * 8 + exported.state[8:]):
        await expect(INVALID, lambda: memory.ImportMemory(pb.ImportMemoryRequest(user="alice", state=data)))
    assert snapshot(redis_db[1]) == before
