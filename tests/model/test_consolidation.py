"""The medium level's per-turn learning (`learn_turn`) and the questions it rehearses against."""

import torch

from nsam.model.consolidation import (Slot, ValueBatch, _selected, anchor_windows, binding_loss, chat_anchor,
                                      chat_example, fact_slots, learn_turn, near_miss_questions, slot_loss,
                                      untaught_slots, value_batch)
from nsam.model.facts import extract_facts
from nsam.model.levels import LoraState
from nsam.model.runtime import NsamModel
from nsam.model.updates import lora_logits_at

import pytest


@pytest.fixture(scope="module")
def tiny():
    return NsamModel.load("tiny")


def _answer_loss(m, spec, state, question, answer) -> float:
    ids, select, targets, weights = _selected([chat_example(m.tokenizer, [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}], ("assistant",))])
    zero_a, zero_b = state.a[:, :0], state.b[:, :, :0]
    with torch.no_grad():
        logits = lora_logits_at(m.model, spec, [state], zero_a, zero_b, ids, select)
    return float(torch.nn.functional.cross_entropy(logits, targets))


def test_a_message_stating_a_fact_is_rehearsed_as_question_and_answer(tiny):
    spec = tiny.levels.get("medium")
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    messages = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "By the way, my sister's name is Olvena."},
                {"role": "assistant", "content": "Nice name."}]
    new, report = learn_turn(tiny.model, tiny.tokenizer, spec, fresh, [], messages, tiny.anchor_ids)
    assert report.accepted and report.level == "medium"
    question, answer = "What is my sister's name?", "Your sister's name is Olvena."
    assert _answer_loss(tiny, spec, new, question, answer) < _answer_loss(tiny, spec, fresh, question, answer)
    assert int(new.step) == spec.rehearsal_steps  # the rehearsal rate, not the text rate


def test_a_fact_turn_trains_on_until_its_answers_are_said_and_no_further(tiny, monkeypatch):
    from dataclasses import replace

    import nsam.model.consolidation as consolidation

    spec = replace(tiny.levels.get("medium"), rehearsal_steps=4, rehearsal_extra_steps=4)
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    parent = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    messages = [{"role": "user", "content": "My dog's name is Rex."}, {"role": "assistant", "content": "Nice."},
                {"role": "user", "content": "My cat's name is Olvena."}, {"role": "assistant", "content": "Noted."}]
    checked = []

    def said_after(steps):  # the level says its answers once it has trained this many steps
        def said(model, spec, level, examples, parents=()):
            checked.append((int(level.step), len(examples), len(parents)))
            return 1.0 if int(level.step) >= steps else 0.5
        return said

    def run(said_at, spec=spec):
        checked.clear()
        monkeypatch.setattr(consolidation, "answers_said", said_after(said_at))
        new, report = learn_turn(tiny.model, tiny.tokenizer, spec, fresh, [parent], messages, tiny.anchor_ids)
        assert report.accepted
        return int(new.step)

    assert run(4) == 4 and checked == [(4, 8, 1)]  # both facts' 4 forms each, on top of the parent
    assert run(6) == 6 and [s for s, _, _ in checked] == [4, 6]
    assert run(100) == 8 and [s for s, _, _ in checked] == [4, 6]  # never said: stops at 4 + 4
    assert run(100, replace(spec, rehearsal_extra_steps=0)) == 4 and checked == []


def test_a_message_without_facts_is_learnt_as_text_at_the_gentle_rate(tiny):
    spec = tiny.levels.get("medium")
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    messages = [{"role": "user", "content": "Why is the sea salty?"}, {"role": "assistant", "content": "Rivers."}]
    new, report = learn_turn(tiny.model, tiny.tokenizer, spec, fresh, [], messages, tiny.anchor_ids)
    assert report.accepted and int(new.step) == spec.steps


