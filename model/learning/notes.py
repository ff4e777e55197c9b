"""Notes: what a user said, as questions it answers and the answers in the assistant's words.

A note is written by self-study (`study.py`) from one clause of a user's message. The medium
level rehearses a session's notes; a user's state keeps the latest notes so every later
consolidation rehearses them again. Notes are plain text: they travel in a state's metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


ACKNOWLEDGEMENT = "Thank you for telling me."


@dataclass(frozen=True)
class Note:
    said: str  # the user's clause ("I drive a green Volvo nicknamed Pickle")
    questions: tuple[str, ...]  # questions it answers, model-written and grammatical echoes
    answer: str  # the clause in the assistant's words ("You drive a green Volvo nicknamed Pickle.")
    value: str  # the part the questions ask for ("Pickle")
    replies: tuple[str, ...] = ()  # per question, the model's own answer with the clause in view ("": none)

    def reply(self, i: int) -> str:
        """The answer to question `i`: the model's own words where they say the value, else `answer`."""
        return self.replies[i] if i < len(self.replies) and self.replies[i] else self.answer

    def told(self) -> list[dict[str, str]]:
        """The clause in a conversation: the user saying it, the assistant taking note."""
        return [{"role": "user", "content": self.said + "."}, {"role": "assistant", "content": ACKNOWLEDGEMENT}]

    @property
    def frame(self) -> str:
        """The clause without its value: what the note is about ("I drive a green Volvo nicknamed")."""
        return " ".join(self.said.replace(self.value, " ").split())


def notes_to_json(notes: tuple[Note, ...]) -> str:
    return json.dumps([[n.said, list(n.questions), n.answer, n.value, *([list(n.replies)] if n.replies else [])]
                       for n in notes])


def notes_from_json(text: str) -> tuple[Note, ...]:
    """Notes written with or without their replies (a fifth, optional element)."""
    return tuple(Note(said, tuple(questions), answer, value, tuple(rest[0]) if rest else ())
                 for said, questions, answer, value, *rest in json.loads(text))


def notes_from_facts_json(text: str) -> tuple[Note, ...]:
    """Notes from the facts a user state kept before self-study (key, questions, answer, value)."""
    return tuple(Note(answer, tuple(questions), answer, value) for _key, questions, answer, value in json.loads(text))


_WORD = re.compile(r"[^\W_]+")


def content_words(text: str) -> frozenset[str]:
    """Lower-cased words of three letters or more: what two frames share when they are about the
    same thing."""
    return frozenset(w.lower() for w in _WORD.findall(text) if len(w) >= 3)


def merge_notes(known: tuple[Note, ...], new: list[Note], limit: int,
                same_topic=None) -> tuple[Note, ...]:
    """The user's notes after a session, oldest first, the most recent `limit` kept. A new note
    replaces the known ones `same_topic(old, new)` says it restates (the latest value wins):
    "Actually, my locker code is 4411 now." replaces "My locker code is 7302."."""
    kept = list(known)
    for note in new:
        if same_topic is not None:
            kept = [old for old in kept if not same_topic(old, note)]
        kept = [old for old in kept if old.said != note.said or old.value != note.value]
        kept.append(note)
    return tuple(kept[-limit:]) if limit > 0 else ()
