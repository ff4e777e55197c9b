"""The Python clients against a real server: dataclasses out, NsamError for failures."""

import asyncio
import io

import grpc
import pytest

from nsam.client import (Client, MemoryInfo, NsamError, Sampling, Session, Token,
                         TurnResult)
from nsam.client.chat import ChatLoop

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_async_client_returns_dataclasses(client):
    s = await client.create_session("alice", "Be brief.")
    assert isinstance(s, Session) and s.user == "alice"
    items = [i async for i in client.chat(s.session_id, "hi", Sampling(max_tokens=5))]
    assert [type(i) for i in items] == [Token] * 5 + [TurnResult]
    info = await client.memory("alice")
    assert isinstance(info, MemoryInfo) and info.levels[1].owner == s.session_id
    with pytest.raises(NsamError) as err:
        await client.get_session("alice:" + "f" * 24)
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "not found" in err.value.message


async def test_breaking_off_a_stream_cancels_the_turn(client):
    s = await client.create_session("alice")
    async for item in client.chat(s.session_id, "long", Sampling(max_tokens=300)):
        break
    r = await client.send(s.session_id, "next", Sampling(max_tokens=2))  # lease was released
    assert r.session_version == 1


async def test_sync_client(server):
    def run():
        with Client(f"127.0.0.1:{server.port}") as c:
            s = c.create_session("alice")
            tokens = [i for i in c.chat(s.session_id, "hi", Sampling(max_tokens=4))
                      if isinstance(i, Token)]
            result = c.send(s.session_id, "My dog's name is Rex.", Sampling(max_tokens=3))
            c.end_session(s.session_id, consolidate=False)
            outcomes = c.consolidate_now("alice", s.session_id)
            exported = c.export_memory("alice")
            c.import_memory(exported.state, "alice")
            rolled = c.rollback(1, "alice")
            health = c.memory_health()
            forgot = c.forget("alice")
            try:
                c.get_session(s.session_id)
            except NsamError as err:
                missing = err.code
            return tokens, result, outcomes, rolled, health, forgot, missing

    tokens, result, outcomes, rolled, health, forgot, missing = await asyncio.to_thread(run)
    assert len(tokens) == 4 and result.session_version == 2
    assert outcomes[0].outcome == "accepted" and rolled.version == 3
    assert health.jobs_by_outcome["accepted"] >= 1 and forgot > 0
    assert missing == grpc.StatusCode.NOT_FOUND


async def test_terminal_chat_loop(server, tmp_path):
    export = tmp_path / "alice.safetensors"
    notes = tmp_path / "notes.txt"
    notes.write_text("The ferry to Oskar Island leaves at seven. " * 20, encoding="utf-8")
    script = io.StringIO("\n".join([
        "my dog's name is Rex", "/help", "/session", "/consolidate", "/memory", f"/export {export}",
        f"/read {notes}", f"/read {tmp_path / 'missing.txt'}", "/read", "/rollback x", "/rollback 1", "/nonsense", "/forget", "no", "/forget --yes", "/quit", ""]))
    out = io.StringIO()

    def run():
        with Client(f"127.0.0.1:{server.port}") as c:
            loop = ChatLoop(c, "alice", None, Sampling(max_tokens=6), out=out)
            loop.run(script, prompt=False)
            return loop.session

    session = await asyncio.to_thread(run)
    text = out.getvalue()
    assert "new session alice:" in text
    assert "[length, 6 tokens, session v1, learned]" in text
    assert "accepted" in text and "user level version 1" in text
    assert "taught: Your dog's name is Rex." in text
    assert export.read_bytes()[:8] and "wrote user level v1" in text
    assert "usage: /rollback N" in text
    assert "[read 860 tokens in 4 chunks, perplexity" in text and "session v2]" in text
    assert "cannot read" in text and "missing.txt" in text and "usage: /read FILE" in text
    assert "[INVALID_ARGUMENT]" in text  # rollback to the current version is refused
    assert "unknown command /nonsense" in text
    assert "forgot alice" in text and "session ended" in text
    assert session.session_id not in text.split("forgot alice")[1]  # a fresh session after forget


async def test_resume_a_session(server):
    def run():
        with Client(f"127.0.0.1:{server.port}") as c:
            s = c.create_session("alice")
            c.send(s.session_id, "first", Sampling(max_tokens=2))
            out = io.StringIO()
            ChatLoop(c, "alice", s.session_id, Sampling(max_tokens=2), out=out).run(
                io.StringIO("second\n/quit\n"), prompt=False)
            return out.getvalue(), c.get_session(s.session_id)

    text, session = await asyncio.to_thread(run)
    assert "resumed session" in text and "(1 turns, version 1)" in text
    assert session.turns == 2 and session.ended
