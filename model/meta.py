"""The outer loop: meta-train the fast level's learned parts with the backbone frozen.

An episode is teach → ask: the teach segment (a user stating facts, padded to whole chunks)
is written into the fast memory; then a *separate* pass — attention cannot see the teach
tokens any more — answers a question about one fact, reading only the memory. The loss on the
answer, plus next-token loss on general text with the memory on (so it does not hurt), trains
the projections, rates and gate through the memory writes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import Transformer
from .levels import AssociativeState, BatchLevels, FastLevelRunner, FastMemory

_ATTRIBUTES = ("favourite colour", "locker code", "cat's name", "home town", "employer", "boat's name",
               "lucky number", "sister's name", "street", "car's name", "teacher's name", "password hint")
_SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vo", "qui", "zan", "bel", "dor", "fe", "gru", "hal", "nix")


@dataclass(frozen=True)
class Episode:
    teach: list[int]
    ask: list[int]
    answer_mask: list[float]  # over ask[1:]: 1 where the target is an answer token


def _value(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return str(rng.randint(1000, 99999))
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_episode(tokenizer, rng: random.Random, n_facts: int, chunk: int) -> Episode:
    attrs = rng.sample(_ATTRIBUTES, n_facts)
    facts = [(a, _value(rng)) for a in attrs]
    statement = " ".join(f"My {a} is {v}." for a, v in facts)
    teach = tokenizer.encode_chat([{"role": "user", "content": statement}], add_generation_prompt=False)
    newline = tokenizer.encode("\n")[0]
    teach += [newline] * (-len(teach) % chunk)  # whole chunks: every fact is written before the ask
    attr, value = rng.choice(facts)
    prompt = tokenizer.encode_chat([{"role": "user", "content": f"What is my {attr}?"}])
    answer = tokenizer.encode(f"Your {attr} is {value}.")
    value_start = len(tokenizer.encode(f"Your {attr} is"))
    mask = [0.0] * (len(prompt) - 1) + [1.0 if i >= value_start else 0.0 for i in range(len(answer))]
    return Episode(teach, prompt + answer, mask)


def episode_loss(model: Transformer, fast: FastMemory, ep: Episode) -> torch.Tensor:
    layers = {layer: i for i, layer in enumerate(fast.spec.layers)}
    writer = FastLevelRunner(fast, AssociativeState.zeros(fast.spec))
    model(torch.tensor([ep.teach]), BatchLevels({}, None, None, layers, [writer]))
    reader = FastLevelRunner(fast, writer.state())
    ids = torch.tensor([ep.ask])
    logits = model(ids, BatchLevels({}, None, None, layers, [reader]))
    losses = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
    mask = torch.tensor(ep.answer_mask)
    return (losses * mask).sum() / mask.sum()


def general_loss(model: Transformer, fast: FastMemory, ids: list[int]) -> torch.Tensor:
    layers = {layer: i for i, layer in enumerate(fast.spec.layers)}
    runner = FastLevelRunner(fast, AssociativeState.zeros(fast.spec))
    x = torch.tensor([ids])
    logits = model(x, BatchLevels({}, None, None, layers, [runner]))
    return F.cross_entropy(logits[0, :-1].float(), x[0, 1:])


def held_out_loss(model: Transformer, fast: FastMemory, tokenizer, facts: int, episodes: int) -> float:
    """Mean answer loss on fixed held-out episodes (seeds never used in training)."""
    eps = [make_episode(tokenizer, random.Random(10_000 + i), facts, fast.spec.period_tokens) for i in range(episodes)]
    with torch.no_grad():
        return sum(float(episode_loss(model, fast, ep)) for ep in eps) / len(eps)


def meta_train(model: Transformer, fast: FastMemory, tokenizer, general_ids: list[int], steps: int, lr: float,
               facts: int, general_weight: float, seed: int, on_step=None) -> FastMemory:
    """Adam on the fast level's learned parameters over generated episodes (in place on `fast`,
    which is also returned); `on_step(step, loss, gate)` reports progress."""
    rng = random.Random(seed)
    fast.requires_grad_(True)
    opt = torch.optim.Adam(fast.parameters(), lr=lr)
    for step in range(1, steps + 1):
        ep = make_episode(tokenizer, rng, facts, fast.spec.period_tokens)
        loss = episode_loss(model, fast, ep) + general_weight * general_loss(model, fast, general_ids)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fast.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step, float(loss), torch.tanh(fast.gate).tolist())
    return fast.requires_grad_(False)
