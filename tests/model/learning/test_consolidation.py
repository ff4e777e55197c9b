"""Consolidation on the tiny model: notes in, a user level within its drift budget out."""

import math
from dataclasses import replace

import pytest

from nsam.model.errors import Interrupted
from nsam.model.learning.consolidation import consolidate
from nsam.model.learning.notes import Note
from nsam.model.runtime import NsamModel
from nsam.model.state import MemoryState


@pytest.fixture(scope="module")
def tiny():
    return NsamModel.load("tiny")


def said(*messages: str) -> list[dict[str, str]]:
    return [m for text in messages for m in ({"role": "user", "content": text}, {"role": "assistant", "content": "Noted."})]


def user_notes(m, data) -> list[str]:
    return [n.value for n in MemoryState.from_bytes(data, m.fingerprint, m.levels, "user").notes]


def test_a_session_is_studied_and_folded_into_the_user_level(tiny):
    transcript = said("My locker combination is 7302.", "I was born in Karsvik.")
    user, report = tiny.consolidate(tiny.new_user_state(), tiny.new_session_state(None), transcript)
    assert report.notes == 2 and math.isfinite(report.probe_loss) and report.accepted
    assert user != tiny.new_user_state()
    assert tiny.new_session_state(user) != tiny.new_session_state(None)  # sessions start from it
    assert user_notes(tiny, user) == ["7302", "Karsvik"]


def test_a_later_session_keeps_the_earlier_notes_and_its_correction_wins(tiny):
    first, _ = tiny.consolidate(tiny.new_user_state(), tiny.new_session_state(None),
                                said("My locker code is 7302.", "I was born in Karsvik."))
    second, report = tiny.consolidate(first, tiny.new_session_state(first), said("Actually my locker code is 4411 now."))
    assert report.accepted and user_notes(tiny, second) == ["Karsvik", "4411"]


def test_the_notes_a_session_wrote_are_used_rather_than_studied_again(tiny):
    note = Note("My boat is called Wave", ("My boat is called what?",), "Your boat is called Wave.", "Wave")
    spec = tiny.levels.get("user")
    state = MemoryState.from_bytes(tiny.new_user_state(), tiny.fingerprint, tiny.levels, "user").levels["user"]
    _, report = consolidate(tiny.model, tiny.tokenizer, spec, state, said("Nothing to note here!"),
                            tiny.consolidation_anchor_ids, tiny.probe_ids, tiny.consolidation, notes=[note])
    assert report.notes == 1 and [n.value for n in report.known] == ["Wave"]


def test_a_session_that_says_nothing_changes_nothing(tiny):
    user, report = tiny.consolidate(tiny.new_user_state(), tiny.new_session_state(None), said("Thanks!"))
    assert not report.accepted and report.reason == "no-data" and user == tiny.new_user_state()


def test_an_update_past_the_drift_budget_is_cut_back_then_refused(tiny):
    spec = tiny.levels.get("user")
    state = MemoryState.from_bytes(tiny.new_user_state(), tiny.fingerprint, tiny.levels, "user").levels["user"]
    strict = replace(tiny.consolidation, probe_ppl_budget=-0.5)  # below the frozen model: out of reach
    new, report = consolidate(tiny.model, tiny.tokenizer, spec, state, said("My locker code is 7302."),
                              tiny.consolidation_anchor_ids, tiny.probe_ids, strict)
    assert not report.accepted and report.reason == "forgetting" and new is state
    assert report.step_scale == 0.5 ** strict.scale_searches and report.trust_region == "interpolated"


def test_a_consolidation_asked_to_stop_raises_interrupted(tiny):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Interrupted):
        tiny.consolidate(tiny.new_user_state(), tiny.new_session_state(None), said("My locker code is 7302."),
                         should_stop)
