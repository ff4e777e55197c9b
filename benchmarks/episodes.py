"""Made-up teaching episodes for the learning benchmark (deterministic for a seed).

Each user states facts about themselves in free text during ordinary chat turns ("By the way,
my sister's name is Olvena."), chats about other things for a while, and is later asked about
those facts with paraphrased questions, and about things they never said (false binding).
Values are invented words, places and codes, so the backbone cannot know them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "pl", "r", "s", "st",
           "t", "tr", "v", "z", "th", "sh", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "m", "sk", "nd")


def made_up_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    n = rng.randint(*syllables)
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
    return word.capitalize()


def made_up_code(rng: random.Random) -> str:
    letters = "".join(rng.choice("BCDFGHJKLMNPRSTVXZ") for _ in range(2))
    return f"{letters}-{rng.randint(100, 999)}"


def made_up_number(rng: random.Random) -> str:
    return str(rng.randint(1000, 9899))


# (attribute, value kind, statements, questions). Statements are what the user writes; the
# questions are paraphrases that never repeat the statement's wording exactly.
ATTRIBUTES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("sister", "name",
     ("By the way, my sister's name is {v}.", "Oh, I should mention that my sister's name is {v}."),
     ("What's my sister called?", "Do you remember the name of my sister?", "What is my sister's name?")),
    ("brother", "name",
     ("My brother's name is {v}, he's older than me.", "Just so you know, my brother's name is {v}."),
     ("What's my brother called?", "Can you tell me my brother's name?", "Do you know what my brother is named?")),
    ("dog", "name",
     ("I have a dog. My dog's name is {v}.", "My dog's name is {v} and he loves walks."),
     ("What's my dog called?", "Do you remember my dog's name?", "What name does my dog have?")),
    ("cat", "name",
     ("My cat's name is {v}, she sleeps all day.", "By the way, my cat's name is {v}."),
     ("What's the name of my cat?", "What is my cat called?", "Remind me, what's my cat's name?")),
    ("grandmother", "name",
     ("My grandmother's name is {v}.", "I visited my grandmother yesterday. My grandmother's name is {v}."),
     ("What's my grandmother called?", "Do you know my grandmother's name?", "What is the name of my grandmother?")),
    ("home", "place",
     ("I live in {v}, a small town by the river.", "These days I live in {v}."),
     ("Which town do I live in?", "Where is my home?", "Where do I live?")),
    ("employer", "company",
     ("I work at {v} as an engineer.", "For the record, I work at {v}."),
     ("Which company do I work for?", "Where is my job?", "Who do I work for?")),
    ("locker", "number",
     ("My locker code is {v}.", "Please remember this: my locker code is {v}."),
     ("What's the code of my locker?", "Do you remember my locker code?", "What number opens my locker?")),
    ("plate", "code",
     ("My licence plate is {v}.", "The plate on my car says {v}; my licence plate is {v}."),
     ("What's my licence plate?", "What does my car's plate say?", "Do you remember my licence plate?")),
    ("boat", "name",
     ("I own a little sailing boat. My boat's name is {v}.", "My boat's name is {v}."),
     ("What's my boat called?", "What is the name of my boat?", "Do you remember what my boat is named?")),
    ("teacher", "name",
     ("My piano teacher's name is {v}.", "I take lessons; my piano teacher's name is {v}."),
     ("Who is my piano teacher?", "What's my piano teacher called?", "Do you know my piano teacher's name?")),
    ("cafe", "place",
     ("My favourite café is called {v}.", "I always go to the same café: my favourite café is called {v}."),
     ("Which café is my favourite?", "What's the name of my favourite café?", "Where do I like to get coffee?")),
)

# Things nobody in the benchmark ever states: asked to see whether taught values leak into them.
NEVER_TAUGHT = (
    "What's my neighbour's name?", "What is my nephew called?", "What's my landlord's name?",
    "Which city was my mother born in?", "What is my bank PIN?", "What's my uncle's name?",
    "What is the name of my gym?", "What's my horse called?", "What's my godfather's name?",
    "What street is my office on?",
)

FILLER = (
    "Can you suggest a quick breakfast idea?", "What's a good way to start learning to juggle?",
    "Why is the sky blue?", "Give me one tip for staying focused while studying.",
    "What should I pack for a day hike?", "How do I keep basil alive on a windowsill?",
    "Can you explain what a haiku is?", "What's a simple stretch for a stiff neck?",
    "How long should I boil an egg?", "Any advice for sleeping better?",
    "What is a fun fact about octopuses?", "How can I make my mornings less rushed?",
)


@dataclass(frozen=True)
class Fact:
    attribute: str
    value: str
    statement: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Episode:
    user: str
    facts: tuple[Fact, ...]
    untaught: tuple[str, ...]  # questions about things this user never said
    filler: tuple[str, ...]  # other chat turns of the same session
    sessions: tuple[tuple[Fact, ...], ...] = field(default=())  # for multi-session users


def _value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return made_up_number(rng)
    if kind == "code":
        return made_up_code(rng)
    return made_up_word(rng, (2, 3) if kind == "name" else (2, 2))


def _fact(rng: random.Random, attr, used: set[str]) -> Fact:
    name, kind, statements, questions = attr
    value = _value(rng, kind)
    while value.lower() in used:
        value = _value(rng, kind)
    used.add(value.lower())
    return Fact(name, value, rng.choice(statements).format(v=value), questions)


def make_episodes(users: int, facts: int, seed: int = 1234, questions_per_fact: int = 2,
                  untaught: int = 5, filler: int = 3) -> list[Episode]:
    """`users` episodes of `facts` facts each (at most len(ATTRIBUTES))."""
    if not 1 <= facts <= len(ATTRIBUTES) - 1:
        raise ValueError(f"facts must be between 1 and {len(ATTRIBUTES) - 1}")
    rng = random.Random(seed)
    used: set[str] = set()
    out = []
    for u in range(users):
        attrs = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
        taught = [_fact(rng, a, used) for a in attrs[:facts]]
        taught = [Fact(f.attribute, f.value, f.statement, tuple(rng.sample(f.questions, questions_per_fact)))
                  for f in taught]
        # Untaught: half about attributes others were taught, half about things nobody states.
        other = [rng.choice(a[3]) for a in attrs[facts:]]
        n_other = min(len(other), untaught // 2)
        asked = other[:n_other] + rng.sample(NEVER_TAUGHT, untaught - n_other)
        out.append(Episode(f"user{u:02d}", tuple(taught), tuple(asked), tuple(rng.sample(FILLER, filler))))
    return out


def make_long_user(sessions: int, facts_per_session: int, seed: int = 99) -> list[list[Fact]]:
    """One user over many sessions (forgetting): each session states new values of attributes."""
    rng = random.Random(seed)
    used: set[str] = set()
    return [[_fact(rng, a, used) for a in rng.sample(ATTRIBUTES, facts_per_session)] for _ in range(sessions)]


def matches(answer: str, value: str) -> bool:
    return value.lower() in answer.lower()
