"""Learning benchmark: does the default model remember what users tell it, in their own words?

    python benchmarks/learning.py --json out/learning.json [--general FILE] [--docs FILE ...]
    python benchmarks/learning.py --quick --json out/learning_quick.json

Users teach through ordinary chat turns: the user writes free text, the model replies in its own
words (learning on: the fast level writes, the medium level updates after every reply), then
chats about other things; the session is consolidated into the user's level. Facts come from
`broad_episodes.py` (64 kinds, three statement forms each, questions phrased unlike the
statement, made-up values), split by kind: held-out kinds (no default was tuned on them) and
tuning kinds are reported apart. The original 12-kind set (`episodes.py`) is a regression row.
No decode-time rule helps: every figure is the levels alone.

Keys (all on held-out kinds unless named otherwise; recall is a substring match of the value in
a greedy 32-token answer):
- heldout_in_session_recall: asked in the teaching session with none of it in the prompt.
- heldout_cross_session_recall: asked in a new session started from the consolidated level.
- heldout_false_binding: questions about kinds never taught answered with a taught value.
- intrusion: replies to unrelated messages (in the session after teaching, and in a new session
  after consolidation) that contain a taught value.
- heldout_conversation_recall: after consolidation, all of a user's questions one after another
  in one new conversation (learning on, sampled as the chat client samples by default).
- general_kept: general questions the frozen model answers right (expected word in the answer)
  still answered right after learning, in those conversations and in fresh sessions.
- regression_cross_session_recall: the 12-kind set, same procedure.
- forgetting: perplexity change on general English (`--general`) after one user's sessions.
- other_user_changes: another user's greedy answers that change after this user learned.
- online_ppl_reduction: reading documents (`--docs`) chunk by chunk vs the frozen model.
- update_seconds_per_100_tokens (medium update), consolidation_seconds_per_session.
- baselines: frozen_recall (no learning) and prompt_recall (the user's messages in the prompt,
  the teacher's view) on the same questions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import broad_episodes  # noqa: E402
from episodes import FILLER, make_episodes  # noqa: E402

from nsam.model.learning.objectives import probe_loss  # noqa: E402
from nsam.model.runtime import NsamModel, SamplingParams  # noqa: E402

DATA_HINT = ("general English text and long documents: use ../shared/data/general_english.txt and "
             "../shared/data/long_documents/*.txt from the team's shared data (see its README), or any "
             "plain-text files of your own")
# General questions with the word a right answer contains.
GENERAL = (("What is the capital of France?", "paris"), ("How many legs does a spider have?", "eight|8"),
           ("What is the largest ocean?", "pacific"), ("Who wrote Romeo and Juliet?", "shakespeare"),
           ("What is the boiling point of water in Celsius?", "100"), ("What colour is the sky on a clear day?", "blue"))
CHAT_SAMPLING = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def contains(answer: str, value: str) -> bool:
    return any(v.lower() in answer.lower() for v in value.split("|"))


class Harness:
    """One model; replies through its generator; timings of the medium updates."""

    def __init__(self, m: NsamModel, window: int):
        self.m, self.window = m, window
        self.gen = m.generator(16)
        self.update_seconds = 0.0
        self.update_tokens = 0

    def replies(self, jobs: list[tuple[list[int], bytes]], params: SamplingParams = SamplingParams(max_tokens=32)
                ) -> list[tuple[str, bytes]]:
        texts = [""] * len(jobs)
        for i, (ids, state) in enumerate(jobs):
            self.gen.add(str(i), ids, state, params)
        while self.gen.has_work():
            for e in self.gen.step():
                texts[int(e.request_id)] += e.text
        return [(texts[i].strip(), self.gen.pop_state(str(i))[0]) for i in range(len(jobs))]

    def ask(self, state: bytes, questions: list[str]) -> list[str]:
        """Each question alone in the prompt (nothing of the session in view)."""
        jobs = [(self.m.encode_chat([{"role": "user", "content": q}], self.window), state) for q in questions]
        return [text for text, _ in self.replies(jobs)]

    def turn(self, state: bytes, history: list[dict], message: str, learn: bool = True,
             params: SamplingParams = SamplingParams(max_tokens=32)) -> tuple[str, bytes]:
        history.append({"role": "user", "content": message})
        ids, _ = self.m.encode_turn(history, self.window)
        [(reply, state)] = self.replies([(ids, state)], params)
        history.append({"role": "assistant", "content": reply})
        if learn:
            started = time.perf_counter()
            state, _ = self.m.update_medium(state, history)
            self.update_seconds += time.perf_counter() - started
            self.update_tokens += self.m.count_tokens(message) + self.m.count_tokens(reply)
        return reply, state


def teach(h: Harness, user_state: bytes, messages: list[str], filler: list[str]) -> tuple[bytes, list[dict], list[str]]:
    """One session: the messages, then unrelated ones -> (session state, history, filler replies)."""
    state, history = h.m.new_session_state(user_state), []
    for message in messages:
        _, state = h.turn(state, history, message)
    replies = []
    for message in filler:
        reply, state = h.turn(state, history, message)
        replies.append(reply)
    return state, history, replies


def score(answers: list[str], values: list[str]) -> float:
    return sum(contains(a, v) for a, v in zip(answers, values)) / max(len(values), 1)


def bound(answers: list[str], taught: list[str]) -> float:
    return sum(any(contains(a, v) for v in taught) for a in answers) / max(len(answers), 1)


def evaluate_users(h: Harness, users, rng: random.Random, conversation: bool, frozen_general: list[str]) -> dict:
    """Teach, ask in session, consolidate, ask in a new session (and in one conversation)."""
    m = h.m
    rows = []
    for user in users:
        facts = list(user.facts)
        questions = [q for f in facts for q in f.questions]
        values = [f.value for f in facts for _ in f.questions]
        taught = [f.value for f in facts]
        filler = rng.sample(FILLER, 2)
        started = time.perf_counter()
        fresh_user = m.new_user_state()
        frozen = h.ask(m.new_session_state(fresh_user), questions)
        context = [{"role": "user", "content": msg} for msg in user.messages]
        prompted = [t for t, _ in h.replies([(m.encode_chat([*context, {"role": "user", "content": q}], 1024),
                                              m.new_session_state(fresh_user)) for q in questions])]
        session, history, filler_in = teach(h, fresh_user, list(user.messages), filler)
        in_session = h.ask(session, questions + list(user.untaught))
        t0 = time.perf_counter()
        consolidated, report = m.consolidate(fresh_user, session, history)
        consolidation_seconds = time.perf_counter() - t0
        new_session = m.new_session_state(consolidated)
        cross = h.ask(new_session, questions + list(user.untaught) + [q for q, _ in GENERAL] + filler)
        n, u = len(questions), len(user.untaught)
        row = {"user": user.name, "kinds": [getattr(f, "kind", getattr(f, "attribute", "")) for f in facts],
               "values": taught, "questions": questions,
               "frozen_recall": score(frozen, values), "prompt_recall": score(prompted, values),
               "in_session_recall": score(in_session[:n], values), "in_session_answers": in_session[:n],
               "in_session_false_binding": bound(in_session[n:], taught),
               "cross_session_recall": score(cross[:n], values), "cross_session_answers": cross[:n],
               "false_binding": bound(cross[n:n + u], taught), "untaught_answers": cross[n:n + u],
               "general_right": [contains(a, w) for a, (_, w) in zip(cross[n + u:n + u + len(GENERAL)], GENERAL)],
               "intrusions": [bound([r], taught) for r in filler_in + cross[n + u + len(GENERAL):]],
               "consolidation": {"accepted": report.accepted, "reason": report.reason, "notes": report.notes,
                                 "probe_change": report.probe_loss / report.baseline_probe_loss - 1
                                 if report.accepted else None, "seconds": consolidation_seconds}}
        if conversation:
            state, talk, answers = m.new_session_state(consolidated), [], []
            asked = questions + [q for q, _ in GENERAL]
            rng.shuffle(asked)
            for q in asked:
                reply, state = h.turn(state, talk, q, params=CHAT_SAMPLING)
                answers.append(reply)
            by_q = dict(zip(asked, answers))
            row["conversation_recall"] = score([by_q[q] for q in questions], values)
            row["conversation_general_right"] = [contains(by_q[q], w) for q, w in GENERAL]
            row["conversation_answers"] = by_q
        rows.append(row)
        log(f"  {user.name}: in session {row['in_session_recall']:.0%}, cross {row['cross_session_recall']:.0%}, "
            f"false binding {row['false_binding']:.0%}, conversation {row.get('conversation_recall', float('nan')):.0%}, "
            f"prompt {row['prompt_recall']:.0%} ({time.perf_counter() - started:.0f}s)")
    return summarise(rows, frozen_general)


def summarise(rows: list[dict], frozen_general: list[str]) -> dict:
    def mean(key):
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None
    right = [w for w, (_, word) in zip(frozen_general, GENERAL)]
    frozen_ok = [contains(a, w) for a, (_, w) in zip(frozen_general, GENERAL)]
    kept = [ok for r in rows for ok, was in zip(r["general_right"] + r.get("conversation_general_right", []),
                                                 frozen_ok + (frozen_ok if "conversation_general_right" in r else []))
            if was]
    intrusions = [x for r in rows for x in r["intrusions"]]
    del right
    return {"in_session_recall": mean("in_session_recall"), "cross_session_recall": mean("cross_session_recall"),
            "false_binding": mean("false_binding"), "in_session_false_binding": mean("in_session_false_binding"),
            "conversation_recall": mean("conversation_recall"), "frozen_recall": mean("frozen_recall"),
            "prompt_recall": mean("prompt_recall"),
            "general_kept": sum(kept) / len(kept) if kept else None,
            "intrusion": sum(intrusions) / len(intrusions) if intrusions else None,
            "users": rows}


def mean_loss(m: NsamModel, ids: list[int], level=None, chunk: int = 1024) -> float:
    spec, total, n = m.levels.get("user"), 0.0, 0
    for i in range(0, len(ids) - 1, chunk):
        piece = ids[i:i + chunk + 1]
        if len(piece) > 1:
            total += probe_loss(m.model, spec, [level] if level is not None else [], piece) * (len(piece) - 1)
            n += len(piece) - 1
    return total / n


def forgetting(h: Harness, general: Path, tokens: int, sessions: int, seed: int) -> dict:
    """One user over `sessions` sessions (two facts each, tuning and held-out kinds), each
    consolidated; perplexity on general English with the final user level vs frozen."""
    m = h.m
    ids = m.tokenizer.encode(general.read_text(encoding="utf-8")[:tokens * 8])[:tokens]
    base = mean_loss(m, ids)
    user, accepted, kinds = m.new_user_state(), 0, tuple(broad_episodes.KINDS)
    for s in range(sessions):
        episode = broad_episodes.make_user(1000 + s, kinds, 2, seed)
        state, history, _ = teach(h, user, list(episode.messages), [])
        user, report = m.consolidate(user, state, history)
        accepted += report.accepted
        log(f"  [forgetting] session {s + 1}/{sessions}: {report.reason} x{report.step_scale:g}")
    after = mean_loss(m, ids, m._read(user, "user").levels["user"])
    return {"forgetting": math.exp(after - base) - 1, "sessions": sessions, "accepted": accepted, "tokens": len(ids)}


def online_ppl(m: NsamModel, docs: list[Path], doc_tokens: int, chunk: int) -> dict:
    """Documents read chunk by chunk into a session (`read_document_chunk`) vs the frozen model."""
    frozen_total = online_total = 0.0
    n = 0
    for path in docs:
        ids = m.tokenizer.encode(path.read_text(encoding="utf-8"))[:doc_tokens]
        state = m.new_session_state(None)
        for i in range(0, len(ids) - 1, chunk):
            piece = ids[i:i + chunk]
            if len(piece) < 16:
                break
            frozen_total += probe_loss(m.model, m.levels.get("user"), [], piece) * (len(piece) - 1)
            state, read = m.read_document_chunk(state, piece)
            online_total += read.loss * read.tokens
            n += read.tokens
    fp, op = math.exp(frozen_total / n), math.exp(online_total / n)
    return {"frozen_ppl": fp, "online_ppl": op, "reduction": 1 - op / fp, "tokens": n}


def other_user_changes(h: Harness, learned_user: bytes) -> int:
    """Another user's greedy answers, alone and next to this user's learned session in one batch."""
    m = h.m
    questions = [q for q, _ in GENERAL[:3]]
    other = m.new_session_state(m.new_user_state())
    alone = h.ask(other, questions)
    jobs = [(m.encode_chat([{"role": "user", "content": q}], h.window), s)
            for q in questions for s in (other, m.new_session_state(learned_user))]
    together = [t for i, (t, _) in enumerate(h.replies(jobs)) if i % 2 == 0]
    return sum(a != b for a, b in zip(alone, together))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--model", default="default")
    ap.add_argument("--users", type=int, default=8, help="held-out users")
    ap.add_argument("--tuning-users", type=int, default=2)
    ap.add_argument("--regression-users", type=int, default=3)
    ap.add_argument("--facts", type=int, default=4, help="facts per user")
    ap.add_argument("--conversation", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--general", type=Path, default=Path(__file__).resolve().parent / "data" / "general_english.txt",
                    help="general English text for forgetting (default: the WikiText-2 slice in benchmarks/data)")
    ap.add_argument("--general-tokens", type=int, default=4096)
    ap.add_argument("--forgetting-sessions", type=int, default=20, help="0: forgetting not measured")
    ap.add_argument("--docs", type=Path, nargs="*", default=[],
                    help="documents for online perplexity (" + DATA_HINT + "); none: not measured")
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256, help="attention window (prompt tokens) in sessions")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="2 held-out users, 1 tuning, 1 regression, 3 sessions")
    args = ap.parse_args()
    for path in [args.general, *args.docs]:
        if path is not None and not path.is_file():
            sys.exit(f"{path} not found: pass {DATA_HINT}")
    if args.quick:
        args.users, args.tuning_users, args.regression_users, args.forgetting_sessions = 2, 1, 1, 3
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    m = NsamModel.load(args.model)
    h = Harness(m, args.window)
    rng = random.Random(args.seed)
    frozen_general = h.ask(m.new_session_state(None), [q for q, _ in GENERAL])
    out: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "held_out_kinds": list(broad_episodes.HELD_OUT_KINDS),
                 "tuning_kinds": list(broad_episodes.TUNING_KINDS)}
    log(f"held-out kinds: {args.users} users")
    held = [broad_episodes.make_user(i, broad_episodes.HELD_OUT_KINDS, args.facts, args.seed) for i in range(args.users)]
    heldout = evaluate_users(h, held, rng, args.conversation, frozen_general)
    log(f"tuning kinds: {args.tuning_users} users")
    tune = [broad_episodes.make_user(100 + i, broad_episodes.TUNING_KINDS, args.facts, args.seed)
            for i in range(args.tuning_users)]
    tuning = evaluate_users(h, tune, rng, False, frozen_general)
    log(f"regression (12-kind set): {args.regression_users} users")
    regression_users = [_as_broad(e) for e in make_episodes(args.regression_users, args.facts, seed=1234)]
    regression = evaluate_users(h, regression_users, rng, False, frozen_general)
    teach_seconds, teach_tokens = h.update_seconds, h.update_tokens
    out.update({
        "heldout_cross_session_recall": heldout["cross_session_recall"],
        "heldout_in_session_recall": heldout["in_session_recall"],
        "heldout_false_binding": heldout["false_binding"],
        "heldout_conversation_recall": heldout["conversation_recall"],
        "intrusion": heldout["intrusion"],
        "general_kept": heldout["general_kept"],
        "tuning_cross_session_recall": tuning["cross_session_recall"],
        "tuning_in_session_recall": tuning["in_session_recall"],
        "regression_cross_session_recall": regression["cross_session_recall"],
        "frozen_recall": heldout["frozen_recall"], "prompt_recall": heldout["prompt_recall"],
        "update_seconds_per_100_tokens": 100 * teach_seconds / max(teach_tokens, 1),
        "consolidation_seconds_per_session": sum(r["consolidation"]["seconds"] for r in heldout["users"])
        / max(len(heldout["users"]), 1),
        "details": {"heldout": heldout, "tuning": tuning, "regression": regression},
    })
    if held:
        learned = m.consolidate(m.new_user_state(), *teach(h, m.new_user_state(), list(held[0].messages), [])[:2])[0]
        out["other_user_changes"] = other_user_changes(h, learned)
    if args.forgetting_sessions > 0:
        log(f"forgetting: {args.forgetting_sessions} sessions of one user")
        f = forgetting(h, args.general, args.general_tokens, args.forgetting_sessions, args.seed)
        out["forgetting"], out["details"]["forgetting"] = f["forgetting"], f
    if args.docs:
        o = online_ppl(m, args.docs, args.doc_tokens, 256)
        out["online_ppl_reduction"], out["details"]["online"] = o["reduction"], o
    out["minutes"] = (time.perf_counter() - started) / 60
    print(json.dumps({k: v for k, v in out.items() if k not in ("details", "config", "held_out_kinds", "tuning_kinds")},
                     indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


def _as_broad(episode) -> broad_episodes.BroadUser:
    """An episode of the 12-kind set in the broad set's shape (one fact per message)."""
    facts = tuple(broad_episodes.Fact(f.attribute, f.value, f.statement, tuple(f.questions)) for f in episode.facts)
    return broad_episodes.BroadUser(episode.user, facts, tuple(f.statement for f in facts), tuple(episode.untaught[:3]))


if __name__ == "__main__":
    main()
