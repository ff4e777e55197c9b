"""One rehearsal: train a LoRA level on notes by context distillation, anchored where it was.

Shared by the per-turn learner (the medium level) and consolidation (the user level): each step
asks every note once (its question forms in turn), plus a rotating handful of everyday questions
answered as the frozen model answers them and a window of general text, both held to the
parents' distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbone import Transformer
from ..levels import LevelSpec, LoraState
from ..sampling import greedy_continuation
from ..updates import TrainingExample, train_lora
from .notes import Note
from .objectives import (Distillation, distill_notes, everyday_questions, frozen_answers, frozen_replies, parent_logits,
                         selected, text_anchor)
from .study import FIRST_PERSON as _FIRST_PERSON


@dataclass(frozen=True)
class RehearsalConfig:
    steps: int  # optimizer steps
    lr: float  # Adam learning rate
    ce_weight: float = 1.0  # cross-entropy on the note's answer, beside the KL to the teacher
    everyday_weight: float = 1.0  # KL to the frozen model's answers to everyday questions
    everyday_per_step: int = 4  # everyday questions asked per step (rotating through the preset)
    anchor_weight: float = 1.0  # KL to the parents on a window of general text per step
    own_answers: int = 4  # personal everyday questions the level answers itself halfway (0: none)
    own_weight: float = 1.0  # KL to the parents along those answers: a taught value said there is pulled back


@dataclass(frozen=True)
class RehearsalResult:
    state: LoraState
    surprise: float  # the notes' answer loss before the first step
    notes_loss: float  # after the last step


def rounds(notes: Sequence[Note]) -> list[list[tuple[Note, str, str]]]:
    """One question form of every note (with its answer) per round, cycling through each note's forms."""
    forms = max((len(n.questions) for n in notes), default=0)
    return [[(n, n.questions[r % len(n.questions)], n.reply(r % len(n.questions))) for n in notes]
            for r in range(forms)]


def rehearse(model: Transformer, tokenizer, spec: LevelSpec, state: LoraState, parents: Sequence[LoraState],
             notes: Sequence[Note], windows: Sequence[torch.Tensor], config: RehearsalConfig, offset: int = 0,
             check: Callable[[], None] | None = None) -> RehearsalResult:
    """`config.steps` steps of the level on `notes`; `offset` picks where in the everyday
    questions and the anchor windows this rehearsal starts (successive updates cover them all)."""
    checkpoint = check or (lambda: None)
    per_round = [distill_notes(model, tokenizer, r) for r in rounds(notes)]
    questions = everyday_questions()
    frozen_replies(model, tokenizer, questions)  # all at once: one batched generation
    step = [0]
    last = [math.nan]

    def reference(ids: torch.Tensor) -> torch.Tensor:
        return parent_logits(model, spec, parents, ids)

    own: list[Distillation] = []  # the level's own answers to untaught personal questions, from halfway

    def objective(logits_fn):
        checkpoint()
        i = step[0]
        step[0] += 1
        if own:
            loss_own, _ = own[0].loss(logits_fn, 0.0)
        else:
            loss_own = 0.0
        loss, surprise = 0.0, math.nan
        if per_round:
            loss, surprise = per_round[i % len(per_round)].loss(logits_fn, config.ce_weight)
            last[0] = surprise
        k = config.everyday_per_step
        if k and config.everyday_weight:
            start = ((offset + i) * k) % len(questions)
            asked = [questions[(start + j) % len(questions)] for j in range(k)]
            everyday = frozen_answers(model, tokenizer, asked, reference)
            loss = loss + config.everyday_weight * _held(everyday, logits_fn)
        if windows and config.anchor_weight:
            anchor = text_anchor(model, windows[(offset + i) % len(windows)], reference)
            loss = loss + config.anchor_weight * _held(anchor, logits_fn)
        return loss + config.own_weight * loss_own, surprise

    half = config.steps // 2 if config.own_answers and config.own_weight else 0
    new, first = train_lora(model, spec, state, list(parents), objective, half, config.lr)
    if half:
        checkpoint()
        personal = [q for q in questions if _FIRST_PERSON.search(q)]
        asked = [personal[(offset * config.own_answers + j) % len(personal)] for j in range(config.own_answers)]
        own.append(own_answers(model, tokenizer, spec, [*parents, new], asked, parents))
    new, later = train_lora(model, spec, new, list(parents), objective, config.steps - half, config.lr)
    return RehearsalResult(new, first if half else later, last[0])


def own_answers(model: Transformer, tokenizer, spec: LevelSpec, levels: Sequence[LoraState], questions: Sequence[str],
                parents: Sequence[LoraState], tokens: int = 16) -> Distillation:
    """The level's own greedy answers to `questions` (with `levels` applied), with the parents'
    distribution along them: where the level says a taught value to a question nobody answered,
    the parents' distribution at that position pulls it back."""
    examples = []
    for q in questions:
        prompt = tokenizer.encode_chat([{"role": "user", "content": q}])
        reply = greedy_continuation(lambda x: parent_logits(model, spec, levels, x)[0, -1], prompt, tokens,
                                    tokenizer.eos_token_ids, keep_stop=True)
        examples.append(TrainingExample(prompt + reply, [0.0] * (len(prompt) - 1) + [1.0] * len(reply)))
    batch = selected(examples)
    with torch.inference_mode():
        ref = F.log_softmax(parent_logits(model, spec, parents, batch.ids)[batch.select].float(), -1)
    return Distillation(batch, ref)


def _held(target: Distillation | None, logits_fn) -> torch.Tensor | float:
    """KL only (no cross-entropy): the reference is the frozen model's own distribution."""
    if target is None:
        return 0.0
    loss, _ = target.loss(logits_fn, 0.0)
    return loss
