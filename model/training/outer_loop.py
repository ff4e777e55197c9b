"""The outer loop: meta-train the fast level's learned parts with the backbone frozen.

An episode is teach → ask: the teach segment (a user stating facts, then unrelated text, padded
to whole chunks) is written into the fast memory. It comes in two forms: one message of facts
followed by prose, or a chat session as the server writes it (each fact its own turn with the
assistant's acknowledgement, unrelated exchanges between them). Then a *separate* pass —
attention cannot see the teach tokens any more — answers a question about one fact, reading only the memory. The
loss on the answer's value tokens, plus next-token loss on general text with the memory on (so
reading it never hurts ordinary text), trains the projections, rates and gate through the
memory writes. A third term keeps the memory from putting words in the model's mouth: after
facts are written, chat questions they do not answer (general ones, and personal ones about
attributes never taught) must still get the backbone's own replies. Episodes are batched: one
step runs `batch` of each kind side by side.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbone import Transformer
from ..learning.objectives import everyday_questions
from ..levels import AssociativeState, BatchLevels, FastLevelRunner, FastMemory
from ..sampling import greedy_continuation

GENERAL_QUESTIONS = everyday_questions()[:18]  # the general-knowledge ones

_ATTRIBUTES = ("favourite colour", "locker code", "cat's name", "home town", "employer", "boat's name",
               "lucky number", "sister's name", "street", "car's name", "teacher's name", "password hint",
               "dentist's name", "gym", "bike's name", "grandmother's village", "pin", "horse's name",
               "favourite band", "landlord's name", "flight number", "club", "nephew's name", "allergy")
_SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vo", "qui", "zan", "bel", "dor", "fe", "gru", "hal", "nix",
              "pra", "sul", "tem", "wy", "or", "eth")
_STATE = ("My {a} is {v}.", "By the way, my {a} is {v}.", "Just so you know, my {a} is {v}.",
          "Please remember that my {a} is {v}.", "Oh, and my {a}? It's {v}.")
_ACK = ("Got it, your {a} is {v}.", "Noted: your {a} is {v}.", "I'll remember that your {a} is {v}.",
        "Thanks for telling me. Your {a} is {v}.")
_ASK = ("What is my {a}?", "Do you remember my {a}?", "Can you tell me my {a}?", "What's my {a} again?",
        "Remind me, what is my {a}?")


@dataclass(frozen=True)
class Episode:
    teach: list[int]
    ask: list[int]
    answer_mask: list[float]  # over ask[1:]: 1 where the target is a value token


def _value(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return str(rng.randint(1000, 99999))
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_episode(tokenizer, rng: random.Random, n_facts: int, chunk: int,
                 distractor: list[int] | None = None, exclude: tuple[str, ...] = (),
                 small_talk: list[tuple[str, str]] | None = None) -> Episode:
    """`distractor`: token ids written after the facts (the memory must keep them past it);
    `exclude`: attributes not to teach; `small_talk`: (question, reply) exchanges — when given,
    the facts are taught as a chat session with some of them in between (`distractor` unused)."""
    facts = [(a, _value(rng)) for a in rng.sample([a for a in _ATTRIBUTES if a not in exclude], n_facts)]
    if small_talk is None:
        statement = " ".join(rng.choice(_STATE).format(a=a, v=v) for a, v in facts)
        teach = tokenizer.encode_chat([{"role": "user", "content": statement}], add_generation_prompt=False)
        teach += list(distractor or [])
    else:
        teach = tokenizer.encode_chat(_chat_session(rng, facts, small_talk), add_generation_prompt=False)
    newline = tokenizer.encode("\n")[0]
    teach += [newline] * (-len(teach) % chunk)  # whole chunks: every fact is written before the ask
    attr, value = rng.choice(facts)
    prompt = tokenizer.encode_chat([{"role": "user", "content": rng.choice(_ASK).format(a=attr)}])
    answer = tokenizer.encode(f"Your {attr} is {value}.")
    value_start = len(tokenizer.encode(f"Your {attr} is"))
    mask = [0.0] * (len(prompt) - 1) + [1.0 if i >= value_start else 0.0 for i in range(len(answer))]
    return Episode(teach, prompt + answer, mask)


def _chat_session(rng: random.Random, facts: list[tuple[str, str]], small_talk: list[tuple[str, str]]) -> list[dict]:
    """Each fact stated in its own turn and acknowledged, 0-3 unrelated exchanges placed among
    and after them: the stream the fast level writes while it serves a session."""
    turns = [(rng.choice(_STATE).format(a=a, v=v), rng.choice(_ACK).format(a=a, v=v)) for a, v in facts]
    for exchange in rng.sample(small_talk, min(len(small_talk), rng.randint(0, 3))):
        turns.insert(rng.randint(1, len(turns)), exchange)
    return [{"role": role, "content": text} for q, r in turns for role, text in (("user", q), ("assistant", r))]


def control_prompts(tokenizer) -> list[tuple[str | None, list[int]]]:
    """Chat prompts whose replies the memory must leave alone: general questions (attribute
    None), and for each attribute a personal question about it and a new statement of it
    (asked or stated after other facts were taught)."""
    rng = random.Random(30_000)
    questions = [(None, q) for q in GENERAL_QUESTIONS]
    questions += [(a, _ASK[i % len(_ASK)].format(a=a)) for i, a in enumerate(_ATTRIBUTES)]
    questions += [(a, _STATE[i % len(_STATE)].format(a=a, v=_value(rng))) for i, a in enumerate(_ATTRIBUTES)]
    return [(a, tokenizer.encode_chat([{"role": "user", "content": q}])) for a, q in questions]


def small_talk_of(controls: list[tuple[str | None, list[int], list[int]]], tokenizer) -> list[tuple[str, str]]:
    """The general control questions with the backbone's replies, as text for chat sessions
    (`controls` in `control_prompts` order, each with its reply)."""
    stop = set(tokenizer.eos_token_ids)
    replies = [r for a, _, r in controls if a is None]
    return [(q, tokenizer.decode([t for t in r if t not in stop]).strip()) for q, r in zip(GENERAL_QUESTIONS, replies)]


def reference_replies(model: Transformer, prompts: list[list[int]], max_tokens: int, stop: set[int]) -> list[list[int]]:
    """The backbone's greedy replies (no memory), stop token included: what the memory must not change."""
    device = _device(model)
    return [greedy_continuation(lambda x: model(x)[0, -1], p, max_tokens, stop, keep_stop=True, device=device)
            for p in prompts]


