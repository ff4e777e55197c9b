"""Self-study's grammar: clauses, the values a question would ask for, the assistant's words."""

from nsam.model.learning.study import (clauses, echo_question, faithful, focus, good_question, saying, second_person,
                                       topic_questions, values)


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
    assert second_person("My passport says I was born in Karsvik") == "Your passport says you were born in Karsvik."


def test_a_clause_is_kept_from_the_part_that_holds_its_value():
    assert focus("Also, cleaning the hutch today, Luquo my rabbit is a messy eater", "Luquo") == \
        "Luquo my rabbit is a messy eater"
    assert focus("I was born in Karsvik, a tiny village up north", "Karsvik") == \
        "I was born in Karsvik, a tiny village up north"


def test_topic_questions_ask_about_what_a_possessive_names_without_its_value():
    assert topic_questions("My piano teacher is Mrs. Sapam", "Mrs. Sapam") == [
        "What do you remember about my piano teacher?"]
    assert topic_questions("Luquo our rabbit is a messy eater", "Luquo") == ["What do you remember about our rabbit?"]
    assert topic_questions("My sister, our cat Tom", "Tom") == [
        "What do you remember about my sister?", "What do you remember about our cat?"]
    assert topic_questions("I was born in Karsvik", "Karsvik") == []


def test_the_echo_question_asks_the_value_back():
    assert echo_question("I drive a green Volvo nicknamed Pickle", "Pickle") == "I drive a green Volvo nicknamed what?"


def test_a_written_question_must_be_about_the_clause_and_keep_its_value_back():
    clause = "I drive a green Volvo nicknamed Pickle"
    assert good_question("What do I call my Volvo?", clause, "Pickle")
    assert not good_question("Is Pickle a good name?", clause, "Pickle")  # gives the value away
    assert not good_question("What is the capital of France?", clause, "Pickle")  # about something else
    assert not good_question("What do I call my Volvo", clause, "Pickle")  # not a question


def test_a_models_reply_is_kept_up_to_the_value_and_only_if_it_adds_nothing():
    assert saying("Your cat is called Shetrosho. She is shy.", "Shetrosho") == "Your cat is called Shetrosho."
    assert saying("I have no idea.", "Shetrosho") == ""
    clause, question = "my cat Shetrosho refuses to go outside", "What do you remember about my cat?"
    assert faithful("Your cat Shetrosho refuses to go outside.", clause, question)
    assert faithful("Your cat Shetrosho is a big cat with a big head.", clause, question) == ""  # made up
    assert faithful("My cat Shetrosho refuses to go outside.", clause, question) == ""  # speaks as the user
