import math
from dataclasses import replace

import pytest
import torch

from nsam.model.backbone import PackedLayout
from nsam.model.levels import (BatchLevels, FastLevelRunner, FastMemory, LoraState,
                               default_levels)
from nsam.model.runtime import NsamModel, SamplingParams, StateError
from nsam.model.state import MemoryState
from nsam.model.updates import TrainingExample, guard, update_on_examples


@pytest.fixture(scope="module")
def tiny():
    return NsamModel.load("tiny")


def _logits(model, ids, levels):
    """All-position logits of one prefill with the given level states."""
    m = model.model
    m.setup_caches(1, 256)
    layout = PackedLayout((0,), (0,), (len(ids),))
    from nsam.model.generation import Generator
    g = Generator(m, model.tokenizer, model.levels, model.fast_params, 1, 256)
    r_levels = levels
    g.add("x", ids, r_levels, SamplingParams(max_tokens=1))
    r = g.waiting[0]
    r.slot = 0
    return m.prefill(torch.tensor(ids), layout, g._hooks([r], layout), all_logits=True)


def test_zero_initialised_levels_give_the_backbone_exactly(tiny):
    ids = list(range(40, 90))
    state = MemoryState.from_bytes(tiny.new_session_state(None), tiny.fingerprint, tiny.levels, "session")
    with torch.inference_mode():
        plain = tiny.model(torch.tensor([ids]))[0]
        with_levels = _logits(tiny, ids, state.levels)
    assert torch.equal(plain, with_levels)


def _open_fast(model) -> FastMemory:
    fast = FastMemory(model.levels.get("fast"), model.model.config.dim)
    with torch.no_grad():
        fast.gate.fill_(0.5)  # an open gate, so the memory visibly changes the output
        fast.b_eta.fill_(2.0)
    return fast


def test_zero_learning_rate_recovers_the_backbone(tiny):
    fast = _open_fast(tiny)
    fast.lr_scale = 0.0  # nothing is ever written, the memory stays zero: the read is zero
    ids = torch.arange(100, 180)
    runner = FastLevelRunner(fast, tiny.levels and __import__("nsam.model.levels", fromlist=["x"]).AssociativeState.zeros(fast.spec))
    hooks = BatchLevels({}, None, None, {l: i for i, l in enumerate(fast.spec.layers)}, [runner])
    with torch.inference_mode():
        assert torch.equal(tiny.model(ids[None], hooks), tiny.model(ids[None]))


@pytest.mark.parametrize("split", [1, 17, 32, 45, 79])
def test_chunked_processing_with_carried_state_equals_one_pass(tiny, split):
    from nsam.model.levels import AssociativeState

    fast = _open_fast(tiny)
    layers = {l: i for i, l in enumerate(fast.spec.layers)}
    ids = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(1))
    m = tiny.model
    with torch.inference_mode():
        m.setup_caches(1, 128)
        one = FastLevelRunner(fast, AssociativeState.zeros(fast.spec))
        full = m.prefill(ids, PackedLayout((0,), (0,), (80,)),
                         BatchLevels({}, None, None, layers, [one], PackedLayout((0,), (0,), (80,))), all_logits=True)
        m.setup_caches(1, 128)
        first = FastLevelRunner(fast, AssociativeState.zeros(fast.spec))
        lay1 = PackedLayout((0,), (0,), (split,))
        a = m.prefill(ids[:split], lay1, BatchLevels({}, None, None, layers, [first], lay1), all_logits=True)
        carried = FastLevelRunner(fast, first.state())  # state out, state in
        outs = [a]
        pos = split
        while pos < 80:  # the rest token by token through decode
            outs.append(m.decode(ids[pos:pos + 1], torch.tensor([0]), torch.tensor([pos]), pos + 1,
                                 BatchLevels({}, None, None, layers, [carried]), contiguous=True))
            pos += 1
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-5, rtol=0)
    end_one, end_chunked = one.state(), carried.state()
    torch.testing.assert_close(end_chunked.memory, end_one.memory, atol=1e-5, rtol=0)
    assert int(end_chunked.pending) == int(end_one.pending) == 80 % fast.spec.period_tokens
    assert float(end_one.memory.norm()) > 0  # the memory was written


