"""Chat replies after a document was read into the session (ReadDocument's model path), next to
the same questions in a fresh session: does reading prose into the levels change chat?
usage: python chat_after_document.py [TOKENS]   (default 2,048 tokens of each of 2 books)"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import learning  # noqa: E402
from nsam.model.runtime import NsamModel  # noqa: E402

torch.set_num_threads(1)
tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
m = NsamModel.load("default")
questions = ["Can you suggest a quick breakfast idea?", "Why is the sky blue?",
             "What should I pack for a day hike?", "What is the capital of France?"]
books = sorted(learning.DEFAULT_DOCS.glob("*.txt"))[:2]
chat = learning.Chat(m, 8, max_tokens=40)
fresh = m.new_session_state(None)
states = {"fresh": fresh}
for book in books:
    state = fresh
    ids = m.tokenizer.encode(book.read_text(encoding="utf-8"))[1000:1000 + tokens]
    for i in range(0, len(ids), 256):
        state, read = m.read_document_chunk(state, ids[i:i + 256])
    states[book.stem] = state
# As the server sends a turn: the new message is fresh, so what the levels hold is out of view.
reqs = [(f"{name}|{j}", *m.encode_turn([{"role": "user", "content": q}], 256), state)
        for name, state in states.items() for j, q in enumerate(questions)]
reqs = [(rid, ids, state, fresh) for rid, ids, fresh, state in reqs]
out = chat.run(reqs)
for j, q in enumerate(questions):
    print(f"Q: {q}")
    for name in states:
        print(f"  [{name}] {out[f'{name}|{j}'][0]!r}")