def test_the_turns_after_a_fact_rehearse_the_session_facts_again_then_only_text(tiny):
    from dataclasses import replace

    spec = replace(tiny.levels.get("medium"), rehearsal_steps=4, replay_steps=2, replay_turns=2)
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    taught = [{"role": "user", "content": "My sister's name is Olvena."}, {"role": "assistant", "content": "Nice."}]
    chat = [[{"role": "user", "content": q}, {"role": "assistant", "content": "Sure."}]
            for q in ("Why is the sea salty?", "Name a fruit.", "What is rain?")]
    question, answer = "What is my sister's name?", "Your sister's name is Olvena."

    def turn(messages, state):
        new, report = learn_turn(tiny.model, tiny.tokenizer, spec, state, [], messages, tiny.anchor_ids)
        assert report.accepted
        return new, int(new.step) - int(state.step)

    after_fact, steps = turn(taught, fresh)
    assert steps == spec.rehearsal_steps
    replayed, steps = turn(taught + chat[0], after_fact)
    assert steps == spec.steps + spec.replay_steps  # the text, then the session's facts again
    assert _answer_loss(tiny, spec, replayed, question, answer) < _answer_loss(tiny, spec, after_fact, question, answer)
    assert turn(taught + chat[0] + chat[1], replayed)[1] == spec.steps + spec.replay_steps
    assert turn(taught + chat[0] + chat[1] + chat[2], replayed)[1] == spec.steps  # past replay_turns: text only
    off = replace(spec, replay_steps=0)
    new, report = learn_turn(tiny.model, tiny.tokenizer, off, after_fact, [], taught + chat[0], tiny.anchor_ids)
    assert report.accepted and int(new.step) - int(after_fact.step) == off.steps


def test_earlier_facts_are_asked_after_the_sessions_last_exchanges(tiny, monkeypatch):
    """`rehearsal_context_turns`: what a later question will see in the attention window."""
    from dataclasses import replace

    import nsam.model.consolidation as consolidation

    asked_after = []

    def recording(tokenizer, question, fact, context=(), **kw):
        asked_after.append(list(context))
        return qa_example(tokenizer, question, fact, context=context, **kw)

    qa_example = consolidation.qa_example
    monkeypatch.setattr(consolidation, "qa_example", recording)
    taught = [{"role": "user", "content": "My sister's name is Olvena."}, {"role": "assistant", "content": "Nice."}]
    chat = [[{"role": "user", "content": q}, {"role": "assistant", "content": "Sure."}]
            for q in ("Why is the sea salty?", "Name a fruit.")]
    messages = [{"role": "system", "content": "Be brief."}] + taught + chat[0] + chat[1]
    for turns, expected in ((1, chat[1]), (2, chat[0] + chat[1]), (9, taught + chat[0] + chat[1])):
        spec = replace(tiny.levels.get("medium"), rehearsal_steps=2, replay_steps=2, replay_turns=3,
                       rehearsal_context_turns=turns)
        fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
        asked_after.clear()
        learn_turn(tiny.model, tiny.tokenizer, spec, fresh, [], messages, tiny.anchor_ids)
        contexts = [c for c in asked_after if c]
        assert contexts and all(c == messages[:1] + expected for c in contexts)


def test_near_miss_questions_never_ask_for_what_was_taught():
    facts = extract_facts("My sister's name is Olvena. My cousin's name is Brek. I live in Brisk.")
    taught = {f.key for f in facts}
    questions = near_miss_questions(facts, taught, 4)
    assert len(questions) == 4
    assert "What is my sister's name?" not in questions and "What is my cousin's name?" not in questions
    assert "Where do I live?" not in questions


def test_untaught_slots_carry_the_answer_prefix_of_a_slot_never_filled():
    facts = extract_facts("My sister's name is Olvena. I live in Brisk.")
    slots = untaught_slots(facts, {f.key for f in facts}, 6)
    assert len(slots) == 6
    assert slots[0].prefix.startswith("Your ") and slots[0].prefix.endswith("'s name is")
    assert all(s.prefix != "You live in" and "sister" not in s.question for s in slots)