def test_state_bytes_round_trip_bit_exact(tiny):
    s, _ = tiny.update_medium(tiny.new_session_state(None),
                              [{"role": "user", "content": "my cat is Tom"}, {"role": "assistant", "content": "ok"}])
    again = MemoryState.from_bytes(s, tiny.fingerprint, tiny.levels, "session").to_bytes(tiny.fingerprint, tiny.levels)
    assert again == s
    u = tiny.new_user_state()
    assert MemoryState.from_bytes(u, tiny.fingerprint, tiny.levels, "user").to_bytes(tiny.fingerprint, tiny.levels) == u


def test_foreign_or_corrupt_state_is_refused(tiny):
    levels = default_levels(2)
    other = NsamModel(tiny.model, tiny.tokenizer, replace(levels, levels=tuple(replace(s, rank=4) for s in levels.levels)), "x")
    with pytest.raises(StateError, match="another model or level configuration"):
        tiny.check_state(other.new_session_state(None), "session")
    with pytest.raises(StateError, match="expected a session state"):
        tiny.check_state(tiny.new_user_state(), "session")
    with pytest.raises(StateError, match="not a valid nsam state"):
        tiny.check_state(b"\x00" * 40, "user")


def test_a_stored_state_outlives_tuning_of_how_its_levels_learn(tiny):
    levels = default_levels(2)

    def model_with(**changes):
        return NsamModel(tiny.model, tiny.tokenizer, replace(levels, levels=tuple(
            replace(s, **changes) if s.rule == "lora" else s for s in levels.levels)), "x")

    base = model_with()
    tuned = model_with(lr=1e-2, steps=3, max_update_norm=1.0)
    assert tuned.fingerprint == base.fingerprint
    tuned.check_state(base.new_user_state(), "user")
    for shape in ({"rank": 4}, {"layers": (0,)}, {"scale": 0.5}):  # what a stored state means
        assert model_with(**shape).fingerprint != base.fingerprint, shape


def test_a_session_written_before_the_fast_level_counted_its_tokens_is_still_read(tiny):
    import json

    from safetensors.torch import load, save

    from nsam.model.state import _digest, _metadata

    data = tiny.new_session_state(None)
    tensors = load(data)
    del tensors["fast/taken"]
    meta = {**_metadata(data), "sha256": _digest(tensors)}
    older = save(tensors, metadata={"nsam": json.dumps(meta, sort_keys=True)})
    state = MemoryState.from_bytes(older, tiny.fingerprint, tiny.levels, "session")
    assert int(state.levels["fast"].taken) == 0


def test_a_user_state_keeps_its_notes_under_the_digest(tiny):
    from nsam.model.learning.notes import Note

    notes = (Note("My dog's name is Rex", ("What is my dog's name?",), "Your dog's name is Rex.", "Rex"),
             Note("I live in Brisk", ("I live in what?",), "You live in Brisk.", "Brisk"))
    plain = MemoryState.from_bytes(tiny.new_user_state(), tiny.fingerprint, tiny.levels, "user")
    data = replace(plain, notes=notes).to_bytes(tiny.fingerprint, tiny.levels)
    back = MemoryState.from_bytes(data, tiny.fingerprint, tiny.levels, "user")
    assert back.notes == notes and back.to_bytes(tiny.fingerprint, tiny.levels) == data
    assert plain.notes == () and tiny.new_user_state() == plain.to_bytes(tiny.fingerprint, tiny.levels)
    tampered = data.replace(b"Brisk", b"Brest")  # same length: only the digest can tell
    with pytest.raises(StateError, match="corrupt"):
        tiny.check_state(tampered, "user")


