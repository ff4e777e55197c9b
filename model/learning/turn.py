"""The per-turn learner: the medium level after one chat turn.

A message that says something is studied into notes and rehearsed (with the session's earlier
notes, so they are not overwritten) by context distillation; any other message is one gentle
next-token step on the user's words.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..backbone import Transformer
from ..levels import LevelSpec, LoraState
from ..updates import LevelReport, guard, update_on_examples
from .notes import Note
from .objectives import anchor_windows, chat_example
from .rehearsal import RehearsalConfig, rehearse
from .study import study


@dataclass(frozen=True)
class TurnConfig:
    rehearsal: RehearsalConfig = field(default_factory=lambda: RehearsalConfig(
        steps=8, lr=5e-3, everyday_per_step=3, own_answers=3))
    earlier_notes: int = 12  # the session's most recent notes rehearsed with a new turn's
    anchor_window: int = 64  # tokens of general text per step: a turn's update must stay cheap
    writer_samples: int = 2  # questions the model writes per value (the first greedy)


@dataclass(frozen=True)
class TurnUpdate:
    state: LoraState
    report: LevelReport
    notes: tuple[Note, ...]  # what this turn's message was studied into


def learn_turn(model: Transformer, tokenizer, spec: LevelSpec, state: LoraState, parents: Sequence[LoraState],
               message: str, session_notes: Sequence[Note], anchor_ids: list[int], turn: int,
               config: TurnConfig = TurnConfig()) -> TurnUpdate:
    """The medium level after the user's `message` (the `turn`-th of the session) was answered."""
    started = time.perf_counter()
    new = tuple(study(model, tokenizer, message, config.writer_samples, seed=turn))
    if not new or not config.rehearsal.steps:
        level, report = update_on_examples(model, spec, state, list(parents),
                                           [chat_example(tokenizer, [{"role": "user", "content": message}], ("user",))])
        return TurnUpdate(level, report, new)
    notes = [*session_notes[-config.earlier_notes:], *new] if config.earlier_notes else list(new)
    windows = anchor_windows(anchor_ids, config.anchor_window)
    result = rehearse(model, tokenizer, spec, state, parents, notes, windows, config.rehearsal, offset=turn)
    level, report = guard(spec, state, result.state, None, result.surprise, started)
    return TurnUpdate(level, report, new)
