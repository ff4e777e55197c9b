"""The learner queue: a turn returns before its medium update, the updates of a session land in
order and all of them, past the queue's limit a session's turns are coalesced, and the learner's
commits and the turns' merge instead of overwriting each other. Real Redis, tiny model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from nsam.client import AsyncClient, Sampling
from nsam.model.state import MemoryState
from nsam.server import metrics
from nsam.server.learner import turn_messages

pytestmark = pytest.mark.asyncio(loop_scope="session")

SAID = ["My cat is Tom.", "My dog is Rex.", "My fish is Bob.", "My bird is Kiwi.", "My boat is Zephyr."]
VALUES = ["Tom", "Rex", "Bob", "Kiwi", "Zephyr"]
QUICK = Sampling(max_tokens=3)


class Gate:
    """Wraps the learner model's `update_medium`: records each call and, while closed, holds each
    one on the learner thread until `let_one` (or `open`)."""

    def __init__(self, server, closed: bool = True):
        self.model = server.engine.learner_queue.thread.model
        self.inner = self.model.update_medium
        self.calls: list[int] = []  # the `turns` of each call
        self.outputs: list[bytes] = []
        self.entered = threading.Semaphore(0)
        self.passes = threading.Semaphore(0)
        self.closed = closed
        self.model.update_medium = self

    def __call__(self, state, messages, turns=1):
        self.calls.append(turns)
        self.entered.release()
        if self.closed:
            self.passes.acquire()
        out = self.inner(state, messages, turns)
        self.outputs.append(out[0])
        return out

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.acquire, True, 10), "no update started"

    def let_one(self) -> None:
        self.passes.release()

    def open(self) -> None:
        self.closed = False
        for _ in range(100):
            self.passes.release()


@pytest.fixture
def gates():
    made: list[Gate] = []

    def make(server, closed: bool = True) -> Gate:
        made.append(Gate(server, closed))
        return made[-1]
    yield make
    for gate in made:  # never leave the learner thread held (its stop would wait for it)
        gate.open()


def _state(server, data: bytes) -> MemoryState:
    m = server.engine.model
    return MemoryState.from_bytes(data, m.fingerprint, m.levels, "session")


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.__dict__.values(), b.__dict__.values()))


async def _stored(server, session_id: str):
    record = await server.store.get_session(session_id, with_state=True)
    return record, _state(server, record.state)


async def test_a_turn_returns_while_its_update_is_pending(server, gates):
    gate = gates(server)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        first = await c.send(s.session_id, SAID[0], QUICK)
        await gate.wait_entered()  # its update runs, held
        assert first.learned and (first.session_version, first.learnt_turns) == (1, 0)
        started = time.perf_counter()
        second = await c.send(s.session_id, SAID[1], QUICK)  # does not wait for the first's update
        assert time.perf_counter() - started < 5
        # it decoded with the committed state: the medium level before the first update
        assert (second.session_version, second.learnt_turns) == (2, 0)
        record, state = await _stored(server, s.session_id)
        assert record.learnt_turns == 0 and not state.levels["medium"].b.any() and state.notes == ()
        gate.open()
        await server.engine.learner_queue.drain(s.session_id)
        third = await c.send(s.session_id, SAID[2], QUICK)
        assert (third.session_version, third.learnt_turns) == (3, 2)
        assert (await c.get_session(s.session_id)).learnt_turns in (2, 3)


async def test_every_quick_turn_is_learnt_once_the_learner_drains(server, gates):
    gate = gates(server, closed=False)
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        results = [await c.send(s.session_id, text, QUICK) for text in SAID]  # no waiting between
        assert [r.session_version for r in results] == [1, 2, 3, 4, 5]
        await server.engine.learner_queue.drain(s.session_id)
        record, state = await _stored(server, s.session_id)
    assert (record.version, record.turns, record.learnt_turns) == (5, 5, 5)
    assert gate.calls == [1] * 5  # one update a turn, none coalesced below the limit
    assert [n.value for n in state.notes] == VALUES  # every update's notes, in turn order
    # the medium level committed is the last update's, not an earlier one merged back over it
    assert _same(state.levels["medium"], _state(server, gate.outputs[-1]).levels["medium"])


async def test_past_the_queue_limit_turns_are_coalesced_and_none_is_lost(start_server, settings, gates):
    server = await start_server(settings, learner_queue=1)
    gate = gates(server)
    coalesced = metrics.registry.get_sample_value("nsam_learner_coalesced_turns_total") or 0.0
    pending = metrics.registry.get_sample_value("nsam_learner_pending_turns") or 0.0
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        await c.send(s.session_id, SAID[0], QUICK)
        await gate.wait_entered()  # the first update runs (held); the queue is empty again
        for text in SAID[1:]:
            await c.send(s.session_id, text, QUICK)  # the second queues; the rest join it
        assert metrics.registry.get_sample_value("nsam_learner_queue_depth") == 1
        gate.open()
        await server.engine.learner_queue.drain(s.session_id)
        record, state = await _stored(server, s.session_id)
    assert metrics.registry.get_sample_value("nsam_learner_coalesced_turns_total") - coalesced == 3
    assert gate.calls == [1, 4]  # turn 1 alone, turns 2-5 in one update
    assert record.learnt_turns == 5 and [n.value for n in state.notes] == VALUES
    assert metrics.registry.get_sample_value("nsam_learner_pending_turns") == pending


async def test_turn_and_learner_commits_merge_instead_of_overwriting(server, gates):
    """Both ways round: a turn that read the state before a learner commit keeps that commit's
    medium level; a learner update that read the state before a turn keeps that turn's fast level."""
    gate = gates(server)
    engine = server.engine
    ends: list[bytes] = []
    commit_turn = engine._commit_turn

    async def recording(session, end, transcript, learnt):
        ends.append(end.state)
        if len(ends) == 2:  # turn 2 read the state before update 1 commits; let it commit first
            gate.let_one()
            for _ in range(200):
                if (await server.store.get_session(session.session_id, with_transcript=False)).learnt_turns == 1:
                    break
                await asyncio.sleep(0.05)
        return await commit_turn(session, end, transcript, learnt)
    engine._commit_turn = recording

    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        await c.send(s.session_id, SAID[0], QUICK)
        await gate.wait_entered()  # update 1 held
        second = await c.send(s.session_id, SAID[1], QUICK)
        assert (second.session_version, second.learnt_turns) == (2, 0)
        # turn 2 committed after update 1 (its compare-and-set saw the learner's commit): merged
        record, state = await _stored(server, s.session_id)
        assert (record.version, record.learnt_turns) == (2, 1)
        assert _same(state.levels["fast"], _state(server, ends[1]).levels["fast"])  # turn 2's
        assert _same(state.levels["medium"], _state(server, gate.outputs[0]).levels["medium"])  # update 1's
        assert [n.value for n in state.notes] == VALUES[:1]

        await gate.wait_entered()  # update 2 read version 2 and is held; turn 3 commits meanwhile
        third = await c.send(s.session_id, SAID[2], QUICK)
        assert third.session_version == 3
        gate.open()
        await server.engine.learner_queue.drain(s.session_id)
        record, state = await _stored(server, s.session_id)
    assert (record.version, record.learnt_turns) == (3, 3)
    assert _same(state.levels["fast"], _state(server, ends[2]).levels["fast"])  # turn 3's, kept
    assert _same(state.levels["medium"], _state(server, gate.outputs[-1]).levels["medium"])
    assert [n.value for n in state.notes] == VALUES[:3]
    assert gate.calls == [1, 1, 1]


