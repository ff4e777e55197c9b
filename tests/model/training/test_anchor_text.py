"""The anchor-text writer: deterministic for a seed, chat replies or plain continuations."""

import pytest

from nsam.model.runtime import NsamModel
from nsam.model.training.anchor_text import TOPICS, write_anchor_text


@pytest.fixture(scope="module")
def tiny():
    return NsamModel.load("tiny")


def _write(tiny, tmp_path, name, **kw):
    out = tmp_path / name
    out.mkdir()
    path, tokens = write_anchor_text(tiny, out, tokens=6, **kw)
    assert tokens > 0
    return out


def test_same_seed_same_text_and_plain_mode_writes_its_own_file(tiny, tmp_path):
    chat = _write(tiny, tmp_path, "a", seed=3) / "anchor.txt"
    again = _write(tiny, tmp_path, "b", seed=3) / "anchor.txt"
    plain_dir = _write(tiny, tmp_path, "c", seed=3, plain=True)
    assert chat.read_text() == again.read_text()
    assert not (plain_dir / "anchor.txt").exists()
    plain = (plain_dir / "anchor_plain.txt").read_text()
    assert 0 < len(plain.splitlines()) <= len(TOPICS)
    # a title continued outside the chat template samples other text than a chat reply
    assert plain != chat.read_text()
