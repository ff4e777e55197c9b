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