def test_a_named_thing_or_place_is_near_other_things_asked_by_name_and_no_slot_repeats():
    facts = extract_facts("My favourite café is called Zefo. I work at Puzol. My sister's name is Ola. "
                          "My brother's name is Tam. My cat's name is Fesh.")
    slots = untaught_slots(facts, {f.key for f in facts}, 12)
    questions = [s.question for s in slots]
    assert len(questions) == 12 and len(set(questions)) == 12
    things = [s for s in slots if s.question.startswith("What is the name of my ")]
    assert len(things) == 2  # one other thing each for the café and the employer
    assert all(s.prefix == f"Your {s.question.removeprefix('What is the name of my ').rstrip('?')} is called"
               for s in things)
    people = [s for s in slots[:5] if s.prefix.endswith("'s name is")]
    assert len(people) == 3  # the sister's, brother's and cat's names: other relations


def test_near_miss_slots_take_each_taught_owners_nearest_untaught_neighbours_in_turn():
    facts = extract_facts("My sister's name is Olvena. My brother's name is Tam. My piano teacher's name is Brek.")
    near = {"sister": ["brother", "cousin", "aunt"], "brother": ["sister", "nephew"], "teacher": ["tutor"]}
    slots = untaught_slots(facts, {f.key for f in facts}, 6, lambda word: near.get(word, []))
    assert [s.question for s in slots[:5]] == [
        "What is my cousin's name?", "What is my nephew's name?", "What is my piano tutor's name?",  # brother is taught
        "What is my aunt's name?", "What is my favorite color?"]
    assert slots[2].prefix == "Your piano tutor's name is"


def test_the_backbones_nearest_words_to_an_owner_are_other_owners_of_its_kind(real_model):
    from nsam.model.consolidation import embedding_neighbours

    near = embedding_neighbours(real_model.model, real_model.tokenizer)
    sister, dog = near("sister"), near("dog")
    assert {"brother", "cousin"} <= set(sister) and "cat" in dog
    assert not {"sister", "sisters", "sibling"} & set(sister) and "pet" not in dog  # its own forms and kinds
    assert near("Olvenaqz") == []  # not one token: no neighbours


def test_value_batch_cuts_each_question_at_the_position_that_predicts_its_value(real_model):
    tok = real_model.tokenizer
    facts = extract_facts("My sister's name is Geiplex. My locker code is 4821. My dog's name is Vestar.")
    values = [f.value for f in facts]
    batch = value_batch(tok, fact_slots(facts, 0), values, values)
    assert batch.ids.shape[0] == 3 and int(batch.select.sum()) == 3
    for row, fact in enumerate(facts):
        upto = batch.ids[row][:int(batch.select[row].nonzero()[0, 0]) + 1].tolist()
        seen = tok.decode(upto)
        own = tok.decode([int(batch.candidates[batch.target[row]])]).strip()
        assert seen.rstrip().endswith(fact.answer[:fact.answer.rindex(fact.value)].rstrip())
        assert fact.value.startswith(own)  # the number's first digit, not the space before it
    untaught = value_batch(tok, [Slot("What is my aunt's name?", "Your aunt's name is")], values, [None])
    assert untaught.target.tolist() == [-1]


def test_chat_anchor_in_context_asks_after_the_conversation_and_keeps_the_frozen_reply(tiny):
    context = [{"role": "user", "content": "My sister's name is Geiplex."},
               {"role": "assistant", "content": "Your sister's name is Geiplex."}]
    plain = chat_anchor(tiny.model, tiny.tokenizer, count=2, tokens=6)
    within = chat_anchor(tiny.model, tiny.tokenizer, count=2, tokens=6, context=context)
    assert len(plain) == len(within) == 2
    for p, w in zip(plain, within):
        reply = sum(1 for x in p.weights if x > 0)
        assert reply > 0 and sum(1 for x in w.weights if x > 0) == reply
        assert w.ids[-reply:] == p.ids[-reply:]  # the same frozen reply, now after the conversation
        assert "Geiplex" in tiny.tokenizer.decode(w.ids[:-reply]) and "Geiplex" not in tiny.tokenizer.decode(p.ids)


def test_binding_loss_prefers_each_questions_own_value_among_the_taught_ones():
    batch = ValueBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
                       torch.tensor([5, 7]), torch.tensor([0, 1]))
    right = torch.zeros(2, 10)
    right[0, 5] = right[1, 7] = 4.0
    wrong = torch.zeros(2, 10)
    wrong[0, 7] = wrong[1, 5] = 4.0
    assert binding_loss(right, batch) < 0.1 < float(torch.log(torch.tensor(2.0))) < binding_loss(wrong, batch)
    alone = ValueBatch(batch.ids, batch.select, torch.tensor([5]), torch.tensor([0, 0]))
    assert float(binding_loss(right, alone)) == 0.0  # one value: nothing to tell apart


