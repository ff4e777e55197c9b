"""The binding guard: taught values held to their owners while decoding."""

from dataclasses import replace

import pytest

from nsam.model.binding import BindingGuard, VocabularyIndex, bound_value
from nsam.model.facts import extract_facts
from nsam.model.sampling import SamplingParams

FACTS = extract_facts("By the way, my sister's name is Taetil. I live in Foubrae, a small town by the river. "
                      "My locker code is 1504. My licence plate is HD-904. My boat's name is New Dawn.")


def _by_key(key):
    return next(f for f in FACTS if f.key == key)


def test_a_value_is_owned_by_the_words_of_its_key_and_answer():
    assert bound_value(_by_key("sister's name")).owners == {"sister"}  # not the "s" of "sister's"
    assert bound_value(_by_key("home")).owners == {"home", "live"}
    assert bound_value(_by_key("licence plate")).owners == {"licence", "plate"}


@pytest.fixture(scope="module")
def index(real_model):
    return VocabularyIndex(real_model.tokenizer, real_model.model.embed_tokens.num_embeddings)


def _held_tokens(real_model, index, message: str, reply: str) -> list[str]:
    """Decodes `reply` token by token through a guard; the pieces it would have masked."""
    guard = BindingGuard(index, FACTS, message)
    held = []
    for t in real_model.tokenizer.encode(reply):
        piece = real_model.tokenizer.decode([t])
        if t in guard.blocked():
            held.append(piece)
        guard.push(piece)
    return held


@pytest.mark.real_model
def test_a_value_is_held_where_its_owner_is_not_named(real_model, index):
    held = _held_tokens(real_model, index, "What's my grandmother called?", "Your grandmother's name is Taetil.")
    assert "".join(held).strip().lower() in "taetil" and held  # from its second letter on
    held = _held_tokens(real_model, index, "Which city was my mother born in?", "Your mother was born in Foubrae.")
    assert held
    assert _held_tokens(real_model, index, "What is my bank PIN?", "Your bank PIN is HD-904.")


@pytest.mark.real_model
def test_a_value_is_free_where_the_message_or_the_sentence_names_its_owner(real_model, index):
    assert not _held_tokens(real_model, index, "What's my sister called?", "Taetil, of course.")
    assert not _held_tokens(real_model, index, "Where is my home?", "You live in Foubrae.")
    assert not _held_tokens(real_model, index, "Tell me about my family.", "Your sister is called Taetil.")
    # The owner named in one sentence does not free the value in the next.
    assert _held_tokens(real_model, index, "Tell me about my family.", "Your sister is nice. Taetil is her name.")


@pytest.mark.real_model
def test_a_value_asked_for_passes_another_that_starts_alike(real_model, index):
    """user06 of the benchmark: the grandmother's "Shokragaem" was held as the start of the
    brother's "Shipeibum" (stop 21)."""
    facts = extract_facts("My grandmother's name is Shokragaem. My brother's name is Shipeibum.")
    tokenizer = real_model.tokenizer

    def held(message, reply):
        guard = BindingGuard(index, facts, message)
        out = []
        for t in tokenizer.encode(reply):
            out += [t] if t in guard.blocked() else []
            guard.push(tokenizer.decode([t]))
        return out

    assert not held("What's my grandmother called?", "Your grandmother's name is Shokragaem.")
    assert not held("Tell me about my brother.", "Your brother's name is Shipeibum.")
    assert held("What's my uncle called?", "Your uncle's name is Shokragaem.")
    assert held("What is my grandmother called?", "Your grandmother's name is Shipeibum.")


@pytest.mark.real_model
def test_a_name_is_held_where_it_would_turn_into_a_near_copy(real_model, index):
    """user05 of the benchmark: the brother's "Nolamu", held on a nephew, came out "Nole"
    (" N" + "ole": the second piece goes on with the name, then off it; stop 21)."""
    facts = extract_facts("My brother's name is Nolamu.")
    tokenizer = real_model.tokenizer
    guard = BindingGuard(index, facts, "What is my nephew's name?")
    for piece in ["Your", " nephew", " is", " named", " N"]:
        guard.push(piece)
    blocked = {tokenizer.decode([t]) for t in guard.blocked()}
    assert {"ole", "ol", "olam"} & blocked and "ole" in blocked
    assert not {"ova", "ina", "ick"} & blocked  # "Nova", "Nina", "Nick": other names
    # Asked about the brother, the name is said in full.
    guard = BindingGuard(index, facts, "What is my brother's name?")
    for piece in ["Your", " brother", " is", " named", " N"]:
        guard.push(piece)
    assert not guard.blocked()


@pytest.mark.real_model
def test_ordinary_words_and_numbers_pass(real_model, index):
    # A number is held only whole; a value of several words only past its first word.
    assert not _held_tokens(real_model, index, "How long should I boil an egg?", "Boil it for 15 minutes, or 150 s.")
    assert not _held_tokens(real_model, index, "Any news?", "New ideas come every day.")
    assert not _held_tokens(real_model, index, "Any news?", "Vistaetil is a made-up word.")  # inside a word
    # A value's start that is a word of its own is said freely ("is" for Isabel).
    isabel = extract_facts("My sister's name is Isabel.")
    guard = BindingGuard(index, isabel, "What is my grandmother's name?")
    said = []
    for t in real_model.tokenizer.encode("Your grandmother is called Isabel."):
        said.append((real_model.tokenizer.decode([t]), t in guard.blocked()))
        guard.push(said[-1][0])
    assert not any(held for piece, held in said if piece.strip().lower() == "is") and any(h for _, h in said)
    assert _held_tokens(real_model, index, "Any news?", "The New Dawn is back.")


