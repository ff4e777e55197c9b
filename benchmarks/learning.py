"""Learning benchmark: does the default model remember what a user tells it, and at what cost?

    python benchmarks/learning.py --json benchmarks/results/learning.json
    python benchmarks/learning.py --quick            # fewer users / sessions / tokens

Users teach through ordinary chat turns: the user writes free text ("By the way, my sister's
name is Olvena."), the model answers with its own words through the generator (learning on),
the medium level updates after each reply, and the session is consolidated into the user's
slow level at its end. Episodes (made-up names, places, codes) come from `episodes.py` with a
fixed seed. Texts are passed as paths, so you can bring your own.

Measured, for the default model, next to baselines (frozen model; the user's statements in
the prompt; the user's 3 most similar past messages retrieved into the prompt, mem0-style):

- cross_session_recall: facts taught in session 1, asked in a fresh session 2 started from the
  consolidated user level, none of them in context; greedy; substring match of the value.
- in_session_recall: same session (state carried, medium updates on) after the attention
  window (`--window` tokens) has moved past the facts. Both recalls are also given per fact
  attribute in the details (`*_recall_by_attribute`: which kinds of value the levels keep).
- false_binding: questions about things never taught answered with one of the user's values.
- other_user_changes: greedy outputs of another user (fresh state) that change when this
  user's learned state is in the same batch (compared with the same batch without it).
- forgetting: perplexity change on a slice of general English after one user's 20 sessions
  (2 facts each; a later session may give an attribute a new value). Its details hold the
  same user's retention: every attribute asked in a fresh session after 5, 10 and 20 sessions,
  scored against the value taught last.
- online_ppl_reduction: dynamic evaluation on long documents (loss on chunk i+1 after the
  fast level wrote and the medium level updated on chunks ≤ i) vs the frozen model, as a
  fraction lower.
- update_seconds_per_100_tokens, session_state_bytes, user_state_bytes.
- learning_decode_ratio: decode tokens/s with learning on ÷ off, same prompts and states.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from episodes import FILLER, make_episodes, make_long_user, matches  # noqa: E402

from nsam.model.consolidation import probe_loss  # noqa: E402
from nsam.model.levels import LevelsConfig  # noqa: E402
from nsam.model.runtime import NsamModel, SamplingParams  # noqa: E402
from nsam.model.updates import levels_loss  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GENERAL = REPO.parent / "shared" / "data" / "general_english.txt"
DEFAULT_DOCS = REPO.parent / "shared" / "data" / "long_documents"

GOALS = {  # key -> (comparison, threshold)
    "cross_session_recall": (">=", 0.90),
    "in_session_recall": (">=", 0.80),
    "false_binding": ("<=", 0.05),
    "other_user_changes": ("==", 0),
    "forgetting": ("<=", 0.02),
    "online_ppl_reduction": (">=", 0.10),
    "learning_decode_ratio": (">=", 0.80),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- generation ------------------------------------------------------------------------------
class Chat:
    """Runs rounds of requests through one generator (continuous batching)."""

    def __init__(self, m: NsamModel, max_batch: int, learning: bool = True, max_tokens: int = 32):
        self.m, self.max_tokens = m, max_tokens
        self.gen = m.generator(max_batch, learning=learning)
        self.decode_seconds = 0.0
        self.decode_tokens = 0

    def run(self, requests: list[tuple]) -> dict[str, tuple[str, bytes]]:
        """requests: (id, prompt ids, session state[, fresh tokens[, messages]]) -> id -> (reply
        text, session state after). Fresh tokens: the prompt's trailing tokens new to the session
        (as the server passes them: the fast level writes only those); all when not given.
        Messages: what the prompt was made from (as the server passes them: the reply holds taught
        values to their owners, `model/binding.py`); without them, the levels alone."""
        texts = {r[0]: "" for r in requests}
        for rid, ids, state, *rest in requests:
            self.gen.add(rid, ids, state, SamplingParams(max_tokens=self.max_tokens), *rest)
        while self.gen.has_work():
            running = len(self.gen.inner.running)
            t0 = time.perf_counter()
            events = self.gen.step()
            dt = time.perf_counter() - t0
            if running and not self.gen.inner.waiting:  # pure decode steps (no prefill in them)
                self.decode_seconds += dt
                self.decode_tokens += running
            for e in events:
                texts[e.request_id] += e.text
        return {r[0]: (texts[r[0]].strip(), self.gen.pop_state(r[0])[0]) for r in requests}


@contextmanager
def unguarded(m: NsamModel):
    """Replies without the binding guard: what the levels say on their own."""
    m.binding_guard = False
    try:
        yield
    finally:
        m.binding_guard = True


def window_prompt(m: NsamModel, messages: list[dict], window: int, hidden: list[str]) -> tuple[list[int], int]:
    """encode_turn with the window; then drop more old turns while a value in `hidden` is still
    visible, so the question is asked with the facts out of the window. -> (ids, fresh tokens)"""
    ids, fresh = m.encode_turn(messages, window)
    msgs = list(messages)
    while any(matches(m.tokenizer.decode(ids), v) for v in hidden) and len(msgs) > 1:
        msgs = msgs[1:]
        ids, fresh = m.encode_turn(msgs, window)
    return ids, fresh


# -- retrieval baseline (mem0-style, top-k by TF-IDF) ---------------------------------------
_WORD = re.compile(r"[a-z0-9']+")
_STOP = {"the", "a", "an", "is", "my", "i", "me", "you", "do", "what", "what's", "of", "to", "and",
         "can", "remember", "tell", "know", "name", "s"}


def _words(text: str) -> list[str]:
    out = []
    for w in _WORD.findall(text.lower()):
        w = w.removesuffix("'s")
        if w not in _STOP:
            out.append(w)
    return out


def retrieve(query: str, past: list[str], k: int = 3) -> list[str]:
    docs = [Counter(_words(p)) for p in past]
    df = Counter(w for d in docs for w in d)
    idf = {w: math.log((1 + len(docs)) / (1 + n)) + 1 for w, n in df.items()}
    q = Counter(_words(query))

    def vec(c):
        v = {w: n * idf.get(w, 1.0) for w, n in c.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    qv = vec(q)
    scores = [sum(qv.get(w, 0.0) * x for w, x in vec(d).items()) for d in docs]
    order = sorted(range(len(past)), key=lambda i: -scores[i])[:k]
    return [past[i] for i in sorted(order)]


# -- perplexity helpers ----------------------------------------------------------------------
def mean_loss(m: NsamModel, ids: list[int], user_level=None, chunk: int = 1024) -> float:
    spec = m.levels.get("user")
    total, n = 0.0, 0
    for i in range(0, len(ids) - 1, chunk):
        piece = ids[i:i + chunk + 1]
        if len(piece) < 2:
            break
        loss = probe_loss(m.model, spec, [user_level] if user_level is not None else [], piece)
        total += loss * (len(piece) - 1)
        n += len(piece) - 1
    return total / n


def online_ppl(m: NsamModel, docs: list[Path], doc_tokens: int, chunk: int, offset: int) -> dict:
    """Dynamic evaluation: per document, the loss on each chunk as a session reads it
    (`NsamModel.read_document_chunk`, what the service's ReadDocument does: the levels as the
    chunks before left them, then the fast level's writes and the medium level's update), vs
    the frozen model on the same chunks. Attention sees one chunk at a time in both."""
    spec = m.levels.get("medium")
    frozen_total = online_total = 0.0
    n = 0
    per_doc = {}
    update_seconds = 0.0
    for path in docs:
        ids = m.tokenizer.encode(path.read_text(encoding="utf-8"))
        ids = ids[offset:offset + doc_tokens] if len(ids) > offset + doc_tokens else ids[:doc_tokens]
        state = m.new_session_state(None)
        f_sum = o_sum = 0.0
        k = 0
        for i in range(0, len(ids) - 1, chunk):
            piece = ids[i:i + chunk]
            if len(piece) < 16:
                break
            f, _ = levels_loss(m.model, spec, [], None, None, piece)
            state, read = m.read_document_chunk(state, piece)
            f_sum += f * read.tokens
            o_sum += read.loss * read.tokens
            k += read.tokens
            update_seconds += sum(r.seconds for r in read.reports if r.level == "medium")
        per_doc[path.name] = {"frozen_ppl": math.exp(f_sum / k), "online_ppl": math.exp(o_sum / k), "tokens": k}
        log(f"  {path.name}: frozen ppl {math.exp(f_sum / k):.2f}, online {math.exp(o_sum / k):.2f}")
        frozen_total += f_sum
        online_total += o_sum
        n += k
    fp, op = math.exp(frozen_total / n), math.exp(online_total / n)
    return {"frozen_ppl": fp, "online_ppl": op, "reduction": 1 - op / fp, "tokens": n, "chunk": chunk,
            "update_seconds": update_seconds, "per_doc": per_doc}


# -- the phases ------------------------------------------------------------------------------
def teach_sessions(m: NsamModel, chat: Chat, episodes, window: int, user_states: dict[str, bytes],
                   learning: bool = True):
    """Session 1 for every user, batched across users: facts then filler, one turn each; the
    model replies with its own words; update_medium after each reply (`learning`)."""
    states = {e.user: m.new_session_state(user_states[e.user]) for e in episodes}
    history = {e.user: [] for e in episodes}
    turns = {e.user: [f.statement for f in e.facts] + list(e.filler) for e in episodes}
    upd_seconds, upd_tokens = 0.0, 0
    for t in range(max(len(v) for v in turns.values())):
        reqs = []
        for e in episodes:
            if t < len(turns[e.user]):
                history[e.user].append({"role": "user", "content": turns[e.user][t]})
                ids, fresh = m.encode_turn(history[e.user], window)
                reqs.append((e.user, ids, states[e.user], fresh, list(history[e.user])))
        out = chat.run(reqs)
        for rid, (text, state) in out.items():
            history[rid].append({"role": "assistant", "content": text})
            if not learning:
                continue
            t0 = time.perf_counter()
            states[rid], reports = m.update_medium(state, history[rid])
            upd_seconds += time.perf_counter() - t0
            upd_tokens += len(m.tokenizer.encode_chat(history[rid][-2:], add_generation_prompt=False))
        log(f"  turn {t + 1}: {len(reqs)} replies, e.g. {out[episodes[0].user][0][:70]!r}")
    return states, history, upd_seconds, upd_tokens


class SessionCache:
    """`--session-cache`: session 1 as taught and its consolidated user levels, so later runs
    can ask them other ways without teaching or consolidating again. One folder: per user
    `<user>.state` (session 1) and `<user>.user` (after consolidation), `sessions.json` (the
    transcripts and teaching times), `consolidations.json` (the reports)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def sessions(self, episodes):
        """(states, history, frozen history, update seconds, update tokens, teach seconds) of
        these users, or None when the folder does not hold them all."""
        index = self.folder / "sessions.json"
        if not index.exists():
            return None
        saved = json.loads(index.read_text())
        users = [e.user for e in episodes]
        if any(u not in saved["users"] for u in users):
            return None
        states = {u: (self.folder / f"{u}.state").read_bytes() for u in users}
        history = {u: saved["history"][u] for u in users}
        frozen_history = {u: saved["frozen_history"][u] for u in users}
        return (states, history, frozen_history, saved["update_seconds"], saved["update_tokens"],
                saved["teach_seconds"])

    def save_sessions(self, states: dict, history: dict, frozen_history: dict, upd_s: float, upd_tok: int,
                      seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for user, state in states.items():
            (self.folder / f"{user}.state").write_bytes(state)
        (self.folder / "sessions.json").write_text(json.dumps({
            "users": list(states), "history": history, "frozen_history": frozen_history,
            "update_seconds": upd_s, "update_tokens": upd_tok, "teach_seconds": seconds}))

    def consolidated(self, episodes):
        """(user states, consolidation reports) of these users, or None when not all are held."""
        index = self.folder / "consolidations.json"  # written after the states: holds only finished runs
        if not index.exists():
            return None
        saved = {c["user"]: c for c in json.loads(index.read_text())}
        users = [e.user for e in episodes]
        if any(u not in saved for u in users):
            return None
        return {u: (self.folder / f"{u}.user").read_bytes() for u in users}, [saved[u] for u in users]

    def save_consolidated(self, user_states: dict, reports: list) -> None:
        for user, state in user_states.items():
            (self.folder / f"{user}.user").write_bytes(state)
        (self.folder / "consolidations.json").write_text(json.dumps(reports))


def filler_replies(episodes, history: dict[str, list[dict]]) -> dict:
    """Replies of session 1. To the ordinary (filler) turns: the share that recite one of the
    user's taught values (a level that rehearses facts must not), and the share that open like
    an earlier reply of the session (same first six words: the model copies itself instead of
    answering). To the turns that state a fact: the share that repeat the value just stated (a
    level that garbles it, "Stoufe" for Stoukesk after Zouvoufe was learnt, lowers it)."""
    leaked, repeated, echoed, replies, fact_replies = 0, 0, 0, [], 0
    for e in episodes:
        values = [f.value for f in e.facts]
        stated = {f.statement: f.value for f in e.facts}
        msgs = history[e.user]
        earlier: set[tuple[str, ...]] = set()
        for i in range(0, len(msgs) - 1, 2):
            reply = msgs[i + 1]["content"]
            opening = tuple(reply.lower().split()[:6])
            if msgs[i]["content"] in e.filler:
                replies.append(reply)
                leaked += any(matches(reply, v) for v in values)
                repeated += opening in earlier
            elif msgs[i]["content"] in stated:
                fact_replies += 1
                echoed += matches(reply, stated[msgs[i]["content"]])
            earlier.add(opening)
    n = max(len(replies), 1)
    return {"with_taught_value": leaked / n, "repeating_an_earlier_reply": repeated / n, "examples": replies[:6],
            "fact_replies_with_own_value": echoed / max(fact_replies, 1)}


def forgetting_phase(m: NsamModel, args) -> tuple[float, dict]:
    """One user over many sessions (2 facts each, taught in chat turns, medium updates on),
    each consolidated; perplexity on general English with the final user level vs frozen."""
    t0 = time.perf_counter()
    text = args.general.read_text(encoding="utf-8")
    general = m.tokenizer.encode(text[:args.general_tokens * 8])[:args.general_tokens]
    base_loss = mean_loss(m, general)
    chat = Chat(m, 2, learning=True)
    user = m.new_user_state()
    accepted = shortened = 0
    milestones: dict[int, float] = {}
    recalled: dict[int, float] = {}  # the same milestones: the user's latest values recalled
    recalled_unguarded: dict[int, float] = {}
    sessions = make_long_user(args.forgetting_sessions, 2, seed=args.seed + 1)
    for s, facts in enumerate(sessions):
        state = m.new_session_state(user)
        hist: list[dict] = []
        for turn in [f.statement for f in facts]:
            hist.append({"role": "user", "content": turn})
            ids, fresh = m.encode_turn(hist, args.window)
            reply, state = chat.run([("long", ids, state, fresh, list(hist))])["long"]
            hist.append({"role": "assistant", "content": reply})
            state, _ = m.update_medium(state, hist)
        user, rep = m.consolidate(user, state, hist)
        accepted += rep.accepted
        shortened += rep.accepted and rep.trust_region != "full"
        log(f"  [forgetting] session {s + 1}/{len(sessions)}: {rep.reason}, {rep.steps_kept} of "
            f"{rep.steps_trained} steps x{rep.step_scale:g}, rehearsed answers said {rep.answers_said:.0%} "
            f"({rep.seconds:.0f}s)")
        if s + 1 in (5, 10) and s + 1 < len(sessions):  # milestones: a long chain can be cut short
            mid = mean_loss(m, general, m._read(user, "user").levels["user"])
            milestones[s + 1] = math.exp(mid) / math.exp(base_loss) - 1
            kept = retention_after(m, user, sessions[:s + 1], args.window)
            recalled[s + 1], recalled_unguarded[s + 1] = kept["recall"], kept["recall_unguarded"]
            log(f"  [forgetting] after {s + 1} sessions: {milestones[s + 1]:+.2%}, "
                f"latest values recalled {recalled[s + 1]:.0%} (without the binding guard {kept['recall_unguarded']:.0%})")
    level = m._read(user, "user").levels["user"]
    after = mean_loss(m, general, level)
    forgetting = math.exp(after) / math.exp(base_loss) - 1
    log(f"forgetting {forgetting:+.2%} after {len(sessions)} sessions ({accepted} accepted, {shortened} of them "
        f"cut back to the drift budget) "
        f"[{time.perf_counter() - t0:.0f}s]")
    retention = retention_after(m, user, sessions, args.window)
    pct = {k: "n/a" if v is None else f"{v:.0%}" for k, v in retention.items() if not isinstance(v, dict)}
    log(f"  [forgetting] after {len(sessions)} sessions the user's latest values are recalled {pct['recall']} "
        f"(taught in sessions 1-{len(sessions) // 2}: {pct['recall_first_half']}, later: "
        f"{pct['recall_second_half']}); a replaced value given in {pct['stale']} of the answers; without the "
        f"binding guard {pct['recall_unguarded']}")
    return forgetting, {"sessions": len(sessions), "accepted": accepted, "cut_back": shortened, "tokens": len(general),
                        "milestones": milestones, "retention": retention, "retention_milestones": recalled,
                        "retention_milestones_unguarded": recalled_unguarded,
                        "ppl_before": math.exp(base_loss), "ppl_after": math.exp(after),
                        "seconds": time.perf_counter() - t0}


def ask(m: NsamModel, chat: Chat, questions: dict[str, str], state: bytes, window: int) -> dict[str, str]:
    """Each question alone in the prompt of `state`'s session, as session 2 is asked: id -> answer."""
    reqs = [(k, m.encode_chat(msgs, window), state, None, msgs)
            for k, msgs in ((k, [{"role": "user", "content": q}]) for k, q in questions.items())]
    return {k: v[0] for k, v in chat.run(reqs).items()}


def retention_after(m: NsamModel, user: bytes, sessions, window: int) -> dict:
    """What the long user's level still knows after all its sessions: every attribute's question
    forms, asked in a fresh session, scored against the value taught last (a later session may
    restate an attribute with a new value; answering with the replaced one counts as stale)."""
    latest, replaced = {}, {}
    for s, facts in enumerate(sessions):
        for f in facts:
            if f.attribute in latest:
                replaced.setdefault(f.attribute, []).append(latest[f.attribute][1].value)
            latest[f.attribute] = (s, f)
    questions, expected, taught_in = {}, {}, {}
    for attribute, (s, f) in latest.items():
        for j, q in enumerate(f.questions):
            rid = f"{attribute}|{j}"
            questions[rid], expected[rid], taught_in[rid] = q, f.value, s
    session = m.new_session_state(user)
    answers = ask(m, Chat(m, 24), questions, session, window)
    with unguarded(m):  # the same questions, the level alone
        raw = ask(m, Chat(m, 24), questions, session, window)
    half = len(sessions) // 2
    first = {k: v for k, v in expected.items() if taught_in[k] < half}
    second = {k: v for k, v in expected.items() if taught_in[k] >= half}
    stale = sum(any(matches(answers[k], old) for old in replaced.get(k.split("|")[0], [])) for k in answers)
    return {"recall": score(answers, expected), "recall_unguarded": score(raw, expected),
            "recall_first_half": score(answers, first) if first else None,
            "recall_second_half": score(answers, second) if second else None,
            "stale": stale / max(len(answers), 1), "attributes": len(latest), "questions": len(answers),
            "examples": {k: {"expected": expected[k], "answer": answers[k]} for k in list(answers)[:6]}}


def load_model(args) -> NsamModel:
    """The model the benchmark measures: `--levels` overrides how a level learns (its rates,
    steps, replay), never its shape, so every stored state stays readable."""
    torch.manual_seed(0)  # the same model in every process ("tiny" is random)
    m = NsamModel.load(args.model)
    if args.recall_gain is not None:
        m.recall_gain = args.recall_gain
    m.context_window = min(m.context_window, 1024)  # small KV caches: prompts stay within the window
    overrides = json.loads(args.levels)
    if overrides:
        unknown = set(overrides) - set(m.levels.names())
        if unknown:
            raise SystemExit(f"--levels: no level named {sorted(unknown)}; levels are {list(m.levels.names())}")
        specs = tuple(replace(spec, **overrides.get(spec.name, {})) for spec in m.levels.levels)
        if [s.state_key() for s in specs] != [s.state_key() for s in m.levels.levels]:
            raise SystemExit("--levels may change how a level learns, not its shape (layers, rank, scale)")
        m.levels = LevelsConfig(specs)
    return m


def _forgetting_worker(args, queue, parent: int) -> None:
    _exit_with(parent)
    torch.set_num_threads(args.threads)
    queue.put(forgetting_phase(load_model(args), args))


def _exit_with(parent: int) -> None:
    """A killed benchmark must not leave its forgetting chain running: `daemon=True` only ends
    it when the parent exits normally, and an orphan would hold a core for an hour and more."""
    def watch():
        while os.getppid() == parent:
            time.sleep(5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


_WORKER_MODEL: NsamModel | None = None


def _consolidation_worker_init(args, parent: int) -> None:
    global _WORKER_MODEL
    _exit_with(parent)
    torch.set_num_threads(args.threads)
    _WORKER_MODEL = load_model(args)


def _consolidate_timed(m: NsamModel, user_state: bytes, session_state: bytes, history: list[dict]):
    t0 = time.perf_counter()
    new, report = m.consolidate(user_state, session_state, history)
    return new, report, time.perf_counter() - t0


def _consolidate_in_worker(job: tuple) -> tuple:
    return _consolidate_timed(_WORKER_MODEL, *job)


def consolidate_all(m: NsamModel, jobs: list[tuple[bytes, bytes, list[dict]]], args,
                    on_done: Callable[[int, tuple], None]) -> list[tuple]:
    """[(user state, session state, transcript)] -> [(new user state, report, seconds)], in order;
    `on_done(i, result)` as each finishes. With --jobs 2 a second process takes every other one:
    each is minutes of one core, and by the time they start the forgetting chain has (nearly)
    given its core back."""
    def run_here(i: int) -> tuple:
        out = _consolidate_timed(m, *jobs[i])
        on_done(i, out)
        return out

    if args.jobs < 2 or len(jobs) < 2:
        return [run_here(i) for i in range(len(jobs))]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp.get_context("spawn"), _consolidation_worker_init,
                             (args, os.getpid())) as pool:
        theirs = {}
        for i in range(1, len(jobs), 2):
            theirs[i] = pool.submit(_consolidate_in_worker, jobs[i])
            theirs[i].add_done_callback(lambda f, i=i: f.exception() or on_done(i, f.result()))
        mine = {i: run_here(i) for i in range(0, len(jobs), 2)}
        return [mine[i] if i in mine else theirs[i].result() for i in range(len(jobs))]


class ForgettingJob:
    """The forgetting phase is one long sequential chain of sessions: with --jobs 2 it runs in
    a second process next to the rest of the benchmark; with --jobs 1 when its result is asked."""

    def __init__(self, args):
        self.args = args
        self.proc = None
        if args.jobs > 1:
            import multiprocessing as mp
            ctx = mp.get_context("spawn")
            self.queue = ctx.Queue()
            self.proc = ctx.Process(target=_forgetting_worker, args=(args, self.queue, os.getpid()),
                                    daemon=True)
            self.proc.start()

    def result(self) -> tuple[float, dict]:
        if self.proc is None:
            return forgetting_phase(load_model(self.args), self.args)
        import queue
        while True:
            try:
                out = self.queue.get(timeout=5)
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"the forgetting process died (exit code {self.proc.exitcode})") from None
        self.proc.join()
        return out


