"""What a user states about themselves ("my sister's name is Ola", "I live in Brisk") as facts:
question forms and the answer that states the value. Consolidation rehearses them; the user
level keeps the latest value of each (`merge_facts`) so later consolidations rehearse them again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """One thing the user said about themselves, as (question forms, answer)."""

    key: str
    questions: tuple[str, ...]
    answer: str
    value: str = ""


_VALUE = r"([^.!?\n;,:]{1,60}?)"
# A value ends at punctuation or where a clause about it starts ("I work at Acme as an engineer").
_END = r"\s*(?:[.!?\n;,:]|\s(?:and|but|as|who|which|because|since|so|now|these days)\b|$)"
_W = r"[^\W\d_]+"  # a word (letters, accents included)
_OWNED = r"\bmy ((?:" + _W + r"'s |" + _W + r" ){0,2}" + _W + r")"  # "my sister", "my piano teacher's"
_NAME_QUESTIONS = ("What is my {0}'s name?", "Do you remember my {0}'s name?", "Tell me my {0}'s name.")
PATTERNS: tuple[tuple[re.Pattern, str, tuple[str, ...], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), key, qs, a) for p, key, qs, a in (
        # "my dog is called Rex" names the dog: asked as its name ("what's my dog called?").
        (_OWNED + r" (?:is|was) (?:called|named) " + _VALUE + _END, "{0}'s name", _NAME_QUESTIONS,
         "Your {0} is called {1}."),
        # "I have a little boat called Wave": the boat's name (a "lot of friends" is not a thing owned).
        (r"\bI(?: have| have got|'ve got| got) an? (?:(?!of\b)" + _W + r" )*?(" + _W + r") (?:called|named) "
         + _VALUE + _END, "{0}'s name", _NAME_QUESTIONS, "Your {0} is called {1}."),
        (_OWNED + r" (?:is|are|was) (?!called |named )" + _VALUE + _END,
         "{0}", ("What is my {0}?", "Do you remember my {0}?", "Tell me my {0}."), "Your {0} is {1}."),
        (r"\bI live in " + _VALUE + _END, "home",
         ("Where do I live?", "Which place do I live in?", "Do you remember where I live?"), "You live in {0}."),
        (r"\bI work (?:at|for) " + _VALUE + _END, "employer",
         ("Where do I work?", "Who is my employer?", "Do you remember where I work?"), "You work at {0}."),
        (r"\bI(?:'m| am) from " + _VALUE + _END, "origin",
         ("Where am I from?", "Where do I come from?", "Do you remember where I am from?"), "You are from {0}."),
        (r"\bI was born in " + _VALUE + _END, "birthplace",
         ("Where was I born?", "In which place was I born?", "Do you remember where I was born?"),
         "You were born in {0}."),
    )
)

# Keys of the statements about where the user is (home, employer, origin, birthplace).
PLACE_KEYS = frozenset(key for _, key, _, _ in PATTERNS if "{0}" not in key)


def names_a_thing(fact: Fact) -> bool:
    """A place, or a name given with "is called" ("my boat is called Wave"), as against a
    person's name ("my sister's name is Ola")."""
    return fact.key in PLACE_KEYS or (fact.key.endswith("'s name") and " is called " in fact.answer)


# Questions about things users commonly have; the ones not taught anchor the level to the
# frozen model's answer, so taught values do not leak into untaught slots.
UNTAUGHT_PROBES = (
    "favorite color", "cousin's name", "car", "birthday", "favorite food", "dentist's name",
    "middle name", "phone number", "best friend's name", "favorite movie", "boss's name", "hobby",
)


def extract_facts(text: str) -> list[Fact]:
    """Statements such as "my sister's name is Ola" or "I live in Brisk" -> facts."""
    facts: dict[str, Fact] = {}
    for pattern, key, questions, answer in PATTERNS:
        for m in pattern.finditer(text):
            groups = [g.strip().rstrip(",") for g in m.groups()]
            if not all(groups):
                continue
            k = key.format(*groups).lower()
            asked = tuple(q.format(*groups) for q in questions)
            if k.endswith("'s name"):  # a name is also asked about its owner ("what is my sister called?")
                owner = k.removesuffix("'s name")
                asked += (f"What is my {owner} called?",)
            facts[k] = Fact(k, asked, answer.format(*groups), groups[-1])
    return list(facts.values())


def merge_facts(known: tuple[Fact, ...], new: list[Fact], limit: int) -> tuple[Fact, ...]:
    """The user's facts after a session: a restated key takes its new value; oldest first, the
    most recent `limit` kept."""
    merged = {f.key: f for f in known}
    for f in new:
        merged.pop(f.key, None)  # re-inserted last: the most recently stated
        merged[f.key] = f
    return tuple(merged.values())[-limit:] if limit > 0 else ()


def facts_to_json(facts: tuple[Fact, ...]) -> str:
    return json.dumps([[f.key, list(f.questions), f.answer, f.value] for f in facts])


def facts_from_json(text: str) -> tuple[Fact, ...]:
    return tuple(Fact(key, tuple(questions), answer, value) for key, questions, answer, value in json.loads(text))
