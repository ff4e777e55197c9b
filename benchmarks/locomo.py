"""LoCoMo: real long-term conversations, each dated session one nsam session of one user.

    python benchmarks/locomo.py --data ../shared/data/locomo --json benchmarks/results/locomo.json
    python benchmarks/locomo.py --data DIR --conversations 1 --sessions 2 --questions 20

LoCoMo (Maharana et al., ACL 2024) has two people chat over 19-32 dated sessions, with questions
about what they said (`qa`: question, answer, evidence turn ids, category). The data is not in
the project: `--data` is a folder of its conversation files (one conversation per JSON file, as
the team's shared copy holds them, or `locomo10.json` itself, a list of them).

Bounded to fit a CPU: the first `--conversations` conversations (files in name order), their first
`--sessions` dated sessions, and per conversation the first `--questions` questions (file order)
of `--categories` whose evidence turns all lie in those sessions. The JSON records the ids used.

Teaching: both speakers' facts are asked about, so every turn of either speaker is a *user*
message "Speaker: text" (a shared photo as "[shares a photo: caption]"); the session's date
opens its first message. Each session is folded into the user's level with
`NsamModel.consolidate(user, fresh session, transcript)`: the session has no notes of its own, so
consolidation studies the transcript's user messages (the cheap path). `--per-turn` instead runs
the chat as served, one model reply and `update_medium` per turn (much slower), and consolidates
that session.

Asking (greedy, `--max-tokens`, the question alone as the user's message in a fresh session,
through one serving generator):
- frozen: a fresh user level, nothing in the prompt;
- retrieval: a fresh user level, the `--k` turns of the used sessions ranked highest by BM25
  against the question put in a system message (in conversation order, each with its session's date);
- full: a fresh user level, the whole used conversation in the system message when the prompt
  and the answer fit the context window (else the method is marked not fitted for it);
- learned: the level consolidated from the sessions, nothing in the prompt.

Score: LoCoMo's token F1 (lower-case, punctuation, commas and the articles a/an/the and "and"
removed; no Porter stemming, which needs nltk). Category 1 (multi-hop) splits the gold answer
(and the reply) at commas and averages each gold part's best F1; category 3 keeps the gold
answer before ";"; category 5 (adversarial, off by default) scores 1 when the reply says
"not mentioned" or "no information available". Categories as in the released file: 1 multi-hop,
2 temporal, 3 open-domain, 4 single-hop, 5 adversarial.

Keys: `f1[method][category]` and `f1[method]["overall"]` (mean over the questions asked of that
method); `locomo_f1_learned_minus_retrieval`: mean F1 of learned minus retrieval over the asked
questions of categories 1, 2 and 4; `details`: every question, gold answer and reply.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import string
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import Harness, log  # noqa: E402

from nsam.model.runtime import NsamModel, SamplingParams  # noqa: E402

DATA_HINT = ("LoCoMo conversation files (snap-research/locomo on GitHub, data/locomo10.json, or one JSON "
             "file per conversation): the team's shared copy is ../shared/data/locomo (see its README); "
             "the data is not part of this project")
METHODS = ("frozen", "retrieval", "full", "learned")
CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
HEADLINE_CATEGORIES = (1, 2, 4)


# -- scoring (LoCoMo's token F1) ---------------------------------------------------------------
def normalize_answer(text: str) -> str:
    text = str(text).replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the|and)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def multi_f1(prediction: str, gold: str) -> float:
    """Multi-hop: each comma-separated gold part scored against its best reply part, averaged."""
    parts = [p.strip() for p in str(prediction).split(",")]
    golds = [g.strip() for g in str(gold).split(",")]
    return sum(max(token_f1(p, g) for p in parts) for g in golds) / len(golds)


def score(prediction: str, qa: dict) -> float:
    category = qa["category"]
    if category == 5:
        low = prediction.lower()
        return float("no information available" in low or "not mentioned" in low)
    gold = str(qa["answer"])
    if category == 1:
        return multi_f1(prediction, gold)
    if category == 3:
        gold = gold.split(";")[0].strip()
    return token_f1(prediction, gold)


# -- retrieval (Okapi BM25) --------------------------------------------------------------------
def bm25_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def bm25_rank(query: str, docs: list[str], k1: float = 1.5, b: float = 0.75) -> list[int]:
    """Indices of `docs`, best BM25 match to `query` first (ties keep document order)."""
    tokenized = [bm25_tokens(d) for d in docs]
    n = len(docs)
    avg = sum(len(t) for t in tokenized) / max(n, 1) or 1.0
    df = Counter(w for t in tokenized for w in set(t))
    query_words = bm25_tokens(query)

    def bm25(tokens: list[str]) -> float:
        tf = Counter(tokens)
        total = 0.0
        for w in query_words:
            if tf[w]:
                idf = math.log((n - df[w] + 0.5) / (df[w] + 0.5) + 1)
                total += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(tokens) / avg))
        return total

    scores = [bm25(t) for t in tokenized]
    return sorted(range(n), key=lambda i: (-scores[i], i))


# -- data --------------------------------------------------------------------------------------
def load_conversations(folder: Path) -> list[tuple[str, dict]]:
    """(id, conversation) from every .json file in `folder`, in file-name order (numerically
    where the names are numbers); a file holding a list (locomo10.json) gives each element."""
    if not folder.is_dir():
        sys.exit(f"LoCoMo data folder {folder} not found: pass --data DIR, a folder of {DATA_HINT}")
    files = sorted(folder.glob("*.json"), key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name))
    out = []
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        for i, item in enumerate(data if isinstance(data, list) else [data]):
            conv = item.get("conversation", item)  # locomo10.json nests it; the split files do not
            if "speaker_a" not in conv or "qa" not in item:
                continue
            cid = str(item.get("sample_id") or (path.stem if not isinstance(data, list) else f"{path.stem}-{i}"))
            out.append((cid, {**conv, "qa": item["qa"]}))
    if not out:
        sys.exit(f"no LoCoMo conversation in {folder}: pass --data DIR, a folder of {DATA_HINT}")
    return out


def dated_sessions(conv: dict) -> list[int]:
    """Session numbers that have turns, in order."""
    nums = [int(k.split("_")[1]) for k in conv if re.fullmatch(r"session_\d+", k) and conv[k]]
    return sorted(nums)


def turn_text(turn: dict) -> str:
    text = f"{turn['speaker']}: {turn['text']}"
    if turn.get("blip_caption"):
        text += f" [shares a photo: {turn['blip_caption']}]"
    return text


def session_messages(conv: dict, number: int) -> list[dict[str, str]]:
    """The session as user messages, the date opening the first."""
    turns = conv[f"session_{number}"]
    messages = [{"role": "user", "content": turn_text(t)} for t in turns]
    if messages:
        messages[0]["content"] = f"({conv[f'session_{number}_date_time']}) " + messages[0]["content"]
    return messages


def select_questions(conv: dict, sessions: list[int], categories: tuple[int, ...], limit: int) -> list[int]:
    """Indices into conv["qa"] of questions of `categories` whose evidence lies in `sessions`."""
    allowed = {f"D{s}" for s in sessions}
    chosen = []
    for i, qa in enumerate(conv["qa"]):
        evidence = [e.strip() for e in qa.get("evidence", []) for e in e.split(";")]
        if qa.get("category") not in categories or not evidence:
            continue
        if all(e.split(":")[0] in allowed for e in evidence):
            chosen.append(i)
    return chosen[:limit]


def turns_of(conv: dict, sessions: list[int]) -> list[str]:
    """Every turn of the used sessions, each with its session's date (what retrieval ranks)."""
    return [f"({conv[f'session_{s}_date_time']}) {turn_text(t)}" for s in sessions for t in conv[f"session_{s}"]]


