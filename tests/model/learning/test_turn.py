"""The per-turn learner on the tiny model: what a message says is studied, rehearsed and kept."""

import pytest
import torch

from nsam.model.learning import rehearsal as rehearsal_module
from nsam.model.learning.objectives import answer_example, selected
from nsam.model.runtime import NsamModel
from nsam.model.state import MemoryState
from nsam.model.updates import lora_logits_at


@pytest.fixture(scope="module")
def tiny():
    return NsamModel.load("tiny")


def session(m, data) -> MemoryState:
    return MemoryState.from_bytes(data, m.fingerprint, m.levels, "session")


def answer_loss(m, state: MemoryState, question: str, answer: str) -> float:
    batch = selected([answer_example(m.tokenizer, (), question, answer)])
    medium = state.levels["medium"]
    with torch.no_grad():
        logits = lora_logits_at(m.model, m.levels.get("medium"), [state.levels["user"], medium],
                                medium.a[:, :0], medium.b[:, :, :0], batch.ids, batch.select)
    return float(torch.nn.functional.cross_entropy(logits, batch.targets))


def turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "Noted."}]


def test_a_message_that_says_something_is_studied_into_notes_and_rehearsed(tiny):
    start = tiny.new_session_state(None)
    data, [report] = tiny.update_medium(start, turn("My locker combination is 7302."))
    after = session(tiny, data)
    [note] = after.notes
    assert note.value == "7302" and note.answer == "Your locker combination is 7302."
    assert "My locker combination is what?" in note.questions
    assert report.accepted
    before = answer_loss(tiny, session(tiny, start), note.questions[0], note.answer)
    assert answer_loss(tiny, after, note.questions[0], note.answer) < before


def test_a_message_with_nothing_to_note_is_one_gentle_step_on_its_words(tiny):
    data, [report] = tiny.update_medium(tiny.new_session_state(None), turn("Thanks, that helps!"))
    after = session(tiny, data)
    assert after.notes == () and report.accepted
    assert int(after.levels["medium"].step) == tiny.levels.get("medium").steps


def test_a_new_turns_notes_are_rehearsed_with_the_sessions_earlier_ones(tiny, monkeypatch):
    seen = []
    real = rehearsal_module.rehearse

    def spy(model, tokenizer, spec, state, parents, notes, *args, **kwargs):
        seen.append([n.value for n in notes])
        return real(model, tokenizer, spec, state, parents, notes, *args, **kwargs)
    monkeypatch.setattr("nsam.model.learning.turn.rehearse", spy)
    data, _ = tiny.update_medium(tiny.new_session_state(None), turn("My locker combination is 7302."))
    messages = turn("My locker combination is 7302.") + turn("I was born in Karsvik.")
    data, _ = tiny.update_medium(data, messages)
    assert seen == [["7302"], ["7302", "Karsvik"]]
    assert [n.value for n in session(tiny, data).notes] == ["7302", "Karsvik"]


def test_the_user_level_is_the_parent_and_stays_untouched(tiny):
    data, _ = tiny.update_medium(tiny.new_session_state(None), turn("My locker combination is 7302."))
    fresh = session(tiny, tiny.new_session_state(None))
    assert torch.equal(session(tiny, data).levels["user"].b, fresh.levels["user"].b)