def score(answers: dict, expected: dict) -> float:
    hits = [matches(answers[k], v) for k, v in expected.items()]
    return sum(hits) / max(len(hits), 1)


def recall_by_attribute(answers: dict, expected: dict) -> dict[str, float]:
    """Recall per fact attribute (keys are "user|phase|attribute|question"): which kinds of
    value (names, places, numbers, codes) a level keeps."""
    hits: dict[str, list[bool]] = {}
    for k, v in expected.items():
        hits.setdefault(k.split("|")[2], []).append(matches(answers[k], v))
    return {a: sum(h) / len(h) for a, h in sorted(hits.items())}


def false_bound(answers: dict, keys: list, values: dict) -> float:
    bad = [any(matches(answers[k], v) for v in values[k]) for k in keys]
    return sum(bad) / max(len(bad), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--model", default="default")
    ap.add_argument("--general", type=Path, default=DEFAULT_GENERAL, help="general English text (forgetting)")
    ap.add_argument("--docs", type=Path, nargs="+", default=[DEFAULT_DOCS],
                    help="long documents (files or folders of .txt) for online perplexity")
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--first-user", type=int, default=0,
                    help="start at this user of the seed's sequence (users are the same whatever the count)")
    ap.add_argument("--facts", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--window", type=int, default=256, help="attention window (prompt tokens) in sessions")
    ap.add_argument("--forgetting-sessions", type=int, default=20)
    ap.add_argument("--general-tokens", type=int, default=4096)
    ap.add_argument("--doc-tokens", type=int, default=2048, help="tokens per document (online ppl)")
    ap.add_argument("--max-docs", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=256, help="chunk size of the online evaluation")
    ap.add_argument("--batch", type=int, default=24, help="generator max batch")
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2],
                    help="2: the forgetting chain, and every other consolidation, in a second process")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared 2-core machine more threads thrash)")
    ap.add_argument("--levels", default="{}",
                    help='how levels learn, as JSON overrides per level: \'{"medium": {"replay_steps": 8}}\'')
    ap.add_argument("--quick", action="store_true",
                    help="3 users, 5 forgetting sessions, 2 documents × 1024 tokens")
    ap.add_argument("--recall-gain", type=float,
                    help="read the LoRA levels times this in replies to questions about taught facts (model default)")
    ap.add_argument("--session-cache", type=Path,
                    help="a folder: session 1 and its consolidation are read from it when it holds these users, else "
                         "taught and written to it (to screen ways of asking without teaching again; the states must "
                         "match the code)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["session", "forgetting", "cross", "online", "decode"],
                    help="leave phases out (their figures are null; without the session, cross-session too)")
    args = ap.parse_args()
    if args.quick:
        args.users = min(args.users, 3)
        args.forgetting_sessions = min(args.forgetting_sessions, 5)
        args.max_docs = min(args.max_docs, 2)
        args.doc_tokens = min(args.doc_tokens, 1024)

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    forgetting_job = None
    if "forgetting" not in args.skip:
        forgetting_job = ForgettingJob(args)
    m = load_model(args)
    log(f"loaded {args.model} ({m.source}); {args.users} users x {args.facts} facts, window {args.window}")
    episodes = make_episodes(args.first_user + args.users, args.facts, seed=args.seed)[args.first_user:]
    chat = Chat(m, args.batch, learning=True)
    details: dict = {}

    fresh_user, fresh_session = m.new_user_state(), m.new_session_state(None)
    s1 = None
    if "session" not in args.skip:
        s1 = session_phase(m, chat, episodes, args, details, fresh_user, fresh_session)

    # 3-4) consolidation at session end; session 2; the prompt baselines.
    cross = fb = changed = user_state_bytes = None
    base = {"frozen": {"cross_session_recall": None, "false_binding": None}}
    if s1 is not None and "cross" not in args.skip:
        cross, fb, changed, user_state_bytes, base = cross_session_phase(
            m, chat, episodes, s1.states, s1.history, s1.values, fresh_user, fresh_session, args, details)
    base["frozen"]["in_session_recall"] = s1 and s1.in_session_frozen

    # 5) forgetting (started at the beginning, in its own process when --jobs 2).
    forgetting = None
    if forgetting_job is not None:
        forgetting, details["forgetting"] = forgetting_job.result()

    # 6) online perplexity on long documents.
    online = None
    if "online" not in args.skip:
        t0 = time.perf_counter()
        docs = []
        for p in args.docs:
            docs += sorted(p.glob("*.txt")) if p.is_dir() else [p]
        res = online_ppl(m, docs[:args.max_docs], args.doc_tokens, args.chunk, offset=1000)
        online = res["reduction"]
        details["online"] = {**res, "seconds": time.perf_counter() - t0}
        log(f"online ppl {res['online_ppl']:.2f} vs frozen {res['frozen_ppl']:.2f}: {online:.1%} lower")

    # 7) decode speed with learning on / off, same prompts and states.
    ratio = None
    if "decode" not in args.skip:
        prompts = [m.encode_chat([{"role": "user", "content": q}], args.window) for q in FILLER[:8]]
        # Learning on, as the server decodes: the session's messages come with the prompt, so the
        # binding guard holds the first user's 5 taught values (the prompt itself is the same).
        stated = [{"role": "user", "content": f.statement} for f in episodes[0].facts]
        messages = [stated + [{"role": "user", "content": q}] for q in FILLER[:8]]
        rates = {"frozen": [], "learning": [], "learning_without_guard": []}
        for _ in range(2):
            for mode in rates:
                c = Chat(m, 8, learning=mode != "frozen", max_tokens=48)
                c.run([(f"d{i}", p, fresh_session, None, messages[i] if mode == "learning" else None)
                       for i, p in enumerate(prompts)])
                rates[mode].append(c.decode_tokens / c.decode_seconds)
        ratio = max(rates["learning"]) / max(rates["frozen"])
        details["decode_tokens_per_s"] = {mode: max(r) for mode, r in rates.items()}
        log(f"decode ratio {ratio:.2f} (without the binding guard "
            f"{max(rates['learning_without_guard']) / max(rates['frozen']):.2f})")

    results = {
        "cross_session_recall": cross,
        "in_session_recall": s1 and s1.in_session_recall,
        "false_binding": fb,
        "other_user_changes": changed,
        "forgetting": forgetting,
        "online_ppl_reduction": online,
        "update_seconds_per_100_tokens": s1 and 100 * s1.update_seconds / max(s1.update_tokens, 1),
        "session_state_bytes": s1 and s1.state_bytes,
        "user_state_bytes": user_state_bytes,
        "learning_decode_ratio": ratio,
        "baselines": base,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        | {"docs": [str(p) for p in args.docs], "model": m.source, "threads": torch.get_num_threads()},
        "details": details,
        "seconds": time.perf_counter() - started,
    }
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def session_phase(m: NsamModel, chat: Chat, episodes, args, details: dict, fresh_user: bytes,
                  fresh_session: bytes) -> "Session1":
    """Session 1 (teaching) and the in-session questions."""
    # 1) session 1: teach through chat turns, medium updates after each reply.
    t0 = time.perf_counter()
    cache = SessionCache(args.session_cache) if args.session_cache else None
    cached = cache.sessions(episodes) if cache else None
    if cached is not None:
        states, history, frozen_history, upd_s, upd_tok, details["teach_seconds"] = cached
        log(f"session 1 of {len(episodes)} users read from {args.session_cache} (not taught again)")
    else:
        states, history, upd_s, upd_tok = teach_sessions(m, chat, episodes, args.window,
                                                         {e.user: fresh_user for e in episodes})
        details["teach_seconds"] = time.perf_counter() - t0
        _, frozen_history, _, _ = teach_sessions(m, Chat(m, args.batch, learning=False), episodes, args.window,
                                                 {e.user: fresh_user for e in episodes}, learning=False)
        if cache:
            cache.save_sessions(states, history, frozen_history, upd_s, upd_tok, details["teach_seconds"])
    filler = filler_replies(episodes, history)
    filler_frozen = filler_replies(episodes, frozen_history)
    details["filler_replies_with_taught_value"] = filler["with_taught_value"]
    details["filler_replies_repeating_an_earlier_reply"] = filler["repeating_an_earlier_reply"]
    details["filler_reply_examples"] = filler["examples"]
    details["filler_frozen"] = filler_frozen
    details["fact_replies_with_own_value"] = filler["fact_replies_with_own_value"]
    log(f"filler replies containing a taught value: {filler['with_taught_value']:.0%} "
        f"(frozen {filler_frozen['with_taught_value']:.0%}); opening like an earlier reply: "
        f"{filler['repeating_an_earlier_reply']:.0%} (frozen {filler_frozen['repeating_an_earlier_reply']:.0%}); "
        f"fact replies repeating the value just stated: {filler['fact_replies_with_own_value']:.0%} "
        f"(frozen {filler_frozen['fact_replies_with_own_value']:.0%})")
    session_state_bytes = len(states[episodes[0].user])

    # 2) in-session recall: facts out of the window, same session state.
    values = {e.user: [f.value for f in e.facts] for e in episodes}
    reqs, untaught_reqs, expected, meta, asked = [], [], {}, {}, {}
    for e in episodes:
        for f in e.facts:
            for j, q in enumerate(f.questions):
                rid = f"{e.user}|in|{f.attribute}|{j}"
                msgs = history[e.user] + [{"role": "user", "content": q}]
                ids, fresh = window_prompt(m, msgs, args.window, values[e.user])
                reqs.append((rid, ids, states[e.user], fresh, msgs))
                expected[rid] = f.value
                meta[rid], asked[rid] = ids, (e.user, q)
        for j, q in enumerate(e.untaught):  # never taught: must not get one of the user's values
            msgs = history[e.user] + [{"role": "user", "content": q}]
            ids, fresh = window_prompt(m, msgs, args.window, values[e.user])
            untaught_reqs.append((f"{e.user}|inU|{j}", ids, states[e.user], fresh, msgs))
    t0 = time.perf_counter()
    ans_in = {k: v[0] for k, v in chat.run(reqs + untaught_reqs).items()}
    ans_in_frozen = {k.replace("|in|", "|inF|"): v[0] for k, v in
                     chat.run([(r.replace("|in|", "|inF|"), ids, fresh_session) for r, ids, *_ in reqs]).items()}
    # The same questions asked with nothing of the session before them: does the level hold the
    # fact (and the turns in the window lead the answer astray), or does it not hold it?
    ans_alone = {k: v[0] for k, v in chat.run(
        [(rid.replace("|in|", "|inA|"), m.encode_chat([{"role": "user", "content": q}], args.window), states[user])
         for rid, (user, q) in asked.items()]).items()}
    in_session_alone = score(ans_alone, {k.replace("|in|", "|inA|"): v for k, v in expected.items()})
    details["in_session_recall_question_alone"] = in_session_alone
    in_untaught = [r[0] for r in untaught_reqs]
    in_session_binding = false_bound(ans_in, in_untaught, {k: values[k.split("|")[0]] for k in in_untaught})
    in_session_recall = score(ans_in, expected)
    with unguarded(m):  # the same questions, the levels alone
        ans_raw = {k: v[0] for k, v in chat.run(reqs + untaught_reqs).items()}
    details["in_session_recall_unguarded"] = score(ans_raw, expected)
    details["in_session_false_binding_unguarded"] = false_bound(
        ans_raw, in_untaught, {k: values[k.split("|")[0]] for k in in_untaught})
    in_session_frozen = score(ans_in_frozen, {k.replace("|in|", "|inF|"): v for k, v in expected.items()})
    details["in_session_prompt_tokens"] = sum(len(v) for v in meta.values()) / max(len(meta), 1)
    details["in_session_false_binding"] = in_session_binding
    details["in_session_recall_by_attribute"] = recall_by_attribute(ans_in, expected)
    log("  in-session recall by attribute: " + ", ".join(
        f"{a} {r:.0%}" for a, r in details["in_session_recall_by_attribute"].items()))
    details["in_session_examples"] = {k: {"expected": expected.get(k), "answer": ans_in[k], "unguarded": ans_raw[k]}
                                      | ({"question_alone": ans_alone[k.replace("|in|", "|inA|")]} if k in asked else {})
                                      for k in [r[0] for r in reqs + untaught_reqs]}
    log(f"in-session recall {in_session_recall:.0%} (frozen, same prompts: {in_session_frozen:.0%}), "
        f"untaught questions answered with a taught value {in_session_binding:.0%}; the same questions with none "
        f"of the session in the prompt {in_session_alone:.0%}; without the binding guard: recall "
        f"{details['in_session_recall_unguarded']:.0%}, untaught answered with a taught value "
        f"{details['in_session_false_binding_unguarded']:.0%} [{time.perf_counter() - t0:.0f}s]")

    return Session1(states, history, values, upd_s, upd_tok, session_state_bytes, in_session_recall,
                    in_session_frozen)