def test_a_state_with_a_flipped_bit_in_its_tensors_is_refused(tiny):
    good, _ = tiny.update_medium(tiny.new_session_state(None),
                                 [{"role": "user", "content": "my cat is Tom"}, {"role": "assistant", "content": "ok"}])
    tiny.check_state(good, "session")
    damaged = bytearray(good)
    damaged[-3] ^= 0x10  # inside the last tensor's data, past the header
    with pytest.raises(StateError, match="corrupt"):
        tiny.check_state(bytes(damaged), "session")


def _run(model, jobs, max_tokens=12):
    g = model.generator(4)
    for rid, ids, state in jobs:
        g.add(rid, ids, state, SamplingParams(max_tokens=max_tokens))
    out = {rid: [] for rid, _, _ in jobs}
    while g.has_work():
        for e in g.step():
            if e.token_id >= 0:
                out[e.request_id].append(e.token_id)
    return out


def test_one_sessions_learning_never_changes_another_sessions_output(tiny):
    ids = tiny.encode_chat([{"role": "user", "content": "hello there"}], 200)
    fresh = tiny.new_session_state(None)
    taught = fresh
    for _ in range(3):
        taught, reports = tiny.update_medium(taught, [{"role": "user", "content": "hello there, my code is 7788"},
                                                      {"role": "assistant", "content": "noted"}])
        assert reports[0].accepted
    alone = _run(tiny, [("b", ids, fresh)])["b"]
    together = _run(tiny, [("a", ids, taught), ("b", ids, fresh)])
    assert together["b"] == alone
    with torch.inference_mode():
        a_state = MemoryState.from_bytes(taught, tiny.fingerprint, tiny.levels, "session").levels
        f_state = MemoryState.from_bytes(fresh, tiny.fingerprint, tiny.levels, "session").levels
        assert not torch.equal(_logits(tiny, ids, a_state), _logits(tiny, ids, f_state))


def test_poisoned_update_is_rejected_and_the_old_state_kept(tiny):
    spec = tiny.levels.get("medium")
    old = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    poisoned = replace(old, b=torch.full_like(old.b, float("nan")))
    kept, report = guard(spec, old, poisoned, None, 1.0, 0.0)
    assert kept is old and not report.accepted and report.reason == "non-finite"
    ex = [TrainingExample([1, 2, 3, 4], [1.0, 1.0, 1.0])]
    kept, report = update_on_examples(tiny.model, replace(spec, lr=float("nan")), old, [], ex)
    assert kept is old and report.reason == "non-finite"
    kept, report = update_on_examples(tiny.model, replace(spec, lr=10.0, max_update_norm=1e-6), old, [], ex)
    assert kept is old and report.reason == "norm-bound"


def test_fast_level_in_a_batch_matches_each_session_alone():
    """With the fast level's gate open, batched decode reads and writes each session's own memory."""
    m = NsamModel.load("tiny")
    with torch.no_grad():
        m.fast_params.gate.fill_(0.5)
        m.fast_params.b_eta.fill_(2.0)
    a_ids = m.encode_chat([{"role": "user", "content": "first session, a longer message " * 3}], 400)
    b_ids = m.encode_chat([{"role": "user", "content": "second one"}], 400)
    fresh = m.new_session_state(None)

    def run(jobs):
        g = m.generator(4)
        for rid, ids in jobs:
            g.add(rid, ids, fresh, SamplingParams(max_tokens=40))
        out = {rid: [] for rid, _ in jobs}
        while g.has_work():
            for e in g.step():
                out[e.request_id].append(e.token_id)
        return out, {rid: g.pop_state(rid)[0] for rid, _ in jobs}

    (alone, alone_state), (together, together_state) = run([("b", b_ids)]), run([("a", a_ids), ("b", b_ids)])
    assert together["b"] == alone["b"]
    fast_alone, fast_together = (MemoryState.from_bytes(s["b"], m.fingerprint, m.levels, "session").levels["fast"]
                                 for s in (alone_state, together_state))
    # Equal up to float rounding: a batched matmul may sum in another order than a single row.
    torch.testing.assert_close(fast_together.memory, fast_alone.memory, atol=1e-6, rtol=1e-5)
    assert float(fast_alone.memory.norm()) > 0  # it did write


