"""Self-study: turn what a user said into notes the levels are rehearsed on.

A user's message is cut into clauses; in each, the parts a later question would ask for (names,
numbers and codes, the phrase a clause ends on) are its values. For every value the serving
model writes questions in the user's words from a few worked examples (sampled, then filtered:
a question must be about the clause and must not give its value away), and a grammatical echo
question ("I drive a green Volvo nicknamed what?") is added. The answer is the clause in the
assistant's words. Nothing here knows kinds of facts: the same steps apply to any statement.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from ..backbone import Transformer
from ..generation import Generator
from ..sampling import SamplingParams
from .notes import Note, content_words

# Worked examples for the question writer: (what the user said, the value, a question about it).
WRITER_EXAMPLES = (
    ("My sister Ana teaches maths in Porto.", "maths", "What subject does my sister teach?"),
    ("We adopted a grey rabbit last spring and called him Biscuit.", "Biscuit", "What did we name our rabbit?"),
    ("The spare key hangs behind the blue door.", "behind the blue door", "Where is the spare key kept?"),
)
WRITER_SYSTEM = ("You write the question a user could ask you later to check that you remember what they told "
                 "you. The question must not contain the answer. Reply with the question only.")

_ABBREVIATION = r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bJr)(?<!\bSr)"
_SENTENCE_END = re.compile(_ABBREVIATION + r"[.!?]+(?=\s|$)|\n+")
_CLAUSE_BREAK = re.compile(r";\s*|,\s*(?=(?:and|but|so|while|although)\b)|\s+(?=(?:and|but)\s+(?:I|my|we|our)\b)")
FIRST_PERSON = re.compile(r"\b(?:I|me|my|mine|myself|we|us|our|ours|I'm|I've|I'd|I'll)\b", re.IGNORECASE)
_CODE = re.compile(r"\b[\w-]*\d[\w:/.-]*\w|\b\d\b")
_TITLE = r"(?:Mr|Mrs|Ms|Dr|St)\.?\s+"
_NAME = re.compile(r"(?<!^)(?<![.!?]\s)\b(?:" + _TITLE + r")?[A-Z][\w'-]*(?:\s+(?:" + _TITLE + r")?[A-Z][\w'-]*)*")
# English function words: a clause's last phrase starts after the last of these.
_FUNCTION = frozenset(
    "a an the to at in on of for with by from into onto called named is are was were be been am my your our "
    "his her their its this that these those as than and or but it i we he she they me us him them".split())
_SECOND_PERSON = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "we": "you",
                  "us": "you", "our": "your", "ours": "yours", "i'm": "you're", "i've": "you've",
                  "i'd": "you'd", "i'll": "you'll", "we're": "you're", "we've": "you've"}
_PERSON_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def clauses(message: str) -> list[str]:
    """The statements in a message, questions left out ("Where was I born?" states nothing)."""
    out = []
    for sentence, end in _sentences(message):
        if "?" in end:
            continue
        for part in _CLAUSE_BREAK.split(sentence):
            part = re.sub(r"^(?:and|but|so|while|although)\s+", "", part.strip(" ,"), flags=re.IGNORECASE)
            if len(part.split()) >= 3:
                out.append(part)
    return out


def _sentences(message: str) -> list[tuple[str, str]]:
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(message):
        pieces.append((message[start:m.start()].strip(), m.group()))
        start = m.end()
    if message[start:].strip():
        pieces.append((message[start:].strip(), ""))
    return [(s, e) for s, e in pieces if s]


def values(clause: str, limit: int = 2) -> list[str]:
    """What a question about `clause` would ask for, most specific first: codes and numbers,
    names (capitalised words past the first), else the phrase the clause ends on."""
    found: list[str] = []

    def add(span: str) -> None:
        span = span.strip(" ,.'\"")
        if span and span.lower() not in _FUNCTION and not any(span in f or f in span for f in found):
            found.append(span)

    for m in _CODE.finditer(clause):
        add(m.group())
    for m in _NAME.finditer(clause):
        if m.group() not in ("I", "I'm", "I've", "I'd", "I'll"):
            add(m.group())
    if not found and FIRST_PERSON.search(clause):
        words = clause.rstrip(" .!").split()
        tail: list[str] = []
        for w in reversed(words):
            if w.lower().strip(",") in _FUNCTION:
                break
            tail.insert(0, w)
        if tail and len(tail) < len(words):
            add(" ".join(tail[-4:]))
    return found[:limit]


def second_person(clause: str) -> str:
    """The clause as the assistant says it back: "I was born in Karsvik" -> "You were born in Karsvik"."""
    out, last = [], 0
    prev = ""
    for m in _PERSON_WORD.finditer(clause):
        word = m.group()
        low = word.lower()
        new = _SECOND_PERSON.get(low)
        if new is None and low in ("am", "was") and prev in ("i", "we"):
            new = "are" if low == "am" else "were"
        out.append(clause[last:m.start()])
        out.append(_match_case(word, new) if new else word)
        last = m.end()
        prev = low
    out.append(clause[last:])
    text = "".join(out).strip()
    text = text[0].upper() + text[1:] if text else text
    return text if text.endswith((".", "!")) else text + "."


def _match_case(original: str, new: str) -> str:
    pronoun_i = original.lower().split("'")[0] == "i"  # "I" is upper-case anywhere in a sentence
    return new.capitalize() if original[0].isupper() and not pronoun_i else new


def focus(clause: str, value: str) -> str:
    """The clause from the comma-separated part that holds the value: leading asides ("Also,",
    "tired,") are not what a later question asks about."""
    parts = clause.split(", ")
    for i, part in enumerate(parts):
        if value in part:
            kept = ", ".join(parts[i:])
            return kept if len(kept.split()) >= 3 else clause
    return clause


_TOPIC = re.compile(r"\b(?:my|our)\s+((?:[\w'-]+\s+){0,2}[\w'-]+)", re.IGNORECASE)


def topic_questions(clause: str, value: str) -> list[str]:
    """Questions about what the clause's possessives name ("my piano teacher"), in a frame that asks
    for a memory: the level learns the topic, not one wording, as what brings the value back.
    The frame is not an everyday request ("Tell me about ..."): those must not be answered with a
    value. Without a parser, a verb right after the noun can end up in the topic ("my passport says")."""
    out = []
    for m in _TOPIC.finditer(clause):
        words = []
        for w in m.group(1).split():
            if w.lower() in _FUNCTION or value in w or w in value:
                break
            words.append(w)
        if words:
            topic = f"{m.group(0).split()[0].lower()} {' '.join(words)}"
            out.append(f"What do you remember about {topic}?")
    return out[:2]


def echo_question(clause: str, value: str) -> str:
    """The clause asked back with its value as "what": "I drive a Volvo nicknamed what?"."""
    asked = clause.replace(value, "what", 1).rstrip(" .!")
    return asked[0].upper() + asked[1:] + "?"


def writer_prompt(tokenizer, clause: str, value: str) -> list[int]:
    messages = [{"role": "system", "content": WRITER_SYSTEM}]
    for said, answer, question in WRITER_EXAMPLES:
        messages += [{"role": "user", "content": f'I said: "{said}" The answer is "{answer}".'},
                     {"role": "assistant", "content": question}]
    messages.append({"role": "user", "content": f'I said: "{clause}" The answer is "{value}".'})
    return tokenizer.encode_chat(messages)


def good_question(question: str, clause: str, value: str) -> bool:
    """A written question is kept if it is one short question, about the clause (shares a word
    with it besides the value) and does not give the value away."""
    words = question.split()
    if not question.endswith("?") or not 3 <= len(words) <= 20 or "\n" in question:
        return False
    if value.lower() in question.lower():
        return False
    about = content_words(clause) - content_words(value)
    return bool(about & content_words(question))


def generate(model: Transformer, tokenizer, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
             max_batch: int = 16) -> list[list[int]]:
    """Token ids each prompt continues with (no levels: the frozen model), batched."""
    if not prompts:
        return []
    longest = max(len(p) + q.max_tokens for p, q in zip(prompts, params))
    # A generator owns the model's KV buffers; the caller's (a serving generator on the same
    # model) are put back afterwards.
    saved = [block.self_attn.cache for block in model.layers], model.max_batch, getattr(model, "max_seq", 0)
    try:
        generator = Generator(model, tokenizer, None, None, min(max_batch, len(prompts)), longest + 1, learning=False)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            generator.add(str(i), prompt, None, p)
        while generator.has_work():
            generator.step()
        return [generator.pop_finished(str(i))[0] for i in range(len(prompts))]
    finally:
        for block, cache in zip(model.layers, saved[0]):
            block.self_attn.cache = cache
        model.max_batch, model.max_seq = saved[1], saved[2]


MAX_CLAUSES = 4  # statements of one message studied (the rest of a long message is not)


def study(model: Transformer, tokenizer, message: str, samples: int = 2, seed: int = 0,
          max_clauses: int = MAX_CLAUSES) -> list[Note]:
    """Notes for what `message` says: per clause and value, the echo question and up to
    `samples` model-written questions that pass `good_question`."""
    targets = [(c, v) for c in clauses(message)[:max_clauses] for v in values(c)]
    if not targets:
        return []
    stop = tuple(tokenizer.eos_token_ids)
    prompts, params = [], []
    for i, (clause, value) in enumerate(targets):
        prompt = writer_prompt(tokenizer, clause, value)
        for k in range(samples):
            prompts.append(prompt)
            params.append(SamplingParams(max_tokens=24, temperature=0.0 if k == 0 else 0.8, top_p=0.95,
                                         seed=seed + 1000 * i + k, stop_token_ids=stop))
    written = generate(model, tokenizer, prompts, params)
    notes = []
    for i, (clause, value) in enumerate(targets):
        said = focus(clause, value)
        questions = [echo_question(said, value), *topic_questions(said, value)]
        for ids in written[i * samples:(i + 1) * samples]:
            q = tokenizer.decode(ids).strip().split("\n")[0].strip()
            if good_question(q, said, value) and q not in questions:
                questions.append(q)
        notes.append(Note(said, tuple(questions), second_person(said), value))
    return with_replies(model, tokenizer, notes)


def with_replies(model: Transformer, tokenizer, notes: list[Note], tokens: int = 32) -> list[Note]:
    """Each question answered by the model with the clause in view (greedy): where its answer says
    the value, those are the words the level learns for that question, so it learns to answer
    as the model itself would with the user's words in context."""
    asked = [(n, q) for n in notes for q in n.questions]
    stop = tuple(tokenizer.eos_token_ids)
    prompts = [tokenizer.encode_chat([*n.told(), {"role": "user", "content": q}]) for n, q in asked]
    answers = iter(generate(model, tokenizer, prompts, [SamplingParams(max_tokens=tokens, stop_token_ids=stop)] * len(prompts)))
    return [replace(n, replies=tuple(faithful(saying(tokenizer.decode(next(answers)), n.value), n.said, q)
                                     for q in n.questions)) for n in notes]


def saying(reply: str, value: str) -> str:
    """The reply up to the end of the sentence that says `value`; "" if it never does."""
    for sentence, end in _sentences(reply.strip()):
        if value.lower() in sentence.lower():
            upto = reply[:reply.index(sentence) + len(sentence)].strip()
            return upto + (end.strip() or ".") if len(upto.split()) <= 40 else ""
    return ""


def faithful(reply: str, clause: str, question: str) -> str:
    """`reply` if it adds nothing to what the user said and asked and speaks to the user, not as
    the user ("my cat" in the assistant's mouth is a confusion); "" otherwise."""
    said = content_words(clause) | content_words(question)
    added = {w for w in content_words(reply) - said if w not in _SECOND_PERSON.values()}
    return reply if reply and not added and not FIRST_PERSON.search(reply) else ""
