"""Self-study's grammar: clauses, the values a question would ask for, the assistant's words."""

from nsam.model.learning.study import clauses, echo_question, good_question, second_person, values


def test_a_message_is_cut_into_its_statements_and_questions_are_left_out():
    message = "Honestly the weather has been awful, and my cat Pepperjack refuses to go outside. Where was I born?"
    assert clauses(message) == ["Honestly the weather has been awful", "my cat Pepperjack refuses to go outside"]
    assert clauses("My landlord is called Mr. Fenwright.") == ["My landlord is called Mr. Fenwright"]
    assert clauses("Thanks!") == []


def test_values_are_codes_names_or_the_phrase_a_personal_clause_ends_on():
    assert values("My locker combination is 7302") == ["7302"]
    assert values("My wifi password is tulip-88") == ["tulip-88"]
    assert values("My landlord is called Mr. Fenwright") == ["Mr. Fenwright"]
    assert values("I was born in the village of Karsvik") == ["Karsvik"]
    assert values("My daughter plays the bassoon") == ["bassoon"]
    assert values("I am allergic to hazelnuts") == ["hazelnuts"]
    assert values("Honestly the weather has been awful") == []  # nothing personal, nothing named


def test_the_answer_is_the_clause_in_the_assistants_words():
    assert second_person("I was born in the village of Karsvik") == "You were born in the village of Karsvik."
    assert second_person("my cat Pepperjack refuses to go outside") == "Your cat Pepperjack refuses to go outside."
    assert second_person("I'm allergic to hazelnuts") == "You're allergic to hazelnuts."
    assert second_person("We moved to Brisk") == "You moved to Brisk."


def test_the_echo_question_asks_the_value_back():
    assert echo_question("I drive a green Volvo nicknamed Pickle", "Pickle") == "I drive a green Volvo nicknamed what?"


def test_a_written_question_must_be_about_the_clause_and_keep_its_value_back():
    clause = "I drive a green Volvo nicknamed Pickle"
    assert good_question("What do I call my Volvo?", clause, "Pickle")
    assert not good_question("Is Pickle a good name?", clause, "Pickle")  # gives the value away
    assert not good_question("What is the capital of France?", clause, "Pickle")  # about something else
    assert not good_question("What do I call my Volvo", clause, "Pickle")  # not a question