@pytest.mark.parametrize("waits", [True, False], ids=["waits-for-the-learner", "learns-them-itself"])
async def test_consolidation_sees_the_pending_turns(server, gates, waits):
    """Consolidating a session with updates pending: the in-process consolidation waits for
    them; one that cannot (a worker process of its own) learns them into the state it consolidates.
    Either way the user level is taught every turn."""
    gate = gates(server)
    if not waits:
        server.engine.consolidator.drain = None
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        s = await c.create_session("alice")
        await c.send(s.session_id, SAID[0], QUICK)
        gate.let_one()
        await server.engine.learner_queue.drain(s.session_id)  # the session has notes: turn 1's
        await c.send(s.session_id, SAID[1], QUICK)
        await gate.wait_entered()
        await gate.wait_entered()  # update 2 is held
        ended, _ = await c.end_session(s.session_id, consolidate=False)
        assert ended.learnt_turns == 1
        if waits:
            gate.open()
        outcome = (await c.consolidate_now("alice", s.session_id))[0]
        assert (await c.get_session(s.session_id)).learnt_turns == (2 if waits else 1)
        gate.open()
    assert outcome.outcome == "accepted", outcome
    assert {"Tom", "Rex"} <= {f.value for f in (await server.engine.memory("alice")).notes}


async def test_turn_messages_cut_after_the_nth_reply():
    transcript = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                  {"role": "assistant", "content": "d"}]
    assert turn_messages(transcript, 1) == transcript[:3]
    assert turn_messages(transcript, 2) == transcript
    with pytest.raises(ValueError):
        turn_messages(transcript, 3)
