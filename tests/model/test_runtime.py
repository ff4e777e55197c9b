"""`NsamModel.read_document_chunk`: a document goes into a session's levels chunk by chunk, each
chunk scored with what the chunks before left, each update guarded. And the medium update the
server's learner runs after turns: over several turns at once, merged onto a later state."""

import dataclasses
import math
from dataclasses import replace

import pytest
import torch

from nsam.model.levels import LevelsConfig
from nsam.model.runtime import DOCUMENT_CHUNK_TOKENS, NsamModel
from nsam.model.state import MemoryState

TEXT = " ".join(f"Entry {i}: the tide at Vellmoor rose to {3 + i % 5} metres before noon." for i in range(12))


@pytest.fixture(scope="module")
def tiny():
    return NsamModel.load("tiny")


def _levels(model, data: bytes):
    return MemoryState.from_bytes(data, model.fingerprint, model.levels, "session").levels


def test_a_document_is_cut_into_chunks_of_its_tokens(tiny):
    chunks = tiny.document_chunks(TEXT)
    assert [len(c) for c in chunks[:-1]] == [DOCUMENT_CHUNK_TOKENS] * (len(chunks) - 1)
    assert sum(chunks, []) == tiny.tokenizer.encode(TEXT) and len(chunks) >= 3


def test_a_chunk_is_scored_then_written_and_learnt(tiny):
    first, second = tiny.document_chunks(TEXT)[:2]
    fresh = tiny.new_session_state(None)
    after, read = tiny.read_document_chunk(fresh, first)
    assert read.tokens == len(first) - 1 and math.isfinite(read.loss)
    assert [(r.level, r.accepted) for r in read.reports] == [("fast", True), ("medium", True)]
    old, new = _levels(tiny, fresh), _levels(tiny, after)
    assert not torch.equal(old["fast"].memory, new["fast"].memory)  # the fast level wrote it
    assert not torch.equal(old["medium"].b, new["medium"].b)  # the medium level learnt from it
    assert int(new["fast"].taken) == len(first)
    assert torch.equal(old["user"].b, new["user"].b)  # the user level is only ever consolidated
    # The next chunk is scored with what the first left: not as a fresh session scores it.
    _, carried = tiny.read_document_chunk(after, second)
    _, alone = tiny.read_document_chunk(fresh, second)
    assert carried.loss != alone.loss


def test_a_one_token_chunk_is_written_and_predicts_nothing(tiny):
    fresh = tiny.new_session_state(None)
    after, read = tiny.read_document_chunk(fresh, tiny.tokenizer.encode("x"))
    assert read.tokens == 0 and read.loss == 0.0  # weighs nothing in a document's perplexity
    assert int(_levels(tiny, after)["fast"].taken) == 1


def _unchanged(model, old: bytes, new: bytes, name: str) -> bool:
    a, b = _levels(model, old)[name], _levels(model, new)[name]
    return all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))


def test_a_rejected_update_leaves_its_level_as_it_was():
    model = NsamModel.load("tiny")
    with torch.no_grad():
        model.fast_params.w_v.fill_(float("nan"))  # every fast write is non-finite
    model.levels = LevelsConfig(tuple(replace(s, max_update_norm=1e-9) if s.name == "medium" else s
                                      for s in model.levels.levels))  # every medium update is too large
    fresh = model.new_session_state(None)
    after, read = model.read_document_chunk(fresh, model.document_chunks(TEXT)[0])
    assert [(r.level, r.reason) for r in read.reports] == [("fast", "non-finite"), ("medium", "norm-bound")]
    assert _unchanged(model, fresh, after, "fast") and _unchanged(model, fresh, after, "medium")


def _chat(*said: str) -> list[dict[str, str]]:
    return [m for text in said for m in ({"role": "user", "content": text}, {"role": "assistant", "content": "ok"})]


def _notes(model, data: bytes) -> list[str]:
    return [n.value for n in MemoryState.from_bytes(data, model.fingerprint, model.levels, "session").notes]


def test_a_coalesced_update_studies_every_turn_it_covers(tiny):
    said = ["My cat is Tom.", "My dog is Rex.", "ok thanks", "My fish is Bob.", "My bird is Kiwi.",
            "My boat is Zephyr.", "My town is Brisk."]
    messages = _chat(*said)
    fresh = tiny.new_session_state(None)
    assert _notes(tiny, tiny.update_medium(fresh, messages)[0]) == ["Brisk"]
    assert _notes(tiny, tiny.update_medium(fresh, messages, 2)[0]) == ["Zephyr", "Brisk"]
    # six statements, more than one study notes: two texts of statements, one of the plain message
    state, reports = tiny.update_medium(fresh, messages, len(said))
    assert _notes(tiny, state) == ["Tom", "Rex", "Bob", "Kiwi", "Zephyr", "Brisk"]
    assert len(reports) == 3
    with pytest.raises(ValueError, match="turns"):
        tiny.update_medium(fresh, messages, 0)


def test_merge_medium_takes_the_update_and_keeps_the_later_fast_level(tiny):
    before = tiny.new_session_state(None)
    updated, _ = tiny.update_medium(before, _chat("my cat is Tom"))
    later, _ = tiny.read_document_chunk(before, tiny.document_chunks(TEXT)[0])  # the fast level moved on
    merged = tiny.merge_medium(later, updated)
    assert _unchanged(tiny, updated, merged, "medium") and _notes(tiny, merged) == ["Tom"]
    assert _unchanged(tiny, later, merged, "fast") and _unchanged(tiny, later, merged, "user")
    assert not _unchanged(tiny, before, merged, "fast")
    assert tiny.merge_medium(merged, updated) == merged  # merging again changes nothing