def make_control_episode(tokenizer, rng: random.Random, n_facts: int, chunk: int, distractor: list[int] | None,
                         attribute: str | None, prompt: list[int], reply: list[int],
                         small_talk: list[tuple[str, str]] | None = None) -> Episode:
    """Facts written, then a message they do not answer: the target is the backbone's reply."""
    taught = make_episode(tokenizer, rng, n_facts, chunk, distractor, exclude=(attribute,) if attribute else (),
                          small_talk=small_talk)
    return Episode(taught.teach, prompt + reply, [0.0] * (len(prompt) - 1) + [1.0] * len(reply))


def _device(model: Transformer) -> torch.device:
    return model.embed_tokens.weight.device


def _pad(rows: list[list], value) -> list[list]:
    n = max(len(r) for r in rows)
    return [r + [value] * (n - len(r)) for r in rows]


def _with_memory(model: Transformer, fast: FastMemory, ids: torch.Tensor,
                 runners: list[FastLevelRunner]) -> torch.Tensor:
    layers = {layer: i for i, layer in enumerate(fast.spec.layers)}
    return model(ids, BatchLevels({}, None, None, layers, runners))


def episodes_loss(model: Transformer, fast: FastMemory, episodes: list[Episode], pad_id: int) -> torch.Tensor:
    """Mean value-token loss of a batch of episodes (teach segments padded to the same chunks)."""
    device = _device(model)
    chunk = fast.spec.period_tokens
    writers = [FastLevelRunner(fast, AssociativeState.zeros(fast.spec, device)) for _ in episodes]
    teach = _pad([ep.teach for ep in episodes], pad_id)
    assert len(teach[0]) % chunk == 0
    _with_memory(model, fast, torch.tensor(teach, device=device), writers)
    readers = [FastLevelRunner(fast, w.state()) for w in writers]
    ids = torch.tensor(_pad([ep.ask for ep in episodes], pad_id), device=device)
    mask = torch.tensor(_pad([ep.answer_mask for ep in episodes], 0.0), device=device)
    logits = _with_memory(model, fast, ids, readers)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum()


