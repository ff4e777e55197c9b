"""Consolidation: fold a session's knowledge into the user's slow level (a pure function).

Following what we measured (docs: shared LEARNING.md): per-turn updates alone barely recall,
so consolidation replays the session at the slow level and rehearses question→answer pairs
built from what the user stated, while a KL anchor to the frozen model on general text and on
questions the user never answered limits forgetting and false binding. The caller gets probe
figures and decides whether to commit.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import Transformer
from .levels import LevelSpec, LoraState
from .updates import TrainingExample, _batch, guard, lora_logits, token_losses, train_lora


@dataclass(frozen=True)
class Fact:
    """One thing the user said about themselves, as (question forms, answer)."""

    key: str
    questions: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class ConsolidationReport:
    accepted: bool
    reason: str  # "ok" | "forgetting" | "non-finite" | "norm-bound" | "no-data"
    probe_loss: float  # general-text loss with the candidate user level
    baseline_probe_loss: float  # same probe, frozen model
    recall_loss: float  # loss on the rehearsed answers after training
    facts: int
    update_norm: float
    drift: float
    seconds: float


_VALUE = r"([^.!?\n;]{1,60}?)"
_END = r"\s*(?:[.!?\n;]|,\s*(?:and|but)\b|$)"
_PATTERNS: tuple[tuple[re.Pattern, str, tuple[str, ...], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), key, qs, a) for p, key, qs, a in (
        (r"\bmy ((?:[a-z]+'s |[a-z]+ ){0,2}[a-z]+) (?:is|are|was) (?:called |named )?" + _VALUE + _END,
         "{0}", ("What is my {0}?", "Do you remember my {0}?", "Tell me my {0}."), "Your {0} is {1}."),
        (r"\bI live in " + _VALUE + _END, "home",
         ("Where do I live?", "Which place do I live in?", "Do you remember where I live?"), "You live in {0}."),
        (r"\bI work (?:at|for) " + _VALUE + _END, "employer",
         ("Where do I work?", "Who is my employer?", "Do you remember where I work?"), "You work at {0}."),
        (r"\bI(?:'m| am) from " + _VALUE + _END, "origin",
         ("Where am I from?", "Where do I come from?", "Do you remember where I am from?"), "You are from {0}."),
        (r"\bI was born in " + _VALUE + _END, "birthplace",
         ("Where was I born?", "In which place was I born?", "Do you remember where I was born?"),
         "You were born in {0}."),
    )
)

# Questions about things users commonly have; the ones not taught anchor the level to the
# frozen model's answer, so taught values do not leak into untaught slots.
UNTAUGHT_PROBES = (
    "favorite color", "cousin's name", "car", "birthday", "favorite food", "dentist's name",
    "middle name", "phone number", "best friend's name", "favorite movie", "boss's name", "hobby",
)


def extract_facts(text: str) -> list[Fact]:
    """Statements such as "my sister's name is Ola" or "I live in Brisk" -> facts."""
    facts: dict[str, Fact] = {}
    for pattern, key, questions, answer in _PATTERNS:
        for m in pattern.finditer(text):
            groups = [g.strip().rstrip(",") for g in m.groups()]
            if not all(groups) or groups[0].lower() in ("name", "i") and key == "{0}" and len(groups) < 2:
                continue
            k = key.format(*groups).lower()
            facts[k] = Fact(k, tuple(q.format(*groups) for q in questions), answer.format(*groups))
    return list(facts.values())


def chat_example(tokenizer, messages: list[dict[str, str]], train_roles: tuple[str, ...]) -> TrainingExample:
    """Render messages with the chat template; weight 1 on the content of `train_roles`."""
    ids: list[int] = []
    weights: list[float] = []
    for i in range(len(messages)):
        upto = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)
        new = upto[len(ids):]
        ids = upto
        on = 1.0 if messages[i]["role"] in train_roles else 0.0
        weights.extend([on] * len(new))
    # weights[t] is the weight of predicting ids[t]; shift to targets ids[1:].
    return TrainingExample(ids, weights[1:])


def _greedy(model: Transformer, ids: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    x = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(model(x)[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def probe_loss(model: Transformer, spec: LevelSpec, levels: list[LoraState], probe_ids: list[int]) -> float:
    """Mean next-token loss on general text, with the given LoRA levels (none = frozen)."""
    ids = torch.tensor([probe_ids])
    with torch.inference_mode():
        if levels:
            zero_a = torch.zeros(len(spec.layers), 0, levels[0].a.shape[-1])
            zero_b = torch.zeros(len(spec.layers), levels[0].b.shape[1], 0)
            logits = lora_logits(model, spec, levels, zero_a, zero_b, ids)
        else:
            logits = model(ids)
        return float(token_losses(logits, ids[:, 1:]).mean())


@dataclass(frozen=True)
class ConsolidationConfig:
    steps: int = 24
    lr: float = 3e-3
    kl_weight: float = 1.0
    untaught_weight: float = 1.0
    replay_weight: float = 0.5
    max_forgetting: float = 0.05  # accept if probe loss <= baseline * (1 + this)
    untaught_probes: int = 4


def consolidate(model: Transformer, tokenizer, spec: LevelSpec, user_state: LoraState,
                transcript: list[dict[str, str]], anchor_ids: list[int], probe_ids: list[int],
                config: ConsolidationConfig = ConsolidationConfig()) -> tuple[LoraState, ConsolidationReport]:
    """Fold what the user said in `transcript` into `user_state`; never mutates its inputs."""
    started = time.perf_counter()
    user_text = "\n".join(m["content"] for m in transcript if m["role"] == "user")
    facts = extract_facts(user_text)
    statements = [m for m in transcript if m["role"] == "user"]
    baseline = probe_loss(model, spec, [], probe_ids)
    if not facts and not statements:
        return user_state, ConsolidationReport(False, "no-data", baseline, baseline, math.nan, 0, 0.0,
                                               user_state.weight_norm(), time.perf_counter() - started)

    rehearsal = [chat_example(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": f.answer}],
                              ("assistant",)) for f in facts for q in f.questions]
    replay = [chat_example(tokenizer, [m], ("user",)) for m in statements]
    taught = {f.key for f in facts}
    untaught = [u for u in UNTAUGHT_PROBES if u not in taught][:config.untaught_probes]
    negatives = []
    for attr in untaught:
        prompt = tokenizer.encode_chat([{"role": "user", "content": f"What is my {attr}?"}])
        answer = _greedy(model, prompt, 12, tokenizer.eos_token_ids)
        negatives.append(TrainingExample(prompt + answer, [0.0] * (len(prompt) - 1) + [1.0] * len(answer)))

    groups = [(ex, w) for ex, w in ((rehearsal, 1.0), (replay, config.replay_weight)) if ex]
    batches = [(_batch(ex), w) for ex, w in groups]
    anchor = torch.tensor([anchor_ids])
    neg_ids, _, neg_w = _batch(negatives) if negatives else (None, None, None)
    with torch.inference_mode():
        anchor_ref = F.log_softmax(model(anchor).float(), -1)
        neg_ref = F.log_softmax(model(neg_ids).float(), -1) if neg_ids is not None else None

    def objective(logits_fn):
        loss, surprise = 0.0, 0.0
        for (ids, targets, weights), w in batches:
            losses = token_losses(logits_fn(ids), targets)
            mean = (losses * weights).sum() / weights.sum().clamp_min(1e-6)
            loss = loss + w * mean
            surprise += float(mean.detach()) * w
        loss = loss + config.kl_weight * _kl(logits_fn(anchor), anchor_ref, None)
        if neg_ids is not None:
            loss = loss + config.untaught_weight * _kl(logits_fn(neg_ids), neg_ref, neg_w)
        return loss, surprise

    new, surprise = train_lora(model, spec, user_state, [], objective, config.steps, config.lr)
    kept, level = guard(spec, user_state, new, None, surprise, started)
    if not level.accepted:
        return user_state, ConsolidationReport(False, level.reason, math.nan, baseline, math.nan, len(facts),
                                               level.update_norm, level.drift, time.perf_counter() - started)
    candidate_probe = probe_loss(model, spec, [new], probe_ids)
    recall = math.nan
    if rehearsal:
        ids, targets, weights = _batch(rehearsal)
        with torch.inference_mode():
            zero_a = torch.zeros(len(spec.layers), 0, new.a.shape[-1])
            zero_b = torch.zeros(len(spec.layers), new.b.shape[1], 0)
            losses = token_losses(lora_logits(model, spec, [new], zero_a, zero_b, ids), targets)
        recall = float((losses * weights).sum() / weights.sum())
    ok = math.isfinite(candidate_probe) and candidate_probe <= baseline * (1 + config.max_forgetting)
    report = ConsolidationReport(ok, "ok" if ok else "forgetting", candidate_probe, baseline, recall, len(facts),
                                 level.update_norm, level.drift, time.perf_counter() - started)
    return (new if ok else user_state), report


def _kl(logits, ref_logprobs, weights) -> torch.Tensor:
    """KL(frozen ‖ adapted) per position, averaged over weighted positions (all if None)."""
    logp = F.log_softmax(logits.float(), -1)
    kl = (ref_logprobs.exp() * (ref_logprobs - logp)).sum(-1)  # (N, T)
    if weights is None:
        return kl.mean()
    # weights index targets (positions 1..T-1); the prediction for them sits at 0..T-2.
    w = weights
    return (kl[:, :-1] * w).sum() / w.sum().clamp_min(1e-6)
