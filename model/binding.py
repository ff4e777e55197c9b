"""The binding guard: a value the user taught is said only next to what it belongs to.

The levels learn "Your sister's name is Taetil" and, in part, "a name asked for -> Taetil": asked
about a grandmother never named, a level may answer "Your grandmother's name is Taetil" (false
binding; stop 20: 14% of the never-taught questions after a consolidation). The facts the levels
were taught are known (extracted from what the user wrote), so decoding can hold each value to
its owner: while neither the user's message nor the reply's current sentence names the owner
("sister"; "live" or "home" for where the user lives), the tokens that would spell the value are
masked and the model says what it would say otherwise. The levels' answers are unchanged
wherever they name the owner, so recall loses only what a reply says without naming it.

The other side of the same knowledge: a value the reply is saying next to its owner is said whole.
A level that answers "Your sister's name is Stoukes." for Stoukesk (stop 23) has given the
answer but for its last letter; once a word has said enough of a free value (`FINISH_AT`), only
the tokens that go on with the value are left until it is said.

And a message that names a taught value's owner without saying the value asks for it (`asked`):
the generator reads the levels harder for that reply (`runtime.RECALL_GAIN`).
"""

from __future__ import annotations

import math
import re
import unicodedata
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .facts import Fact

_WORD = re.compile(r"[^\W\d_]+")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
# Words of an answer or key that do not tell one owner from another.
_GENERIC = frozenset("""
a an the my your you i is are was were be in at on of to for from and or with as called named name
favourite favorite best little old new this that these those
""".split())