@dataclass
class Session1:
    states: dict
    history: dict
    values: dict
    update_seconds: float
    update_tokens: int
    state_bytes: int
    in_session_recall: float
    in_session_frozen: float


def cross_session_phase(m: NsamModel, chat: Chat, episodes, states: dict, history: dict, values: dict,
                        fresh_user: bytes, fresh_session: bytes, args, details: dict):
    """Consolidate each user's session 1, ask in a fresh session 2 (a bystander in the same
    batch), and the prompt baselines. -> (recall, false binding, bystander changes, user state
    bytes, baselines)"""
    # 3) consolidation at session end.
    cons: list = [None] * len(episodes)

    def record(i: int, out: tuple) -> None:
        e, (_, rep, seconds) = episodes[i], out
        cons[i] = {"user": e.user, "accepted": rep.accepted, "reason": rep.reason, "facts": rep.facts,
                   "probe_change": rep.probe_loss / rep.baseline_probe_loss - 1 if rep.accepted else None,
                   "step_scale": rep.step_scale, "steps_kept": rep.steps_kept,
                   "steps_trained": rep.steps_trained, "answers_said": rep.answers_said, "seconds": seconds}
        log(f"  consolidate {e.user}: {rep.reason}, {rep.facts} facts extracted, "
            f"probe {rep.probe_loss:.3f} vs {rep.baseline_probe_loss:.3f}, {rep.steps_kept} of {rep.steps_trained} "
            f"steps, rehearsed answers said {rep.answers_said:.0%}, {seconds:.0f}s")

    cache = SessionCache(args.session_cache) if args.session_cache else None
    cached = cache.consolidated(episodes) if cache else None
    if cached is not None:
        user_states, cons = cached
        log(f"consolidated user levels of {len(episodes)} users read from {args.session_cache} "
            "(not consolidated again)")
    else:
        done = consolidate_all(m, [(fresh_user, states[e.user], history[e.user]) for e in episodes], args, record)
        user_states = {e.user: new for e, (new, _, _) in zip(episodes, done)}
        if cache:
            cache.save_consolidated(user_states, cons)
    details["consolidations"] = cons
    user_state_bytes = len(user_states[episodes[0].user])

    # 4) session 2: fresh session from the consolidated level; a bystander (fresh user) asks
    #    the same question in the same batch. Then the same batch with the user's level fresh.
    cross_expected, untaught_keys, taught_values = {}, [], {}
    questions = []
    for e in episodes:
        for f in e.facts:
            for j, q in enumerate(f.questions):
                questions.append((e, f"{e.user}|x|{f.attribute}|{j}", q))
                cross_expected[f"{e.user}|x|{f.attribute}|{j}"] = f.value
        for j, q in enumerate(e.untaught):
            questions.append((e, f"{e.user}|u|{j}", q))
            untaught_keys.append(f"{e.user}|u|{j}")
    for _, k, _ in questions:
        taught_values[k] = values[k.split("|")[0]]
    t0 = time.perf_counter()
    learned_session = {e.user: m.new_session_state(user_states[e.user]) for e in episodes}

    def session2(with_learning: bool):
        reqs = []
        for e, k, q in questions:
            msgs = [{"role": "user", "content": q}]
            ids = m.encode_chat(msgs, args.window)
            reqs.append((k, ids, learned_session[e.user] if with_learning else fresh_session, None, msgs))
            reqs.append((k + "|bystander", ids, fresh_session, None, msgs))
        out = {}
        for i in range(0, len(reqs), args.batch):  # each chunk keeps (user, bystander) pairs together
            out.update({k: v[0] for k, v in chat.run(reqs[i:i + args.batch]).items()})
        return out

    ans_learned = session2(True)
    ans_frozen = session2(False)
    cross = score(ans_learned, cross_expected)
    fb = false_bound(ans_learned, untaught_keys, taught_values)
    with unguarded(m):  # the user level alone
        ans_raw = session2(True)
    details["cross_session_recall_unguarded"] = score(ans_raw, cross_expected)
    details["false_binding_unguarded"] = false_bound(ans_raw, untaught_keys, taught_values)
    changed = sum(ans_learned[k + "|bystander"] != ans_frozen[k + "|bystander"] for _, k, _ in questions)
    details["cross_session_recall_by_attribute"] = recall_by_attribute(ans_learned, cross_expected)
    log("  cross-session recall by attribute: " + ", ".join(
        f"{a} {r:.0%}" for a, r in details["cross_session_recall_by_attribute"].items()))
    log(f"cross-session recall {cross:.0%}, false binding {fb:.0%}, other-user changes {changed}; without the "
        f"binding guard: recall {details['cross_session_recall_unguarded']:.0%}, false binding "
        f"{details['false_binding_unguarded']:.0%} [{time.perf_counter() - t0:.0f}s]")

    # baselines: frozen; statements in the prompt; retrieval of the top-3 past messages.
    base = {"frozen": {"cross_session_recall": score(ans_frozen, cross_expected),
                       "false_binding": false_bound(ans_frozen, untaught_keys, taught_values)}}
    past = {e.user: [h["content"] for h in history[e.user] if h["role"] == "user"] for e in episodes}
    for name in ("facts_in_prompt", "retrieval_top3"):
        reqs = []
        for e, k, q in questions:
            if name == "facts_in_prompt":
                notes = [f.statement for f in e.facts]
            else:
                notes = retrieve(q, past[e.user], 3)
            system = "Things the user told you earlier:\n" + "\n".join(f"- {n}" for n in notes)
            ids = m.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": q}], 1024)
            reqs.append((k, ids, fresh_session))
        out = {}
        for i in range(0, len(reqs), args.batch):
            out.update({k: v[0] for k, v in chat.run(reqs[i:i + args.batch]).items()})
        base[name] = {"cross_session_recall": score(out, cross_expected),
                      "false_binding": false_bound(out, untaught_keys, taught_values)}
        log(f"baseline {name}: recall {base[name]['cross_session_recall']:.0%}, "
            f"false binding {base[name]['false_binding']:.0%}")
    details["examples"] = {k: {"expected": cross_expected.get(k), "learned": ans_learned[k], "unguarded": ans_raw[k],
                               "frozen": ans_frozen[k]}
                           for _, k, _ in questions}
    return cross, fb, changed, user_state_bytes, base


