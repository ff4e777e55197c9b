"""Does a document read into a session (ReadDocument's model path) let the session answer
questions about it? The benchmark's users' fact statements are spread through ~1,500 tokens of
general English (a user's notes), the text is read into a fresh session, and each fact is asked
in a new chat turn (as the server sends one: the question alone is in view). Next to it: the
same questions in a fresh session, and with the whole notes in the prompt (where they fit).
usage: python document_recall.py [USERS]   (default 5 users x 5 facts x 2 questions)"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import learning  # noqa: E402
from episodes import make_episodes, matches  # noqa: E402
from nsam.model.runtime import NsamModel  # noqa: E402

torch.set_num_threads(1)
users = int(sys.argv[1]) if len(sys.argv) > 1 else 5
m = NsamModel.load("default")
episodes = make_episodes(users, 5)  # learning.py's seed: the same users
prose = learning.DEFAULT_GENERAL.read_text(encoding="utf-8").split("\n\n")
prose = [p.strip() for p in prose if len(p.strip()) > 200]
chat = learning.Chat(m, 8, max_tokens=32)
fresh = m.new_session_state(None)
answers, expected, tokens = {}, {}, []
for u, e in enumerate(episodes):
    parts = []
    for i, f in enumerate(e.facts):  # a paragraph of prose, then a statement, five times over
        parts += [prose[(u * 5 + i) % len(prose)][:1200], f.statement]
    notes = "\n\n".join(parts)
    ids = m.tokenizer.encode(notes)
    tokens.append(len(ids))
    state = fresh
    for i in range(0, len(ids), 256):
        state, _ = m.read_document_chunk(state, ids[i:i + 256])
    reqs = []
    for f in e.facts:
        for j, q in enumerate(f.questions):
            key = f"{e.user}|{f.attribute}|{j}"
            expected[key] = f.value
            turn, new = m.encode_turn([{"role": "user", "content": q}], 256)
            reqs += [(key + "|read", turn, state, new), (key + "|fresh", turn, fresh, new)]
            inline = m.encode_chat([{"role": "system", "content": "The user's notes:\n" + notes},
                                    {"role": "user", "content": q}], 2048)
            reqs.append((key + "|prompt", inline, fresh))
    answers.update({k: v[0] for k, v in chat.run(reqs).items()})
out = {}
for kind in ("read", "fresh", "prompt"):
    hits = [matches(answers[f"{k}|{kind}"], v) for k, v in expected.items()]
    out[kind] = sum(hits) / len(hits)
out["notes_tokens"] = sum(tokens) / len(tokens)
out["examples"] = {k: {"expected": v, **{kind: answers[f"{k}|{kind}"] for kind in ("read", "fresh", "prompt")}}
                   for k, v in list(expected.items())[:6]}
print(json.dumps(out, indent=1))