def full_context(conv: dict, sessions: list[int]) -> str:
    blocks = [f"Session {s} ({conv[f'session_{s}_date_time']}):\n" + "\n".join(turn_text(t) for t in conv[f"session_{s}"])
              for s in sessions]
    return (f"A conversation between {conv['speaker_a']} and {conv['speaker_b']}:\n\n" + "\n\n".join(blocks))


def retrieval_context(conv: dict, docs: list[str], question: str, k: int) -> tuple[str, list[int]]:
    """The top `k` turns by BM25, shown in conversation order."""
    top = sorted(bm25_rank(question, docs)[:k])
    return (f"From a conversation between {conv['speaker_a']} and {conv['speaker_b']}:\n"
            + "\n".join(docs[i] for i in top)), top


# -- the run -----------------------------------------------------------------------------------
def with_context(m: NsamModel, context: str, question: str, budget: int) -> list[int] | None:
    """Prompt ids of the question after `context` as a system message; None if it does not fit."""
    ids = m.tokenizer.encode_chat([{"role": "system", "content": context}, {"role": "user", "content": question}])
    return ids if len(ids) <= budget else None


def learn(h: Harness, conv: dict, sessions: list[int], per_turn: bool) -> tuple[bytes, list[dict]]:
    """The user level after each session was consolidated in turn; one report per session."""
    m = h.m
    user, reports = m.new_user_state(), []
    for s in sessions:
        started = time.perf_counter()
        messages = session_messages(conv, s)
        session = m.new_session_state(user)
        transcript = messages
        if per_turn:
            transcript = []
            for msg in messages:
                _, session = h.turn(session, transcript, msg["content"])
        taught = time.perf_counter() - started
        user, report = m.consolidate(user, session, transcript)
        reports.append({"session": s, "turns": len(messages), "accepted": report.accepted, "reason": report.reason,
                        "notes": len(report.known), "new_notes": report.notes,
                        "probe_change": report.probe_loss / report.baseline_probe_loss - 1 if report.accepted else None,
                        "step_scale": report.step_scale, "answers_said": report.answers_said,
                        "teach_seconds": taught, "seconds": time.perf_counter() - started - taught})
        log(f"  session {s}: {len(messages)} turns, consolidation {report.reason} ({report.notes} new notes, "
            f"{len(report.known)} kept), {time.perf_counter() - started:.0f}s")
    return user, reports