def test_sequences_written_together_equal_each_written_alone(tiny):
    """The outer loop's batched pass (`step_together`) reads and writes as per-sequence steps do."""
    from nsam.model.levels import AssociativeState

    fast = _open_fast(tiny)
    x = torch.randn(3, 45, tiny.model.config.dim, generator=torch.Generator().manual_seed(2))
    together = [FastLevelRunner(fast, AssociativeState.zeros(fast.spec)) for _ in range(3)]
    alone = [FastLevelRunner(fast, AssociativeState.zeros(fast.spec)) for _ in range(3)]
    with torch.no_grad():
        for piece in (x[:, :20], x[:, 20:]):  # across a chunk boundary, with an open chunk carried
            got = FastLevelRunner.step_together(together, 0, piece)
            want = torch.stack([run.step(0, piece[b]) for b, run in enumerate(alone)])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.state().memory, b.state().memory, atol=1e-6, rtol=0)
        assert a.surprise == pytest.approx(b.surprise, abs=1e-5) and len(a.surprise) == 1


def test_history_already_written_is_read_not_written_again(tiny):
    """A chat prompt re-sends the session's earlier turns; the fast level writes only what is new."""
    from nsam.model.levels import AssociativeState

    fast = _open_fast(tiny)
    x = torch.randn(70, tiny.model.config.dim, generator=torch.Generator().manual_seed(3))
    skipping = FastLevelRunner(fast, AssociativeState.zeros(fast.spec), read_only=30)
    fresh_only = FastLevelRunner(fast, AssociativeState.zeros(fast.spec))
    with torch.no_grad():
        reads = skipping.step(0, x)
        fresh_only.step(0, x[30:])
    torch.testing.assert_close(skipping.state().memory, fresh_only.state().memory, atol=1e-6, rtol=0)
    assert int(skipping.state().pending) == 40 % fast.spec.period_tokens
    assert torch.equal(reads[:30], torch.zeros_like(reads[:30]))  # the memory was empty while reading


def test_the_read_grows_with_the_share_of_what_has_left_the_window(tiny):
    """While the text the memory holds is in view, the read stays at its chat strength; the
    share of it that has left the attention window boosts the read, up to `evicted_read_boost`."""
    from nsam.model.levels import AssociativeState

    fast = _open_fast(tiny)
    fast.evicted_read_boost = 3.0
    x = torch.randn(64, tiny.model.config.dim, generator=torch.Generator().manual_seed(4))
    writer = FastLevelRunner(fast, AssociativeState.zeros(fast.spec))
    with torch.no_grad():
        writer.step(0, x[:48])
    held = writer.state()
    assert int(held.taken) == 48 and writer.read_boost == 1.0  # an empty level has nothing to boost
    reads = {}
    for in_view in (None, 48, 24, 0):
        runner = FastLevelRunner(fast, held, in_context=in_view)
        with torch.no_grad():
            reads[in_view] = runner.step(0, x[48:])
        assert int(runner.state().taken) == 64
    assert torch.equal(reads[None], reads[48])  # all in view: the chat strength
    torch.testing.assert_close(reads[24], 2 * reads[48])  # half has left: halfway to the boost
    torch.testing.assert_close(reads[0], 3 * reads[48])  # all of it has left: the full boost
    assert reads[48].abs().sum() > 0
    # A history longer than what was taken in (template tokens never fed) leaves nothing evicted.
    longer = FastLevelRunner(fast, held, in_context=50)
    assert longer.read_boost == 1.0 and longer.taken_before == 50


