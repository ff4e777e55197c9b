"""Value finishing, replayed on recorded answers: what the binding guard's rule that says a started
value whole (`model/binding.py`, `BindingGuard.finishing`) changes in the learning benchmark's
answers, without teaching the users again (an in-session screen is ~15 min of a core per user).

    python benchmarks/finish_replay.py benchmarks/results/learning.json [more.json ...] --json OUT

Each guarded answer in a `learning.py` JSON (`in_session_examples`, `examples`) is read token by
token through a guard built as the service builds it (the user's facts from the session's
messages, the question). Decoding with the rule is the same as without it up to the first token
the rule does not allow; from there the rule says the value being said whole. So whether an
answer says a value is exact; what a reply says after the value is not known and not scored.
Answers recorded before the rule landed are the input; answers recorded with it are unchanged
by a replay (a check of the replay itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from nsam.model.binding import BindingGuard, VocabularyIndex  # noqa: E402
from nsam.model.facts import extract_facts  # noqa: E402
from nsam.model.loading import load  # noqa: E402

from episodes import make_episodes, matches  # noqa: E402


def finish(index: VocabularyIndex, tokenizer, facts, question: str, answer: str) -> str:
    """`answer` as decoding with value finishing would have said it, up to the finished value."""
    guard = BindingGuard(index, facts, question)
    said = ""
    for t in tokenizer.encode(answer):
        allowed = guard.finishing()
        if allowed is not None and t not in allowed:
            value, k = guard.being_said()[0]
            return said + value[k:]
        piece = tokenizer.decode([t])
        said += piece
        guard.push(piece)
    return answer


def replay(path: Path, index: VocabularyIndex, tokenizer) -> dict:
    run = json.loads(path.read_text())
    cfg = run["config"]
    first = cfg.get("first_user", 0)
    episodes = {e.user: e for e in make_episodes(first + cfg["users"], cfg["facts"], cfg["seed"])[first:]}
    details = run.get("details", run)
    out = {}
    for name, table, field, taught_tag, untaught_tag in (
            ("in_session", "in_session_examples", "answer", "in", "inU"),
            ("cross_session", "examples", "learned", "x", "u")):
        counts = {"recall_before": 0, "recall_after": 0, "questions": 0, "false_before": 0, "false_after": 0,
                  "untaught": 0}
        changed = []
        for key, ex in details.get(table, {}).items():
            user, tag, *rest = key.split("|")
            if tag not in (taught_tag, untaught_tag) or key.endswith("|bystander"):
                continue
            e = episodes[user]
            if tag == taught_tag:
                fact = next(f for f in e.facts if f.attribute == rest[0])
                question = fact.questions[int(rest[1])]
            else:
                question = e.untaught[int(rest[0])]
            said = "\n".join([f.statement for f in e.facts] + list(e.filler))  # the session's user turns
            after = finish(index, tokenizer, extract_facts(said), question, ex[field])
            values = [f.value for f in e.facts]
            if tag == taught_tag:
                counts["questions"] += 1
                counts["recall_before"] += matches(ex[field], ex["expected"])
                counts["recall_after"] += matches(after, ex["expected"])
            else:
                counts["untaught"] += 1
                counts["false_before"] += any(matches(ex[field], v) for v in values)
                counts["false_after"] += any(matches(after, v) for v in values)
            if after != ex[field]:
                changed.append({"key": key, "question": question, "expected": ex.get("expected"),
                                "before": ex[field], "after": after})
        n, u = max(counts["questions"], 1), max(counts["untaught"], 1)
        out[name] = {"questions": counts["questions"], "untaught_questions": counts["untaught"],
                     "recall_before": counts["recall_before"] / n, "recall_after": counts["recall_after"] / n,
                     "false_binding_before": counts["false_before"] / u,
                     "false_binding_after": counts["false_after"] / u, "changed": changed}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="learning.py JSON files")
    ap.add_argument("--json", type=Path, help="write the replay here")
    args = ap.parse_args()
    loaded = load("default")
    tokenizer = loaded.tokenizer
    index = VocabularyIndex(tokenizer, loaded.model.embed_tokens.num_embeddings)
    result = {str(p): replay(p, index, tokenizer) for p in args.runs}
    for path, phases in result.items():
        for name, r in phases.items():
            if r["questions"]:
                print(f"{path} {name}: recall {r['recall_before']:.0%} -> {r['recall_after']:.0%} "
                      f"({r['questions']} questions), false binding {r['false_binding_before']:.0%} -> "
                      f"{r['false_binding_after']:.0%} ({r['untaught_questions']})")
            for c in r["changed"]:
                print(f"  {c['key']}: {c['before']!r} -> {c['after']!r} (expected {c['expected']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