def run_conversation(h: Harness, cid: str, conv: dict, args) -> dict:
    m = h.m
    numbers = dated_sessions(conv)[:args.sessions]
    qids = select_questions(conv, numbers, tuple(args.categories), args.questions)
    qas = [conv["qa"][i] for i in qids]
    questions = [qa["question"] for qa in qas]
    params = SamplingParams(max_tokens=args.max_tokens)
    budget = m.context_window - args.max_tokens
    log(f"conversation {cid} ({conv['speaker_a']} and {conv['speaker_b']}): sessions {numbers}, "
        f"{len(qids)} questions")
    timings: dict[str, float] = {}
    answers: dict[str, list[str | None]] = {}
    fresh = m.new_session_state(m.new_user_state())

    t0 = time.perf_counter()
    answers["frozen"] = h.ask(fresh, questions)
    timings["frozen"] = time.perf_counter() - t0
    log(f"  frozen: {timings['frozen']:.0f}s")

    t0 = time.perf_counter()
    docs = turns_of(conv, numbers)
    retrieved, jobs = [], []
    for q in questions:
        k = args.k
        while True:  # a small context window: the lowest-ranked turns go first
            context, top = retrieval_context(conv, docs, q, k)
            ids = with_context(m, context, q, budget)
            if ids is not None or k == 0:
                break
            k -= 1
        retrieved.append(top)
        jobs.append((ids if ids is not None else m.encode_chat([{"role": "user", "content": q}], budget), fresh))
    answers["retrieval"] = [t for t, _ in h.replies(jobs, params)]
    timings["retrieval"] = time.perf_counter() - t0
    log(f"  retrieval: {timings['retrieval']:.0f}s")

    t0 = time.perf_counter()
    context = full_context(conv, numbers)
    full_ids = [with_context(m, context, q, budget) for q in questions]
    fitted = [ids is not None for ids in full_ids]
    replies = iter(t for t, _ in h.replies([(ids, fresh) for ids in full_ids if ids is not None], params))
    answers["full"] = [next(replies) if ok else None for ok in fitted]
    timings["full"] = time.perf_counter() - t0
    context_tokens = m.count_tokens(context)
    log(f"  full: {sum(fitted)}/{len(fitted)} fitted ({context_tokens} context tokens), {timings['full']:.0f}s")

    t0 = time.perf_counter()
    user, reports = learn(h, conv, numbers, args.per_turn)
    timings["teach_and_consolidate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers["learned"] = h.ask(m.new_session_state(user), questions)
    timings["learned"] = time.perf_counter() - t0
    log(f"  learned: teach + consolidate {timings['teach_and_consolidate']:.0f}s, ask {timings['learned']:.0f}s")

    rows = []
    for j, (i, qa) in enumerate(zip(qids, qas)):
        row = {"id": f"{cid}:{i}", "category": qa["category"], "question": qa["question"],
               "answer": qa.get("answer", qa.get("adversarial_answer")), "evidence": qa.get("evidence", []),
               "retrieved": [docs[d] for d in retrieved[j]],
               "retrieved_hits_evidence": _hits(conv, numbers, retrieved[j], qa.get("evidence", []))}
        for method in METHODS:
            reply = answers[method][j]
            row[method] = reply
            row[f"{method}_f1"] = None if reply is None else score(reply, qa)
        rows.append(row)
    return {"id": cid, "speakers": [conv["speaker_a"], conv["speaker_b"]],
            "sessions": [{"number": s, "date": conv[f"session_{s}_date_time"], "turns": len(conv[f"session_{s}"])}
                         for s in numbers],
            "question_ids": [f"{cid}:{i}" for i in qids], "full_context_tokens": context_tokens,
            "full_fitted": sum(fitted), "consolidation": reports, "seconds": timings, "questions": rows}


def _hits(conv: dict, sessions: list[int], picked: list[int], evidence: list[str]) -> float:
    """Share of the evidence turns among the retrieved ones."""
    ids = [t["dia_id"] for s in sessions for t in conv[f"session_{s}"]]
    got = {ids[i] for i in picked}
    wanted = [e.strip() for e in evidence for e in e.split(";")]
    return sum(e in got for e in wanted) / max(len(wanted), 1)


def summarise(rows: list[dict]) -> dict:
    """F1 per method: per category and overall (means over the questions that method answered)."""
    out: dict = {}
    for method in METHODS:
        per: dict = {}
        for c in sorted({r["category"] for r in rows}):
            vals = [r[f"{method}_f1"] for r in rows if r["category"] == c and r[f"{method}_f1"] is not None]
            per[str(c)] = {"f1": sum(vals) / len(vals) if vals else None, "n": len(vals)}
        vals = [r[f"{method}_f1"] for r in rows if r[f"{method}_f1"] is not None]
        per["overall"] = {"f1": sum(vals) / len(vals) if vals else None, "n": len(vals)}
        out[method] = per
    return out


def learned_minus_retrieval(rows: list[dict]) -> float | None:
    pairs = [(r["learned_f1"], r["retrieval_f1"]) for r in rows if r["category"] in HEADLINE_CATEGORIES]
    return sum(a - b for a, b in pairs) / len(pairs) if pairs else None


def code_version() -> dict:
    """The commit measured, and whether the model code differed from it (None outside a checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "model", "benchmarks/learning.py"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "model_code_modified": None}
    return {"commit": commit, "model_code_modified": bool(dirty)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help=f"folder of {DATA_HINT}")
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "locomo.json")
    ap.add_argument("--model", default="default")
    ap.add_argument("--conversations", type=int, default=1, help="first N conversations (files in name order)")
    ap.add_argument("--sessions", type=int, default=3, help="first N dated sessions of each")
    ap.add_argument("--questions", type=int, default=30, help="per conversation, evidence in the sessions used")
    ap.add_argument("--categories", type=int, nargs="+", default=list(HEADLINE_CATEGORIES),
                    help="LoCoMo categories asked (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial)")
    ap.add_argument("--k", type=int, default=5, help="turns retrieved by BM25")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (greedy)")
    ap.add_argument("--window", type=int, default=256, help="prompt tokens of the question-alone asks and --per-turn chat")
    ap.add_argument("--per-turn", action="store_true", help="chat each turn (reply + update_medium) before consolidating")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = ap.parse_args()
    if args.data is None:
        sys.exit(f"--data is required: a folder of {DATA_HINT}")
    conversations = load_conversations(args.data)[:args.conversations]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    m = NsamModel.load(args.model)
    h = Harness(m, args.window)
    log(f"model {args.model} loaded in {time.perf_counter() - started:.0f}s; context window {m.context_window}")
    convs = [run_conversation(h, cid, conv, args) for cid, conv in conversations]
    rows = [r for c in convs for r in c["questions"]]
    f1 = summarise(rows)
    out = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "date": time.strftime("%Y-%m-%d", time.gmtime()), **code_version(),
           "categories": {str(c): CATEGORY_NAMES[c] for c in args.categories},
           "locomo_f1_learned_minus_retrieval": learned_minus_retrieval(rows),
           "f1": f1, "conversations": [{k: v for k, v in c.items() if k != "questions"} for c in convs],
           "minutes": (time.perf_counter() - started) / 60, "details": rows}
    print(json.dumps({k: out[k] for k in ("locomo_f1_learned_minus_retrieval", "f1", "minutes")}, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
