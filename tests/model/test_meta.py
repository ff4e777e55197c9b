import random

import torch

from nsam.model import meta
from nsam.model.runtime import NsamModel


def test_outer_loop_gradient_reaches_the_learned_rates_and_gate_through_the_writes():
    m = NsamModel.load("tiny")
    fast = m.fast_params.requires_grad_(True)
    ep = meta.make_episode(m.tokenizer, random.Random(0), 3, fast.spec.period_tokens)
    assert len(ep.teach) % fast.spec.period_tokens == 0 and sum(ep.answer_mask) > 0
    with torch.no_grad():
        fast.gate.fill_(0.3)
    loss = meta.episode_loss(m.model, fast, ep)
    loss.backward()
    for name in ("gate", "w_k", "w_v", "w_eta", "b_eta", "w_o"):
        grad = getattr(fast, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in m.model.parameters())  # the backbone stays frozen
