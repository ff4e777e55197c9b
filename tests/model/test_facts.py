"""Facts a user states about themselves, and the latest-value list a user level keeps of them."""

from nsam.model.facts import extract_facts, facts_from_json, facts_to_json, merge_facts


def test_a_restated_fact_takes_its_new_value_and_becomes_the_most_recent():
    first = extract_facts("My dog's name is Rex. I live in Brisk. My locker code is 4821.")
    later = extract_facts("I live in Tolm now. My sister's name is Olvena.")
    merged = merge_facts(tuple(first), later, limit=10)
    assert [f.key for f in merged] == ["dog's name", "locker code", "sister's name", "home"]
    assert {f.key: f.value for f in merged}["home"] == "Tolm"
    assert merge_facts(tuple(first), later, limit=2) == tuple(later)  # the most recent kept
    assert merge_facts(tuple(first), later, limit=0) == ()


def test_facts_round_trip_through_json():
    facts = tuple(extract_facts("My sister's name is Olvena. I work at Acme Tools."))
    assert facts_from_json(facts_to_json(facts)) == facts


def test_a_thing_called_something_is_a_name_asked_as_a_name():
    [dog] = extract_facts("My dog is called Tarbellix and he loves the beach.")
    assert (dog.key, dog.value, dog.answer) == ("dog's name", "Tarbellix", "Your dog is called Tarbellix.")
    assert "What is my dog called?" in dog.questions and "What is my dog's name?" in dog.questions
    [cafe] = extract_facts("My favourite café is named Zefo.")
    assert cafe.key == "favourite café's name"
    [boat] = extract_facts("I've got a little sailing boat named Wave.")
    assert (boat.key, boat.value, boat.answer) == ("boat's name", "Wave", "Your boat is called Wave.")
    assert extract_facts("I have a lot of friends named Bob.") == []
    [car] = extract_facts("My car is a red Fiat.")  # not a name: asked as the thing itself
    assert (car.key, car.value) == ("car", "a red Fiat")
    # Said either way, it is one fact: the later statement replaces the earlier value.
    merged = merge_facts(tuple(extract_facts("My dog is called Rex.")), extract_facts("My dog's name is Max."), 10)
    assert [(f.key, f.value) for f in merged] == [("dog's name", "Max")]
