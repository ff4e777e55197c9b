import random

import torch

from nsam.model.training import outer_loop
from nsam.model.runtime import NsamModel


def test_outer_loop_gradient_reaches_the_learned_rates_and_gate_through_the_writes():
    m = NsamModel.load("tiny")
    fast = m.fast_params.requires_grad_(True)
    ep = outer_loop.make_episode(m.tokenizer, random.Random(0), 3, fast.spec.period_tokens)
    assert len(ep.teach) % fast.spec.period_tokens == 0 and sum(ep.answer_mask) > 0
    with torch.no_grad():
        fast.gate.fill_(0.3)
    loss = outer_loop.episode_loss(m.model, fast, ep)
    loss.backward()
    for name in ("gate", "w_k", "w_v", "w_eta", "b_eta", "w_o"):
        grad = getattr(fast, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in m.model.parameters())  # the backbone stays frozen


def test_chat_session_episode_teaches_each_fact_in_its_own_acknowledged_turn():
    m = NsamModel.load("tiny")
    tok, chunk = m.tokenizer, m.fast_params.spec.period_tokens
    talk = [("What is the largest ocean?", "The Pacific."), ("Say hello in French.", "Bonjour!")]
    ep = outer_loop.make_episode(tok, random.Random(3), 3, chunk, small_talk=talk)
    teach = tok.decode(ep.teach)
    assert len(ep.teach) % chunk == 0
    assert teach.count("<|im_start|>user") == teach.count("<|im_start|>assistant") >= 3
    answer = tok.decode(ep.ask).split("<|im_start|>assistant\n")[-1]  # "Your X is V."
    attribute, value = answer[len("Your "):-1].split(" is ")
    assert f"my {attribute}" in teach and value in teach
    # Only the value's tokens are scored, and they spell the value.
    scored = [t for t, w in zip(ep.ask[1:], ep.answer_mask) if w]
    assert tok.decode(scored).strip(" .") == value


def test_control_prompts_include_new_statements_and_small_talk_keeps_the_replies():
    m = NsamModel.load("tiny")
    tok = m.tokenizer
    prompts = outer_loop.control_prompts(tok)
    rendered = [tok.decode(p) for _, p in prompts]
    assert any("my locker code is" in r.lower() for r in rendered)  # a statement, not only questions
    controls = [(a, p, [ord("o"), ord("k")] + list(tok.eos_token_ids)) for a, p in prompts]
    talk = outer_loop.small_talk_of(controls, tok)
    assert talk[0] == (outer_loop.GENERAL_QUESTIONS[0], "ok") and len(talk) == len(outer_loop.GENERAL_QUESTIONS)