def _fold(text: str) -> str:
    """Lower case without accents: "Café" and "cafe" name the same owner."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(_fold(text)) if len(w) > 1}  # not the "s" of "sister's"


@dataclass(frozen=True)
class BoundValue:
    value: str  # folded
    owners: frozenset[str]  # words that name what the value belongs to
    hold_at: int  # characters of the value said before it is held back


def bound_value(fact: Fact) -> BoundValue | None:
    """The fact's value and the words naming its owner: those of its key and of its answer,
    the value and generic words left out ("sister's name" -> sister; "home", "You live in
    Brisk." -> home, live)."""
    value = _fold(fact.value).strip()
    if not value:
        return None
    owners = frozenset((_words(fact.key) | _words(fact.answer.replace(fact.value, " "))) - _GENERIC - _words(value))
    if not owners:
        return None
    first = value.split()[0]
    if first != value:
        hold_at = len(first) + 2  # past its first word ("New" is a word of its own)
    elif value.isdigit():
        hold_at = len(value)  # "15 minutes" is not a locker code "1504"
    elif value.isalpha():
        hold_at = 2  # from a name's second letter: "Taettil" would be "Taetil" all the same
    else:
        hold_at = 3  # a code's
    hold_at = min(hold_at, len(value))
    return BoundValue(value, owners, hold_at)


def _core(piece: str) -> str:
    """A token's text without the spaces and quotes that lead into a word."""
    return piece.lstrip(" \"'*(“‘`")


class VocabularyIndex:
    """Token ids by the folded text they add, for finding the tokens that continue a value
    without decoding the vocabulary at every step. Built once per tokenizer."""

    def __init__(self, tokenizer, size: int):
        self.text: list[str] = []
        self.by_core: dict[str, list[int]] = defaultdict(list)  # letters/digits a token adds -> ids
        for t in range(size):
            piece = _fold(tokenizer.decode([t]))
            self.text.append(piece)
            core = _core(piece)
            if core:
                self.by_core[core].append(t)
                alnum = re.match(r"[\w-]+", core)
                if alnum and alnum.end() < len(core):  # "il." ends a value: indexed by "il" too
                    self.by_core[core[:alnum.end()]].append(t)
        self.cores = sorted(self.by_core)

    def starting_with(self, prefix: str) -> frozenset[int]:
        """Tokens whose text (after leading spaces and quotes) starts with `prefix`."""
        found: set[int] = set()
        i = bisect_left(self.cores, prefix)  # walk the sorted cores from there: no copy of the list
        while i < len(self.cores) and self.cores[i].startswith(prefix):
            found.update(self.by_core[self.cores[i]])
            i += 1
        return frozenset(found)

    def continuing(self, rest: str) -> frozenset[int]:
        """Tokens that say `rest` (the unsaid end of a value, read on from the middle of a word)
        or a start of it, with no other letters in the same word."""
        found: set[int] = set()
        for j in range(1, len(rest) + 1):  # a piece of the rest
            found.update(t for t in self.by_core.get(_core(rest[:j]), ()) if self.text[t] == rest[:j])
        for t in self.starting_with(_core(rest)):  # all of it, and the word ends there
            piece = self.text[t]
            if piece.startswith(rest) and not piece[len(rest):len(rest) + 1].isalnum():
                found.add(t)
        return frozenset(found)

    def candidates(self, value: str) -> frozenset[int]:
        """Tokens whose text is part of `value` (possibly ending it and going on past it)."""
        found: set[int] = set()
        for i in range(len(value)):
            for j in range(i + 1, len(value) + 1):
                found.update(self.by_core.get(value[i:j], ()))
        return frozenset(found)


class BindingGuard:
    """One reply's guard: `push` the reply's text as it is decoded, `blocked` gives the token ids
    to mask before the next token is picked."""

    def __init__(self, index: VocabularyIndex, facts: Iterable[Fact], message: str):
        self.index = index
        said = _fold(message)
        asked = _words(message)
        self.held: list[tuple[BoundValue, frozenset[int], dict[tuple[int | None, int], list[int]]]] = []
        self.free: list[str] = []  # values the user's message frees for the whole reply
        self.asked: list[str] = []  # of them, those whose owner it names without saying them
        for fact in facts:
            bound = bound_value(fact)
            if bound is None:
                continue
            if bound.owners & asked or bound.value in said:  # its owner or the value itself named
                self.free.append(bound.value)
                if bound.value not in said:
                    self.asked.append(bound.value)
            elif all(bound.value != b.value for b, _, _ in self.held):
                self.held.append((bound, index.candidates(bound.value), {}))
        self.sentence = ""  # folded text of the reply's current sentence
        self.named: list[BoundValue] = []  # held values whose owner the sentence names: free in it
        self._finishes: dict[str, frozenset[int]] = {}  # unsaid end of a value -> tokens saying it

    def __bool__(self) -> bool:  # values to hold or to finish
        return bool(self.held or self.free)

    def push(self, text: str) -> None:
        sentence = self.sentence + _fold(text)
        ends = list(_SENTENCE_END.finditer(sentence))
        self.sentence = sentence[ends[-1].end():] if ends else sentence
        owners_named = _words(self.sentence)
        self.named = [b for b, _, _ in self.held if b.owners & owners_named]

    def free_here(self) -> list[str]:
        """The values this sentence may say: freed by the message, or their owner named in it."""
        return self.free + [b.value for b in self.named]

    def blocked(self) -> list[int]:
        free = self.free_here()
        out: list[int] = []
        for bound, candidates, masks in self.held:
            if bound in self.named:
                continue
            # A free value that starts like this one ("Shokragaem" asked for, "Shipeibum" held)
            # is said past their common start before this one is held.
            hold_at = max([bound.hold_at] + [1 + _common_start(bound.value, f) for f in free])
            if hold_at > len(bound.value):
                continue  # all of it starts a free value: nothing tells them apart
            # What a next token can add to the value depends only on how much of it the sentence
            # ends with: the masks are worked out once per value, progress and hold.
            key = (_progress(self.sentence, bound.value), hold_at)
            if key not in masks:
                k = key[0]
                # Inside another word: a run of letters longer than the value stands for it.
                context = "q" * (len(bound.value) + 2) if k is None else " " + bound.value[:k]
                pool = candidates
                if k and bound.value.isalpha():  # pieces that go on with the name, then off it
                    pool = pool | self.index.starting_with(bound.value[k:max(NEAR_COPY, hold_at, k + 1)])
                masks[key] = [t for t in pool if _would_say(context, self.index.text[t], bound.value, hold_at)]
            out.extend(masks[key])
        return out

    def finishing(self) -> frozenset[int] | None:
        """The tokens left for the next step where the sentence's last word is saying a value
        (`being_said`); None where none is. Applied after `blocked`."""
        allowed: set[int] = set()
        for value, said in self.being_said():
            rest = value[said:]
            if rest not in self._finishes:
                self._finishes[rest] = self.index.continuing(rest)
            allowed |= self._finishes[rest]
        return frozenset(allowed) or None

    def being_said(self) -> list[tuple[str, int]]:
        """(value, characters said) of each value free here (its owner named) of which the
        sentence's last word has said `FINISH_AT` and not all."""
        out = []
        for value in self.free_here():
            k = _progress(self.sentence, value)
            if k and k >= max(math.ceil(len(value) * FINISH_AT), min(FINISH_MIN, len(value) - 1)):
                out.append((value, k))
        return out


# A word that has said this share of a value free in its sentence, and `FINISH_MIN` characters of
# it (or all but one), is finished as the value: "Stoukes" is Stoukesk cut short, where "St" or
# "15" (for 1504) may be another word.
FINISH_AT = 0.5
FINISH_MIN = 4


def _progress(sentence: str, value: str) -> int | None:
    """How many of the value's first characters the sentence ends with, counted from a word's
    start: 0 at a word boundary, None inside another word."""
    for k in range(min(len(value) - 1, len(sentence)), 0, -1):
        if sentence.endswith(value[:k]) and (len(sentence) == k or not sentence[-k - 1].isalnum()):
            return k
    return 0 if not sentence or not sentence[-1].isalnum() else None


def _common_start(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# A name's first letters that make a near copy ("Nole" for Nolamu): a word that has said this
# many of them is held even where it goes on with other letters.
NEAR_COPY = 3


def _would_say(sentence: str, piece: str, value: str, hold_at: int) -> bool:
    """Whether `piece` after `sentence` would say `hold_at` or more characters of `value` from
    the start of a word, the piece's own among them; for a name, also a piece that brings a
    started word to `NEAR_COPY` of its first letters and goes on with others."""
    before = sentence[-(len(value) + 1):]
    text = before + piece
    first = 0 if len(before) == len(sentence) else 1  # text[0] may be the middle of a word
    for start in range(first, len(text)):
        if start and text[start - 1].isalnum():
            continue  # a value starts a word
        tail = text[start:]
        said = _common_start(tail, value)
        whole = said == len(tail) or said == len(value)  # the tail is the value's start, or has all of it
        # The piece that starts a word is a word of its own unless it is all of the value (" is"
        # for "Isabel", " the" for "Theodore"): the piece that would go on with the value is held.
        starts_word = start >= len(before)
        near = not starts_word and value.isalpha() and said >= max(NEAR_COPY, hold_at)
        if (whole or near) and said >= (len(value) if starts_word else hold_at) and start + said > len(before):
            return True
    return False
