"""The medium level's per-turn learning (`learn_turn`) and the questions it rehearses against."""

import torch

from nsam.model.consolidation import _selected, chat_example, extract_facts, learn_turn, near_miss_questions
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


def test_a_message_without_facts_is_learnt_as_text_at_the_gentle_rate(tiny):
    spec = tiny.levels.get("medium")
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    messages = [{"role": "user", "content": "Why is the sea salty?"}, {"role": "assistant", "content": "Rivers."}]
    new, report = learn_turn(tiny.model, tiny.tokenizer, spec, fresh, [], messages, tiny.anchor_ids)
    assert report.accepted and int(new.step) == spec.steps


def test_near_miss_questions_never_ask_for_what_was_taught():
    facts = extract_facts("My sister's name is Olvena. My cousin's name is Brek. I live in Brisk.")
    taught = {f.key for f in facts}
    questions = near_miss_questions(facts, taught, 4)
    assert len(questions) == 4
    assert "What is my sister's name?" not in questions and "What is my cousin's name?" not in questions
    assert "Where do I live?" not in questions
