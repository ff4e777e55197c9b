"""Consolidation: fold a session's notes into the user's slow level (a pure function).

Build the notes (this session's, then the user's earlier ones it does not restate) → rehearse
them by context distillation → keep the result within the drift budget on a held-out probe
(cut back towards the old level if needed) → report. The caller commits or not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..backbone import Transformer
from ..errors import Interrupted
from ..levels import LevelSpec, LoraState
from ..updates import guard
from .notes import Note, content_words, merge_notes
from .objectives import anchor_windows, answer_example, frozen_cached, probe_loss, selected, answers_said
from .rehearsal import RehearsalConfig, rehearse
from .study import study


@dataclass(frozen=True)
class ConsolidationConfig:
    rehearsal: RehearsalConfig = field(default_factory=lambda: RehearsalConfig(steps=24, lr=1.5e-3, own_answers=6))
    known_notes: int = 48  # notes a user keeps, rehearsed again by every later consolidation
    anchor_window: int = 128  # tokens of general text per step
    probe_ppl_budget: float = 0.02  # the probe's perplexity may rise this much over the frozen model's
    scale_searches: int = 4  # past the budget: bisections for the largest alpha in old + alpha (new - old) within it
    same_topic: float = 0.6  # a new note replaces a kept one whose frame shares more than this share of words


@dataclass(frozen=True)
class ConsolidationReport:
    accepted: bool
    reason: str  # "ok" | "forgetting" | "non-finite" | "norm-bound" | "no-data"
    probe_loss: float  # general-text loss with the candidate user level
    baseline_probe_loss: float  # same probe, frozen model
    recall_loss: float  # the notes' answer loss after training
    notes: int  # this session's notes
    update_norm: float
    drift: float
    seconds: float
    step_scale: float = 1.0  # < 1: the update was cut back to stay within the probe budget
    trust_region: str = "full"  # "full" | "interpolated"
    known: tuple[Note, ...] = ()  # the notes to keep with the new level
    steps_trained: int = 0
    answers_said: float = math.nan  # share of the notes' answers the kept level says word for word


def same_topic(threshold: float) -> Callable[[Note, Note], bool]:
    """Whether a new note restates a kept one: their frames (the clause without its value) share
    more than `threshold` of their words (of the shorter)."""
    def check(old: Note, new: Note) -> bool:
        a, b = content_words(old.frame), content_words(new.frame)
        return bool(a and b) and len(a & b) / min(len(a), len(b)) > threshold and old.value != new.value
    return check


def session_notes(model: Transformer, tokenizer, transcript: Sequence[dict[str, str]],
                  notes: Sequence[Note]) -> list[Note]:
    """The session's notes: those its turns wrote, or (a session learnt without them) studied now."""
    if notes:
        return list(notes)
    return [n for i, m in enumerate(transcript) if m["role"] == "user" for n in study(model, tokenizer, m["content"], seed=i)]


def consolidate(model: Transformer, tokenizer, spec: LevelSpec, user_state: LoraState,
                transcript: Sequence[dict[str, str]], anchor_ids: list[int], probe_ids: list[int],
                config: ConsolidationConfig = ConsolidationConfig(),
                should_stop: Callable[[], bool] | None = None, known: tuple[Note, ...] = (),
                notes: Sequence[Note] = ()) -> tuple[LoraState, ConsolidationReport]:
    """Fold the session (`notes`, its turns' notes, or `transcript` studied) into `user_state`,
    rehearsing the `known` notes of earlier sessions with it; never mutates its inputs.
    `should_stop()` is asked before every training step and probe; yes raises `Interrupted`."""
    started = time.perf_counter()

    def checkpoint() -> None:
        if should_stop is not None and should_stop():
            raise Interrupted("consolidation interrupted before it finished; nothing was changed")

    checkpoint()
    baseline = frozen_cached(model, ("probe", tuple(probe_ids)), lambda: probe_loss(model, spec, [], probe_ids))
    new_notes = session_notes(model, tokenizer, transcript, notes)
    if not new_notes:
        return user_state, ConsolidationReport(False, "no-data", baseline, baseline, math.nan, 0, 0.0,
                                               user_state.weight_norm(), time.perf_counter() - started, known=known)
    kept = merge_notes(known, new_notes, config.known_notes, same_topic(config.same_topic))
    windows = anchor_windows(anchor_ids, config.anchor_window, start=int(user_state.step))
    result = rehearse(model, tokenizer, spec, user_state, [], kept, windows, config.rehearsal,
                      offset=int(user_state.step), check=checkpoint)
    level, report = guard(spec, user_state, result.state, None, result.surprise, started)
    if not report.accepted:
        return user_state, ConsolidationReport(False, report.reason, math.nan, baseline, math.nan, len(new_notes),
                                               report.update_norm, report.drift, time.perf_counter() - started,
                                               known=known)
    budget = math.log1p(config.probe_ppl_budget)

    def probed(alpha: float) -> tuple[LoraState, float]:
        checkpoint()
        candidate = level if alpha == 1.0 else _interpolate(user_state, level, alpha)
        return candidate, probe_loss(model, spec, [candidate], probe_ids)

    def within(loss: float) -> bool:
        return math.isfinite(loss) and loss - baseline <= budget

    # Past the budget, bisect for the largest step scale within it (the probe is not linear in it).
    candidate, loss = probed(1.0)
    scale, ok = 1.0, within(loss)
    low, high = 0.0, 1.0
    for _ in range(0 if ok else config.scale_searches):
        mid = (low + high) / 2
        tried, tried_loss = probed(mid)
        if within(tried_loss):
            low, candidate, loss, scale, ok = mid, tried, tried_loss, mid, True
        else:
            high = mid
            if not ok:
                candidate, loss, scale = tried, tried_loss, mid
    checkpoint()
    asked = selected([answer_example(tokenizer, (), n.questions[0], n.answer) for n in kept])
    said = answers_said(model, spec, [candidate], asked)
    return (candidate if ok else user_state), ConsolidationReport(
        ok, "ok" if ok else "forgetting", loss, baseline, result.notes_loss, len(new_notes), report.update_norm,
        report.drift, time.perf_counter() - started, scale, "full" if scale == 1.0 else "interpolated",
        kept if ok else known, config.rehearsal.steps, said)


def _interpolate(old: LoraState, new: LoraState, alpha: float) -> LoraState:
    """old + alpha (new - old) for the weights; the new optimizer moments."""
    return LoraState(old.a + alpha * (new.a - old.a), old.b + alpha * (new.b - old.b), new.m_a, new.v_a,
                     new.m_b, new.v_b, new.step)
