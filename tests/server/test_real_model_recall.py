"""With the real default model: a fact taught in one session is recalled in a new session of
the same user after consolidation, and another user's answers do not change."""

from dataclasses import replace

import pytest

from nsam.client import AsyncClient, Sampling

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_scope="session")]

GREEDY = Sampling(max_tokens=32, temperature=0.0)
QUESTION = "What is my dog's name?"
VALUE = "Quillon"  # not a word of the question writer's worked examples


async def test_fact_is_recalled_in_a_new_session_after_consolidation(start_server, settings, real_model):
    # consolidation "external": ConsolidateNow runs on the learner's copy (no third copy)
    server = await start_server(replace(settings, model="default"), model=real_model,
                                max_batch=2, consolidation="external")
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        # before: neither user's model knows the value
        bob_before = await c.send((await c.create_session("bob")).session_id, QUESTION, GREEDY)
        alice_before = await c.send((await c.create_session("alice")).session_id, QUESTION, GREEDY)
        assert VALUE.lower() not in alice_before.text.lower()

        # teach alice through an ordinary chat turn, end the session, consolidate it
        teach = await c.create_session("alice")
        await c.send(teach.session_id, f"My dog's name is {VALUE}.", GREEDY)
        await c.end_session(teach.session_id, consolidate=False)
        [result] = await c.consolidate_now("alice", teach.session_id)
        assert result.outcome == "accepted", result
        assert result.user_memory_version == 1

        # a new session of alice starts from the consolidated user level and recalls the fact
        ask = await c.create_session("alice")
        assert ask.user_memory_version == 1
        answer = await c.send(ask.session_id, QUESTION, GREEDY)
        assert VALUE.lower() in answer.text.lower(), answer.text

        # bob's answer is byte-for-byte what it was, and knows nothing of alice's dog
        bob_after = await c.send((await c.create_session("bob")).session_id, QUESTION, GREEDY)
        assert bob_after.text == bob_before.text
        assert VALUE.lower() not in bob_after.text.lower()
