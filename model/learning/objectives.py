"""What a LoRA level is trained towards: examples, teachers and the losses between them.

The reference recipe is context distillation: for each note, the teacher is the frozen model
with the user's clause in its context, read along the note's answer; the student is the level
(on top of its parents) with only the question. Questions the user never answered, and general
text, keep the level where its parents are: KL to their distribution along the frozen model's
own answers. Pure functions of a model and its inputs; no I/O beyond the packaged presets.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from ..backbone import Transformer
from ..levels import LevelSpec, LoraState
from ..sampling import SamplingParams
from ..updates import TrainingExample, batch_examples, lora_logits, token_losses
from .notes import Note

@functools.cache
def everyday_questions() -> tuple[str, ...]:
    text = resources.files("nsam.model").joinpath("presets/everyday_questions.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def chat_example(tokenizer, messages: Sequence[dict[str, str]], train_roles: tuple[str, ...]) -> TrainingExample:
    """Render messages with the chat template; weight 1 on the content of `train_roles`."""
    ids: list[int] = []
    weights: list[float] = []
    for i in range(len(messages)):
        upto = tokenizer.encode_chat(list(messages[:i + 1]), add_generation_prompt=False)
        new = upto[len(ids):]
        ids = upto
        weights.extend([1.0 if messages[i]["role"] in train_roles else 0.0] * len(new))
    return TrainingExample(ids, weights[1:])  # weights[t] weighs predicting ids[t + 1]


def answer_example(tokenizer, context: Sequence[dict[str, str]], question: str, answer: str) -> TrainingExample:
    """`question` (after `context`, not trained on) answered with `answer`, weighted on the answer."""
    example = chat_example(tokenizer, [*context, {"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}], ("assistant",))
    if not context:
        return example
    skip = len(tokenizer.encode_chat(list(context), add_generation_prompt=False))
    return TrainingExample(example.ids, [0.0] * skip + list(example.weights[skip:]))


@dataclass(frozen=True)
class Batch:
    """ids (N, T); select (N, T): positions whose prediction carries weight; targets (K,);
    weights (K,). weights[t] weighs predicting ids[t + 1], made at position t."""

    ids: torch.Tensor
    select: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor


def selected(examples: Sequence[TrainingExample]) -> Batch:
    ids, targets, weights = batch_examples(list(examples))
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, :-1] = weights > 0
    return Batch(ids, select, targets[weights > 0], weights[weights > 0])


def kl(logits: torch.Tensor, ref_logprobs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(reference ‖ model) per selected position (K, V), weighted mean."""
    logp = F.log_softmax(logits.float(), -1)
    per = (ref_logprobs.exp() * (ref_logprobs - logp)).sum(-1)
    if weights is None:
        return per.mean()
    return (per * weights).sum() / weights.sum().clamp_min(1e-6)


@dataclass(frozen=True)
class Distillation:
    """A student batch and the teacher's log-probabilities at its weighted positions."""

    student: Batch
    teacher: torch.Tensor  # (K, V)

    def loss(self, logits_fn, ce_weight: float) -> tuple[torch.Tensor, float]:
        logits = logits_fn(self.student.ids, self.student.select)
        loss = kl(logits, self.teacher, self.student.weights)
        ce = (F.cross_entropy(logits.float(), self.student.targets, reduction="none") * self.student.weights).sum() \
            / self.student.weights.sum().clamp_min(1e-6)
        return loss + ce_weight * ce, float(ce.detach())


def parent_logits(model: Transformer, spec: LevelSpec, parents: Sequence[LoraState], ids: torch.Tensor) -> torch.Tensor:
    """Logits with only the parent levels applied (none: the frozen model)."""
    if not parents:
        return model(ids)
    like = parents[0]
    zero_a = like.a.new_zeros(len(spec.layers), 0, like.a.shape[-1])
    zero_b = like.b.new_zeros(len(spec.layers), like.b.shape[1], 0)
    return lora_logits(model, spec, list(parents), zero_a, zero_b, ids)


def distill_notes(model: Transformer, tokenizer, notes: Sequence[tuple[Note, str, str]]) -> Distillation | None:
    """(note, question, answer) as context distillation: the student sees the question alone, the
    teacher (the frozen model) the clause first; both read the answer."""
    if not notes:
        return None
    students = [answer_example(tokenizer, (), q, a) for _, q, a in notes]
    teachers = [answer_example(tokenizer, n.told(), q, a) for n, q, a in notes]
    student, teacher = selected(students), selected(teachers)
    if student.targets.shape != teacher.targets.shape or not torch.equal(student.targets, teacher.targets):
        raise ValueError("teacher and student answers are not the same tokens")
    with torch.inference_mode():
        ref = F.log_softmax(model(teacher.ids)[teacher.select].float(), -1)
    return Distillation(student, ref)