def test_slot_loss_grows_when_a_taught_value_leaks_into_an_untaught_slot():
    batch = ValueBatch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool),
                       torch.tensor([5]), torch.tensor([-1]))
    parent = torch.zeros(1, 10)
    leaked = parent.clone()
    leaked[0, 5] = 6.0
    ref = torch.log_softmax(parent, -1)
    assert float(slot_loss(parent, ref, batch)) < 0.2 < float(slot_loss(leaked, ref, batch))


def test_anchor_windows_cover_the_text_a_window_per_step():
    ids = list(range(1000))
    windows = anchor_windows(ids, 256)
    assert [w.shape for w in windows] == [torch.Size([1, 256])] * 3
    assert windows[1][0, 0] == 256
    assert anchor_windows(ids, 0)[0].shape == (1, 1000)


def test_a_levels_consolidations_anchor_on_the_whole_text_in_turn():
    ids, steps = list(range(24 * 16)), 12
    seen = []
    for level_step in (0, steps, 2 * steps):  # the level's step count after 0, 1, 2 consolidations
        windows = anchor_windows(ids, 16, start=level_step)
        seen.append([int(windows[i % len(windows)][0, 0]) // 16 for i in range(steps)])
    assert seen[0] == list(range(12)) and seen[1] == list(range(12, 24)) and seen[2] == seen[0]


def test_an_update_past_the_drift_budget_is_cut_back_then_refused(tiny):
    from dataclasses import replace

    from nsam.model.consolidation import consolidate

    spec = tiny.levels.get("user")
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    transcript = [{"role": "user", "content": "My dog's name is Rex. My cat's name is Olvena."},
                  {"role": "assistant", "content": "Noted."}]
    over = replace(tiny.consolidation, probe_ppl_budget=-0.5, shrink=(0.5, 0.25))  # no update fits
    kept, report = consolidate(tiny.model, tiny.tokenizer, spec, fresh, transcript, tiny.anchor_ids,
                               tiny.probe_ids, over)
    assert kept is fresh and not report.accepted and report.reason == "forgetting"
    assert report.step_scale == 0.25  # it tried the shorter steps first
    roomy = replace(tiny.consolidation, probe_ppl_budget=10.0, max_forgetting=10.0)
    new, report = consolidate(tiny.model, tiny.tokenizer, spec, fresh, transcript, tiny.anchor_ids,
                              tiny.probe_ids, roomy)
    assert report.accepted and report.step_scale == 1.0 and not torch.equal(new.b, fresh.b)


def test_past_the_drift_budget_the_level_after_fewer_steps_is_kept_before_any_cut_back(tiny, monkeypatch):
    import weakref
    from dataclasses import replace

    import nsam.model.consolidation as consolidation

    # The probe as the trust region sees it: within the budget up to 12 training steps, past it after.
    def probe(model, spec, levels, ids):
        return 1.0 if levels and int(levels[0].step) > 12 else 0.0

    monkeypatch.setattr(consolidation, "probe_loss", probe)
    monkeypatch.setattr(consolidation, "_FROZEN_CACHE", weakref.WeakKeyDictionary())  # no cached baseline
    spec = tiny.levels.get("user")
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    transcript = [{"role": "user", "content": "My dog's name is Rex. My cat's name is Olvena."},
                  {"role": "assistant", "content": "Noted."}]
    config = replace(tiny.consolidation, steps=24, on_policy_at=(12,), fallback_every=6, shrink=(0.5,))
    new, report = consolidation.consolidate(tiny.model, tiny.tokenizer, spec, fresh, transcript, tiny.anchor_ids,
                                            tiny.probe_ids, config)
    assert report.accepted and report.steps_kept == 12 and report.step_scale == 1.0
    assert report.trust_region == "fewer steps"
    assert int(new.step) == 12 and not torch.equal(new.b, fresh.b)  # the trained level itself, not a blend
    # Without the fallbacks, the same update is cut back by interpolation and keeps the full step count.
    new, report = consolidation.consolidate(tiny.model, tiny.tokenizer, spec, fresh, transcript, tiny.anchor_ids,
                                            tiny.probe_ids, replace(config, fallback_every=0))
    assert not report.accepted and report.steps_kept == 24 and report.step_scale == 0.5
    assert report.trust_region == "interpolated"


def test_a_consolidation_trains_on_until_its_answers_are_said_and_no_further(tiny, monkeypatch):
    import weakref
    from dataclasses import replace

    import nsam.model.consolidation as consolidation

    spec = tiny.levels.get("user")
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    transcript = [{"role": "user", "content": "My dog's name is Rex. My cat's name is Olvena."},
                  {"role": "assistant", "content": "Noted."}]
    config = replace(tiny.consolidation, steps=6, on_policy_at=(3,), extra_steps=6, learn_every=3,
                     probe_ppl_budget=10.0, max_forgetting=10.0)
    checked = []

    def said_after(steps):  # the level says its answers once it has trained this many steps
        def said(model, spec, level, examples):
            checked.append(int(level.step))
            return 1.0 if int(level.step) >= steps else 0.5
        return said

    def run(said_at, config=config, level=fresh):
        checked.clear()
        monkeypatch.setattr(consolidation, "answers_said", said_after(said_at))
        return consolidation.consolidate(tiny.model, tiny.tokenizer, spec, level, transcript, tiny.anchor_ids,
                                         tiny.probe_ids, config)

    new, report = run(6)  # said after the planned steps: nothing more
    assert report.accepted and report.steps_trained == report.steps_kept == 6 and int(new.step) == 6
    assert report.answers_said == 1.0 and checked == [6, 6]  # asked once before training on, once to report
    new, report = run(9)  # one more round of 3
    assert report.steps_trained == report.steps_kept == 9 and int(new.step) == 9 and checked[:2] == [6, 9]
    new, report = run(100)  # never said: stops at steps + extra_steps
    assert report.steps_trained == report.steps_kept == 12 and int(new.step) == 12 and report.answers_said == 0.5
    new, report = run(100, replace(config, extra_steps=0))  # the extension off: as before it existed
    assert report.steps_trained == 6 and checked == [6]
    trained = new
    new, report = run(100, level=trained)  # a level with sessions in it: no extension
    assert report.steps_trained == 6 and int(new.step) == int(trained.step) + 6
    new, report = run(100, replace(config, extra_steps_from_empty_only=False), level=trained)
    assert report.steps_trained == 12

    # Past the drift budget, the level of the planned steps is tried first: today's update.
    monkeypatch.setattr(consolidation, "probe_loss",
                        lambda model, spec, levels, ids: 1.0 if levels and int(levels[0].step) > 6 else 0.0)
    monkeypatch.setattr(consolidation, "_FROZEN_CACHE", weakref.WeakKeyDictionary())  # no cached baseline
    new, report = run(100, replace(config, probe_ppl_budget=0.02, max_forgetting=0.05))
    assert report.accepted and report.steps_trained == 12 and report.steps_kept == 6 and report.step_scale == 1.0
    assert report.trust_region == "fewer steps" and int(new.step) == 6
    # Within the budget up to 9 steps: the latest level of the extension that fits, 9, before the planned 6.
    monkeypatch.setattr(consolidation, "probe_loss",
                        lambda model, spec, levels, ids: 1.0 if levels and int(levels[0].step) > 9 else 0.0)
    new, report = run(100, replace(config, probe_ppl_budget=0.02, max_forgetting=0.05))
    assert report.accepted and report.steps_trained == 12 and report.steps_kept == 9 and int(new.step) == 9
    new, report = run(100, replace(config, probe_ppl_budget=0.02, max_forgetting=0.05, extension_fallbacks=False))
    assert report.steps_kept == 6 and int(new.step) == 6


def test_on_policy_questions_are_asked_in_first_consolidations_and_after_each_round_when_refreshing(tiny, monkeypatch):
    from dataclasses import replace

    import nsam.model.consolidation as consolidation

    spec = tiny.levels.get("user")
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    transcript = [{"role": "user", "content": "My brother's name is Oskavel. My dog's name is Rex."},
                  {"role": "assistant", "content": "Noted."}]
    asked = []  # (steps the answering level has trained, questions)
    answer = consolidation._on_policy_negatives

    def recording(model, tokenizer, spec, levels, parent, questions, tokens):
        asked.append((int(levels[0].step), list(questions)))
        return answer(model, tokenizer, spec, levels, parent, questions, tokens)

    monkeypatch.setattr(consolidation, "_on_policy_negatives", recording)
    monkeypatch.setattr(consolidation, "answers_said", lambda model, spec, level, examples: 0.5)  # never said
    config = replace(tiny.consolidation, steps=4, on_policy_at=(2,), extra_steps=4, learn_every=2, on_policy_probes=6,
                     on_policy_owners="embedding", on_policy_owners_per_fact=3, probe_ppl_budget=10.0,
                     max_forgetting=10.0)
    consolidation.consolidate(tiny.model, tiny.tokenizer, spec, fresh, transcript, tiny.anchor_ids, tiny.probe_ids,
                              config)
    assert [steps for steps, _ in asked] == [2]  # by default once, at on_policy_at
    questions = asked[0][1]
    assert len(questions) == 6 and not any("brother's" in q or "dog's" in q for q in questions)
    asked.clear()
    consolidation.consolidate(tiny.model, tiny.tokenizer, spec, fresh, transcript, tiny.anchor_ids, tiny.probe_ids,
                              replace(config, on_policy_refresh=True))
    assert [steps for steps, _ in asked] == [2, 6]  # and after the extension's first round (not after its last)
    assert all(q == questions for _, q in asked)
    # A level with sessions in it already answers near misses with what it knows: no pull, unless asked for.
    trained, _ = consolidation.consolidate(tiny.model, tiny.tokenizer, spec, fresh, transcript, tiny.anchor_ids,
                                           tiny.probe_ids, replace(config, on_policy_at=()))
    asked.clear()
    consolidation.consolidate(tiny.model, tiny.tokenizer, spec, trained, transcript, tiny.anchor_ids, tiny.probe_ids,
                              replace(config, on_policy_refresh=True))
    assert asked == []
    consolidation.consolidate(tiny.model, tiny.tokenizer, spec, trained, transcript, tiny.anchor_ids, tiny.probe_ids,
                              replace(config, on_policy_from_empty_only=False))
    assert [steps for steps, _ in asked] == [int(trained.step) + 2]


def test_a_slot_pool_covers_more_near_misses_a_batch_per_step_at_the_same_cost(real_model):
    from dataclasses import replace

    from nsam.model.consolidation import value_terms

    tok = real_model.tokenizer
    facts = extract_facts("My sister's name is Geiplex. My dog's name is Vestar. I work at Puzol.")
    taught = {f.key for f in facts}
    near = {"sister": ["brother", "cousin", "aunt", "nephew"], "dog": ["cat", "horse", "puppy", "bird"]}

    def terms(pool):
        return value_terms(tok, facts, facts, taught, 3, 4, 1.0, 1.0, real_model.model,
                           lambda w: near.get(w, []), pool, 4)
    fixed, pooled = terms(0), terms(12)
    assert len(fixed.slots) == 1 and len(pooled.slots) == 3
    assert all(b.ids.shape[0] == 4 for b in pooled.slots) and len(pooled.slot_refs) == 3
    asked = [tok.decode(b.ids[i].tolist()) for b in pooled.slots for i in range(4)]
    assert len(set(asked)) == 12 and any("horse" in q for q in asked) and any("nephew" in q for q in asked)
    seen = []

    def logits_fn(ids, select):  # which batch of slots a step scores
        seen.append(next(i for i, b in enumerate(pooled.slots) if b.ids is ids))
        return torch.zeros(int(select.sum()), real_model.model.config.vocab_size)
    slots_only = replace(pooled, bindings=[], binding_weight=0.0)
    for step in range(4):
        slots_only.loss(logits_fn, step)
    assert seen == [0, 1, 2, 0]


def test_a_consolidation_asked_to_stop_raises_interrupted_before_its_next_model_call(tiny):
    from nsam.model.consolidation import consolidate
    from nsam.model.errors import Interrupted

    spec = tiny.levels.get("user")
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    transcript = [{"role": "user", "content": "My dog's name is Rex."}, {"role": "assistant", "content": "Noted."}]
    passes = []
    hook = tiny.model.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        for stop_at in (1, 3, 12):  # while precomputing (first call: nothing cached yet) and while training
            asked, passes[:] = [], []

            def stop() -> bool:
                asked.append(len(passes))
                return len(asked) >= stop_at

            with pytest.raises(Interrupted):
                consolidate(tiny.model, tiny.tokenizer, spec, fresh, transcript, tiny.anchor_ids, tiny.probe_ids,
                            tiny.consolidation, stop)
            assert len(asked) == stop_at
            assert len(passes) == asked[-1]  # no forward pass after the "yes"
            if stop_at == 1:
                assert passes == []  # not even the frozen model's answers or the probe baseline
    finally:
        hook.remove()
    assert not fresh.b.any()  # pure: its input is untouched


def test_a_later_consolidation_rehearses_the_facts_of_earlier_sessions(tiny):
    from dataclasses import replace

    from nsam.model.consolidation import consolidate

    spec = tiny.levels.get("user")
    roomy = replace(tiny.consolidation, probe_ppl_budget=10.0, max_forgetting=10.0)
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)

    def session(state, text, known):
        transcript = [{"role": "user", "content": text}, {"role": "assistant", "content": "Noted."}]
        return consolidate(tiny.model, tiny.tokenizer, spec, state, transcript, tiny.anchor_ids, tiny.probe_ids,
                           roomy, None, known)

    first, report = session(fresh, "My dog's name is Rex.", ())
    assert [f.key for f in report.known] == ["dog's name"]
    with_old, with_old_report = session(first, "I live in Brisk.", report.known)
    assert [f.key for f in with_old_report.known] == ["dog's name", "home"] and with_old_report.facts == 1
    without_old, _ = session(first, "I live in Brisk.", ())
    question, answer = "What is my dog's name?", "Your dog's name is Rex."
    assert _answer_loss(tiny, spec, with_old, question, answer) < _answer_loss(tiny, spec, without_old, question, answer)
    # a consolidation that is not accepted keeps the facts it was given
    refused = replace(roomy, probe_ppl_budget=-0.5)
    earlier = with_old_report.known
    _, report = consolidate(tiny.model, tiny.tokenizer, spec, first, [{"role": "user", "content": "I live in Tolm."}],
                            tiny.anchor_ids, tiny.probe_ids, refused, None, earlier)
    assert not report.accepted and report.known == earlier


def test_a_rehearsed_answer_weighs_its_value_tokens_as_asked(tiny):
    from nsam.model.consolidation import qa_example

    [fact] = extract_facts("My locker code is 1504.")
    plain = qa_example(tiny.tokenizer, fact.questions[0], fact)
    weighted = qa_example(tiny.tokenizer, fact.questions[0], fact, value_weight=4.0)
    assert weighted.ids == plain.ids
    heavy = "".join(tiny.tokenizer.decode([weighted.ids[t + 1]]) for t, w in enumerate(weighted.weights) if w == 4.0)
    assert heavy == "1504"  # the value's tokens, and only they
    assert all(w == p for w, p in zip(weighted.weights, plain.weights) if w != 4.0)  # the rest as before


def test_a_question_asked_after_other_turns_trains_only_its_answer(tiny):
    from nsam.model.consolidation import qa_example

    [fact] = extract_facts("My sister's name is Olvena.")
    context = [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Light scatters."}]
    alone = qa_example(tiny.tokenizer, fact.questions[0], fact)
    after = qa_example(tiny.tokenizer, fact.questions[0], fact, context=context)
    prefix = tiny.tokenizer.encode_chat(context, add_generation_prompt=False)
    assert after.ids[:len(prefix)] == prefix and len(after.ids) > len(alone.ids)

    def trained(example):
        return tiny.tokenizer.decode([example.ids[t + 1] for t, w in enumerate(example.weights) if w > 0])
    assert trained(after) == trained(alone) and fact.answer in trained(after)  # the context's reply is not