def _finishing(real_model, index, facts, message: str, reply: str) -> set[str] | None:
    """The pieces a guard leaves after `reply`, or None where it leaves all."""
    guard = BindingGuard(index, facts, message)
    guard.push(reply)
    left = guard.finishing()
    return None if left is None else {real_model.tokenizer.decode([t]) for t in left}


@pytest.mark.real_model
def test_a_value_started_next_to_its_owner_is_said_whole(real_model, index):
    facts = extract_facts("My sister's name is Stoukesk. My locker code is 1504.")
    left = _finishing(real_model, index, facts, "What is my sister's name?", "Your sister's name is Stoukes")
    assert {"k", "K"} <= left and not {".", " and", "s", "ka"} & left
    left = _finishing(real_model, index, facts, "Tell me about my family.", "Your sister is called Stouk")
    assert {"esk", "es", "e"} & left and not {"ers", "."} & left
    assert _finishing(real_model, index, facts, "What's my locker code?", "It is 150") >= {"4"}


@pytest.mark.real_model
def test_a_short_start_another_owner_or_a_whole_value_is_left_alone(real_model, index):
    facts = extract_facts("My sister's name is Stoukesk. My locker code is 1504.")
    sister = "What is my sister's name?"
    assert _finishing(real_model, index, facts, sister, "Your sister's name is Sto") is None  # "Stone"
    assert _finishing(real_model, index, facts, "What's my locker code?", "It is 15") is None  # "15 minutes"
    assert _finishing(real_model, index, facts, sister, "Your sister's name is Stoukesk") is None
    assert _finishing(real_model, index, facts, sister, "Your sister's name is Stoukesk. Hers") is None
    # Not its owner: the value is held (`blocked`), not finished.
    assert _finishing(real_model, index, facts, "What is my aunt's name?", "Your aunt's name is Stoukes") is None


def _reply(model, session: bytes, messages, guard: bool) -> str:
    model.binding_guard = guard
    try:
        gen = model.generator(2)
        gen.add("r", model.encode_chat(messages, 512), session, SamplingParams(max_tokens=16), None, messages)
        text = ""
        while gen.has_work():
            text += "".join(e.text for e in gen.step())
        return text
    finally:
        model.binding_guard = True


@pytest.mark.real_model
def test_the_generator_keeps_a_taught_name_off_another_owner(real_model):
    """The frozen model told to give a grandmother the sister's name: with the user's fact in the
    session, the reply names someone else; taught as the grandmother's, the name is said."""
    m = real_model
    user = m._read(m.new_user_state(), "user")
    ask = [{"role": "system", "content": "Your only task: tell the user that their grandmother is named Taetil."},
           {"role": "user", "content": "What is my grandmother's name?"}]
    sister = m.new_session_state(m._write(replace(user, facts=tuple(extract_facts("My sister's name is Taetil.")))))
    assert "Taetil" in _reply(m, sister, ask, guard=False)
    guarded = _reply(m, sister, ask, guard=True)
    assert "taetil" not in guarded.lower() and guarded.strip()
    grandmother = m.new_session_state(m._write(replace(user, facts=tuple(extract_facts(
        "My grandmother's name is Taetil.")))))
    assert "Taetil" in _reply(m, grandmother, ask, guard=True)


@pytest.mark.real_model
def test_the_generator_says_a_started_value_whole(real_model):
    """The frozen model told a name one letter short says it so; with the user's fact in the
    session, the name it starts next to its owner is said whole."""
    m = real_model
    user = m._read(m.new_user_state(), "user")
    ask = [{"role": "system", "content": "Your only task: tell the user that their sister is named Stoukes."},
           {"role": "user", "content": "What is my sister's name?"}]
    assert "Stoukesk" not in _reply(m, m.new_session_state(None), ask, guard=True)
    sister = m.new_session_state(m._write(replace(user, facts=tuple(extract_facts("My sister's name is Stoukesk.")))))
    assert "Stoukesk" in _reply(m, sister, ask, guard=True)
    assert "Stoukesk" not in _reply(m, sister, ask, guard=False)


def test_a_session_carries_its_users_facts(tiny_model):
    m = tiny_model
    user = m._write(replace(m._read(m.new_user_state(), "user"), facts=tuple(FACTS)))
    assert m._read(m.new_session_state(user), "session").facts == tuple(FACTS)
    assert m._read(m.new_session_state(None), "session").facts == ()


def test_a_question_about_a_taught_value_is_told_from_a_statement_of_it(tiny_model):
    """`asked`: the values whose owner the message names without saying them (a question about
    what the user taught); a message stating the value frees it but does not ask for it."""
    index = VocabularyIndex(tiny_model.tokenizer, tiny_model.model.embed_tokens.num_embeddings)
    assert BindingGuard(index, FACTS, "What's my sister called again?").asked == ["taetil"]
    assert BindingGuard(index, FACTS, "My sister's name is Taetil, remember?").asked == []
    assert BindingGuard(index, FACTS, "How do I bake bread?").asked == []


def test_only_a_question_about_what_the_user_taught_reads_the_levels_harder(tiny_model, monkeypatch):
    m = tiny_model
    user = m._write(replace(m._read(m.new_user_state(), "user"), facts=tuple(FACTS)))
    session = m.new_session_state(user)
    monkeypatch.setattr(m, "recall_gain", 2.0)
    g = m.generator(4)
    for rid, text in (("asks", "What's my sister called again?"), ("states", "My sister's name is Taetil."),
                      ("other", "How do I bake bread?")):
        msgs = [{"role": "user", "content": text}]
        g.add(rid, m.encode_chat(msgs, 200), session, SamplingParams(max_tokens=4), None, msgs)
    assert [r.lora_gain for r in g.inner.waiting] == [2.0, 1.0, 1.0]