# The frozen model's answers do not change between updates: computed once per model.
_FROZEN: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


def frozen_cached(model: Transformer, key: tuple, compute):
    cache = _FROZEN.setdefault(model, {})
    if key not in cache:
        if len(cache) > 512:
            cache.clear()
        cache[key] = compute()
    return cache[key]


def frozen_replies(model: Transformer, tokenizer, questions: Sequence[str], tokens: int = 32) -> list[list[int]]:
    """The frozen model's greedy replies to `questions` (its end token kept: a target that
    teaches stopping), generated together and remembered per model."""
    from .study import generate  # generation is study's tool; imported here to keep the layers one way

    cache = _FROZEN.setdefault(model, {})
    missing = [q for q in dict.fromkeys(questions) if ("reply", q, tokens) not in cache]
    if missing:
        stop = tuple(tokenizer.eos_token_ids)
        prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in missing]
        replies = generate(model, tokenizer, prompts, [SamplingParams(max_tokens=tokens, stop_token_ids=stop)] * len(prompts))
        for q, reply in zip(missing, replies):
            cache[("reply", q, tokens)] = reply + [stop[0]] if len(reply) < tokens else reply
    return [cache[("reply", q, tokens)] for q in questions]


def frozen_answers(model: Transformer, tokenizer, questions: Sequence[str], reference=None, tokens: int = 32,
                   context: Sequence[dict[str, str]] = ()) -> Distillation | None:
    """The frozen model's own greedy answers to `questions` (after `context`), with the
    `reference(ids) -> logits` distribution along them (default: the frozen model's): KL to it
    keeps a level answering them as its parents do."""
    if not questions:
        return None
    examples = []
    for q, reply in zip(questions, frozen_replies(model, tokenizer, questions, tokens)):
        head = tokenizer.encode_chat([*context, {"role": "user", "content": q}])
        examples.append(TrainingExample(head + reply, [0.0] * (len(head) - 1) + [1.0] * len(reply)))
    batch = selected(examples)
    with torch.inference_mode():
        ref = F.log_softmax((reference or model)(batch.ids)[batch.select].float(), -1)
    return Distillation(batch, ref)


def text_anchor(model: Transformer, window: torch.Tensor, reference=None) -> Distillation:
    """A window of general text (1, T) with the `reference` distribution (default: the frozen
    model's) at every position."""
    batch = Batch(window, torch.ones_like(window, dtype=torch.bool), window.reshape(-1), torch.ones(window.numel()))
    with torch.inference_mode():
        ref = F.log_softmax((reference or model)(window)[0].float(), -1)
    return Distillation(batch, ref)


def anchor_windows(anchor_ids: list[int], window: int, start: int = 0) -> list[torch.Tensor]:
    """The anchor text cut into windows of `window` tokens, beginning at window `start`
    (wrapping round): each step anchors on the next window, so a level's updates cover the
    whole text in turn at the cost of one window per step."""
    if window <= 0 or window >= len(anchor_ids):
        return [torch.tensor([anchor_ids])]
    windows = [torch.tensor([anchor_ids[i:i + window]]) for i in range(0, len(anchor_ids) - window + 1, window)]
    start %= len(windows)
    return windows[start:] + windows[:start]


def probe_loss(model: Transformer, spec: LevelSpec, levels: Sequence[LoraState], probe_ids: list[int]) -> float:
    """Mean next-token loss on general text with the given LoRA levels (none: the frozen model)."""
    ids = torch.tensor([probe_ids])
    with torch.inference_mode():
        return float(token_losses(parent_logits(model, spec, levels, ids), ids[:, 1:]).mean())


def answers_said(model: Transformer, spec: LevelSpec, levels: Sequence[LoraState], batch: Batch) -> float:
    """Share of the batch's rows whose weighted tokens are each the top prediction with `levels`:
    the answers greedy decoding would give word for word."""
    with torch.inference_mode():
        logits = parent_logits(model, spec, levels, batch.ids)[:, :-1]
    targets = batch.ids[:, 1:]
    weighted = batch.select[:, :-1]
    right = (logits.argmax(-1) == targets) | ~weighted
    return float(right.all(-1).float().mean())