def _met(key: str, value) -> str:
    if key not in GOALS or value is None:
        return ""
    op, th = GOALS[key]
    ok = {">=": value >= th, "<=": value <= th, "==": value == th}[op]
    return "met" if ok else "MISSED"


def print_table(r: dict) -> None:
    pct = {"cross_session_recall", "in_session_recall", "false_binding", "forgetting", "online_ppl_reduction"}
    rows = []
    for key in ("cross_session_recall", "in_session_recall", "false_binding", "other_user_changes", "forgetting",
                "online_ppl_reduction", "update_seconds_per_100_tokens", "session_state_bytes", "user_state_bytes",
                "learning_decode_ratio"):
        v = r[key]
        shown = "n/a" if v is None else (f"{v:+.1%}" if key == "forgetting" else f"{v:.1%}" if key in pct
                                         else f"{v:.2f}" if isinstance(v, float) else f"{v:,}")
        goal = ""
        if key in GOALS:
            op, th = GOALS[key]
            goal = f"{op} {th:.0%}" if key in pct else f"{op} {th}"
        rows.append((key, shown, goal, _met(key, v)))
    width = max(len(x[0]) for x in rows)
    print(f"\n{'metric':<{width}}  {'value':>12}  {'goal':>8}  status")
    for key, shown, goal, status in rows:
        print(f"{key:<{width}}  {shown:>12}  {goal:>8}  {status}")
    print("\nbaselines (same questions):")
    print(f"{'':<18}{'cross-session recall':>22}{'false binding':>15}{'in-session recall':>19}")
    for name, b in r["baselines"].items():
        ins = f"{b['in_session_recall']:.0%}" if b.get("in_session_recall") is not None else "-"
        cross, fb = (f"{b[k]:.0%}" if b[k] is not None else "n/a" for k in ("cross_session_recall", "false_binding"))
        print(f"{name:<18}{cross:>22}{fb:>15}{ins:>19}")
    met = [k for k in GOALS if _met(k, r[k]) == "met"]
    missed = [k for k in GOALS if _met(k, r[k]) == "MISSED"]
    print(f"\ngoals met: {', '.join(met) or 'none'}")
    print(f"goals missed: {', '.join(missed) or 'none'}")
    print(f"total {r['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
