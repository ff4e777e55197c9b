"""`nsam anchor-text`: deterministic for a seed, chat replies or plain continuations."""

from nsam.server.anchor_text import TOPICS, main


def _write(tmp_path, name, *flags):
    out = tmp_path / name
    out.mkdir()
    assert main(["--model", "tiny", "--tokens", "6", "--out", str(out), *flags]) == 0
    return out


def test_same_seed_same_text_and_plain_mode_writes_its_own_file(tmp_path):
    chat = _write(tmp_path, "a", "--seed", "3") / "anchor.txt"
    again = _write(tmp_path, "b", "--seed", "3") / "anchor.txt"
    plain_dir = _write(tmp_path, "c", "--seed", "3", "--plain")
    assert chat.read_text() == again.read_text()
    assert not (plain_dir / "anchor.txt").exists()
    plain = (plain_dir / "anchor_plain.txt").read_text()
    assert 0 < len(plain.splitlines()) <= len(TOPICS)
    # a title continued outside the chat template samples other text than a chat reply
    assert plain != chat.read_text()
