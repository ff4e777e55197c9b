"""Notes as kept with a user: the latest value wins, and they survive a trip through JSON."""

from nsam.model.learning.consolidation import same_topic
from nsam.model.learning.notes import Note, merge_notes, notes_from_facts_json, notes_from_json, notes_to_json


def note(said: str, value: str) -> Note:
    return Note(said, (f"{said.replace(value, 'what')}?",), said.replace("My", "Your") + ".", value)


def test_notes_round_trip_through_json():
    with_replies = Note("My cat is called Tom", ("What is my cat called?", "Tell me about my cat."),
                        "Your cat is called Tom.", "Tom", ("Your cat's name is Tom.", ""))
    notes = (note("My locker code is 7302", "7302"), with_replies)
    assert notes_from_json(notes_to_json(notes)) == notes


def test_each_question_is_answered_in_the_models_words_where_it_had_them():
    n = Note("My cat is called Tom", ("What is my cat called?", "Tell me about my cat."),
             "Your cat is called Tom.", "Tom", ("Your cat's name is Tom.", ""))
    assert [n.reply(0), n.reply(1)] == ["Your cat's name is Tom.", "Your cat is called Tom."]
    assert note("My cat is called Tom", "Tom").reply(0) == "Your cat is called Tom."


def test_facts_kept_before_self_study_are_read_as_notes():
    old = '[["dog\'s name", ["What is my dog\'s name?"], "Your dog\'s name is Rex.", "Rex"]]'
    [n] = notes_from_facts_json(old)
    assert n.questions == ("What is my dog's name?",) and n.answer == "Your dog's name is Rex." and n.value == "Rex"


def test_a_restated_topic_replaces_the_old_value_and_others_stay():
    old = (note("My locker code is 7302", "7302"), note("My cat is called Tom", "Tom"))
    new = note("Actually my locker code is 4411 now", "4411")
    merged = merge_notes(old, [new], 10, same_topic(0.6))
    assert [n.value for n in merged] == ["Tom", "4411"]


def test_only_the_most_recent_notes_are_kept():
    notes = [note(f"My code number {i} is {1000 + i}", str(1000 + i)) for i in range(5)]
    assert [n.value for n in merge_notes((), notes, 3)] == ["1002", "1003", "1004"]


def test_another_owner_of_the_same_kind_is_not_a_restatement():
    sister, brother = note("My sister is called Ana", "Ana"), note("My brother is called Tom", "Tom")
    assert [n.value for n in merge_notes((sister,), [brother], 10, same_topic(0.6))] == ["Ana", "Tom"]