def episode_loss(model: Transformer, fast: FastMemory, ep: Episode) -> torch.Tensor:
    return episodes_loss(model, fast, [ep], 0)


def general_loss(model: Transformer, fast: FastMemory | None, windows: list[list[int]]) -> torch.Tensor:
    """Next-token loss on equal-length windows of ordinary text, each with a fresh memory that
    it writes as it goes (None: the backbone alone)."""
    x = torch.tensor(windows, device=_device(model))
    if fast is None:
        logits = model(x)
    else:
        runners = [FastLevelRunner(fast, AssociativeState.zeros(fast.spec, x.device)) for _ in windows]
        logits = _with_memory(model, fast, x, runners)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())


@torch.no_grad()
def general_ppl(model: Transformer, fast: FastMemory | None, windows: list[list[int]], batch: int = 8) -> float:
    """Perplexity over windows of ordinary text (mean of batch losses), memory on or (None) off."""
    losses = [float(general_loss(model, fast, windows[i:i + batch])) for i in range(0, len(windows), batch)]
    return math.exp(sum(losses) / len(losses))


def held_out_episodes(tokenizer, facts: int, count: int, chunk: int, distractors: list[list[int]] | None = None,
                      small_talk: list[tuple[str, str]] | None = None) -> list[Episode]:
    """Fixed episodes from seeds never used in training; with `small_talk`, taught as chat sessions."""
    out = []
    for i in range(count):
        d = distractors[i % len(distractors)] if distractors else None
        out.append(make_episode(tokenizer, random.Random(10_000 + i), facts, chunk, d, small_talk=small_talk))
    return out


@torch.no_grad()
def held_out_loss(model: Transformer, fast: FastMemory, episodes: list[Episode], batch: int = 8) -> float:
    losses = [float(episodes_loss(model, fast, episodes[i:i + batch], 0)) for i in range(0, len(episodes), batch)]
    return sum(losses) / len(losses)


def windows_of(ids: list[int], length: int) -> list[list[int]]:
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]


def meta_train(model: Transformer, fast: FastMemory, tokenizer, general: list[list[int]], steps: int, lr: float,
               facts: int, general_weight: float, seed: int, batch: int = 1, on_step=None,
               should_stop=None, controls: list[tuple[str | None, list[int], list[int]]] = (),
               control_weight: float = 0.0, small_talk: list[tuple[str, str]] = (),
               chat_share: float = 0.0) -> FastMemory:
    """Adam on the fast level's learned parameters over generated episodes (in place on `fast`,
    which is also returned). `general`: equal-length windows of ordinary text, used both as
    distractors inside episodes and for the general-text loss. `controls`: (attribute, prompt,
    backbone reply) for the control term. `chat_share` of the episodes are taught as chat
    sessions with `small_talk` exchanges among the facts. `on_step(step, loss, gate)` reports progress;
    `should_stop()` ends training early (a time budget)."""
    rng = random.Random(seed)
    fast.requires_grad_(True)
    opt = torch.optim.Adam(fast.parameters(), lr=lr)
    chunk = fast.spec.period_tokens
    pad = tokenizer.encode("\n")[0]

    def distractor() -> list[int]:
        return rng.choice(general)[:rng.randint(0, 4) * chunk]

    def talk() -> list[tuple[str, str]] | None:
        return small_talk if small_talk and rng.random() < chat_share else None

    for step in range(1, steps + 1):
        eps = [make_episode(tokenizer, rng, rng.randint(1, facts), chunk, distractor(), small_talk=talk())
               for _ in range(batch)]
        loss = episodes_loss(model, fast, eps, pad)
        if general_weight:
            loss = loss + general_weight * general_loss(model, fast, rng.sample(general, min(batch, len(general))))
        if control_weight and controls:
            ctl = [make_control_episode(tokenizer, rng, rng.randint(1, facts), chunk, distractor(),
                                        *rng.choice(controls), small_talk=talk()) for _ in range(batch)]
            loss = loss + control_weight * episodes_loss(model, fast, ctl, pad)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fast.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step, float(loss.detach()), torch.tanh(fast.gate.detach()).tolist())
        if should_stop is not None and should_stop():
            break
    return fast.requires_grad_(False)