def test_a_document_reads_text_in_view_harder_than_chat(tiny):
    """`document_read_boost`: a document's chunk reads what is still in view harder than a chat
    turn does; once everything held has left the window both read at the evicted boost."""
    from nsam.model.levels import AssociativeState

    fast = _open_fast(tiny)
    fast.document_read_boost, fast.evicted_read_boost = 2.0, 3.0
    x = torch.randn(49, tiny.model.config.dim, generator=torch.Generator().manual_seed(5))
    writer = FastLevelRunner(fast, AssociativeState.zeros(fast.spec))
    with torch.no_grad():
        writer.step(0, x[:32])  # one full chunk: the memory holds it
        held = writer.state()
        # The read at the saved strength, no boost (the next chunk's first token reads `held`).
        one = fast.read(0, fast.project(0, x[32:33])[:, :fast.spec.rank] @ held.memory[0].T)
    assert one.abs().sum() > 0
    reads = {}
    for in_view in (32, 16, 0):
        for document in (True, False):
            runner = FastLevelRunner(fast, held, in_context=in_view, document=document)
            with torch.no_grad():
                reads[in_view, document] = runner.step(0, x[32:33])
    torch.testing.assert_close(reads[32, True], 2 * one)  # all in view: a document reads twice as hard
    torch.testing.assert_close(reads[32, False], one)  # ... as chat does
    torch.testing.assert_close(reads[16, True], 2.5 * one)  # half has left: halfway to the evicted boost
    torch.testing.assert_close(reads[16, False], 2 * one)
    torch.testing.assert_close(reads[0, True], 3 * one)  # all of it has left: both at the full boost
    torch.testing.assert_close(reads[0, False], 3 * one)


def test_a_chat_that_drops_old_turns_reads_the_memory_harder(tiny):
    """Through the generator: a turn whose prompt still holds the whole history reads at the chat
    strength; once old turns are dropped from the prompt, the same memory is read harder."""
    from nsam.model.generation import Generator

    fast = _open_fast(tiny)
    gen = Generator(tiny.model, tiny.tokenizer, tiny.levels, fast, 1, 512)
    state = MemoryState.from_bytes(tiny.new_session_state(None), tiny.fingerprint, tiny.levels, "session")
    first = [{"role": "user", "content": "My locker code is 4417 and my dog is called Rex."}]
    ids, fresh = tiny.encode_turn(first, 400)
    gen.add("t1", ids, state.levels, SamplingParams(max_tokens=8, seed=0), fresh)
    while gen.has_work():
        gen.step()
    out, runner = gen.pop_finished("t1")
    levels = {**state.levels, "fast": runner.state()}
    chat = first + [{"role": "assistant", "content": tiny.tokenizer.decode(out)}, {"role": "user", "content": "Hi"}]
    boosts = {}
    for budget in (400, 30):  # the whole history fits / only the last message fits
        fast.evicted_read_boost = 3.0
        ids, fresh = tiny.encode_turn(chat, budget)
        gen.add(f"b{budget}", ids, levels, SamplingParams(max_tokens=1, seed=0), fresh)
        boosts[budget] = gen.waiting[-1].fast.read_boost
        gen.cancel(f"b{budget}")
        gen.step()
        gen.pop_finished(f"b{budget}")
    assert boosts[400] == 1.0
    assert boosts[30] == 3.0  # the new message is all that is in view: everything held has left


def test_a_turn_knows_which_prompt_tokens_are_new(tiny):
    history = [{"role": "user", "content": "My dog is Rex."}, {"role": "assistant", "content": "Nice."}]
    last = {"role": "user", "content": "And my cat is Tom."}
    ids, fresh = tiny.encode_turn(history + [last], 1000)
    assert ids == tiny.encode_chat(history + [last], 1000)
    old = tiny.tokenizer.encode_chat(history, add_generation_prompt=False)
    assert ids[:len(old)] == old and fresh == len(ids) - len(old) > 0
    ids, fresh = tiny.encode_turn([last], 1000)
    assert fresh == len(ids)  # a first turn is all new
