"""Consolidation alone, for A/B runs of its settings: each user states facts in one session
(scripted replies, no medium level), the session is consolidated once, and a fresh session of
that user is asked the benchmark's paraphrased questions and its never-taught ones.

    python benchmarks/consolidation.py --users 3 --json out/cons.json
    python benchmarks/consolidation.py --users 3 --config '{"probe_ppl_budget": 0.03}' --json out/cons_budget3.json

Reports per user and on average: recall, false binding, and the perplexity change on general
English with the consolidated level vs the frozen model (the same first `--general-tokens`
tokens learning.py's forgetting figure uses). Much faster than learning.py (one consolidation
per user, no chat turns), so settings can be compared before a full run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from episodes import make_episodes
from learning import Chat, ask, false_bound, log, mean_loss, score
from nsam.model.runtime import NsamModel

GENERAL = Path(__file__).resolve().parent / "data" / "general_english.txt"  # a WikiText-2 slice (data/README.md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--first-user", type=int, default=0, help="start at this user (split a run over processes)")
    ap.add_argument("--facts", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--config", default="{}", help="ConsolidationConfig overrides as JSON")
    ap.add_argument("--general", type=Path, default=GENERAL, help="general English text (default: %(default)s)")
    ap.add_argument("--general-tokens", type=int, default=2048)
    ap.add_argument("--anchor", type=Path, nargs="+",
                    help="anchor text file(s) to use instead of the shipped model/presets/anchor_plain.txt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--states", type=Path, help="also write each user's consolidated state here (USER.safetensors)")
    ap.add_argument("--reuse", action="store_true",
                    help="ask again from the states in --states instead of consolidating (another decoding, the same levels)")
    args = ap.parse_args()
    if not args.general.is_file():
        ap.error(f"--general {args.general}: no such file; benchmarks/data/README.md says where the text comes from")
    torch.set_num_threads(args.threads)

    m = NsamModel.load("default")
    overrides = json.loads(args.config)
    m.consolidation = dataclasses.replace(m.consolidation, **overrides)
    if args.anchor:
        texts = [path.read_text(encoding="utf-8") for path in args.anchor]
        m.consolidation_anchor_ids = [t for text in texts for t in m.tokenizer.encode(text)]
    episodes = make_episodes(max(args.first_user + args.users, 10), args.facts, seed=args.seed)
    episodes = episodes[args.first_user:args.first_user + args.users]
    general = m.tokenizer.encode(args.general.read_text(encoding="utf-8")[:args.general_tokens * 8])
    general = general[:args.general_tokens]
    frozen_loss = mean_loss(m, general)
    chat = Chat(m, 24, learning=True)
    fresh_user, fresh_session = m.new_user_state(), m.new_session_state(None)
    rows, answers = [], {}
    for e in episodes:
        transcript = []
        for f in e.facts:
            transcript += [{"role": "user", "content": f.statement},
                           {"role": "assistant", "content": "Got it, I will remember that."}]
        t0 = time.perf_counter()
        saved = args.states / f"{e.user}.safetensors" if args.states else None
        if args.reuse and saved is not None and saved.exists():
            user, report = saved.read_bytes(), None
        else:
            user, report = m.consolidate(fresh_user, fresh_session, transcript)
        seconds = time.perf_counter() - t0
        if args.states and report is not None:
            args.states.mkdir(parents=True, exist_ok=True)
            (args.states / f"{e.user}.safetensors").write_bytes(user)
        level = m._read(user, "user").levels["user"]
        session = m.new_session_state(user)
        questions, expected, untaught, values = {}, {}, [], {}
        for f in e.facts:
            for j, q in enumerate(f.questions):
                key = f"{e.user}|x|{f.attribute}|{j}"
                questions[key], expected[key] = q, f.value
        for j, q in enumerate(e.untaught):
            key = f"{e.user}|u|{j}"
            questions[key] = q
            untaught.append(key)
            values[key] = [f.value for f in e.facts]
        out = ask(m, chat, questions, session, 256)
        answers.update(out)
        row = {"user": e.user, "reused": report is None}
        if report is not None:
            row |= {"accepted": report.accepted, "reason": report.reason, "step_scale": report.step_scale,
                    "steps_trained": report.steps_trained,
                    "answers_said": report.answers_said, "probe_change": report.probe_loss / report.baseline_probe_loss - 1}
        row |= {"recall": score(out, expected), "false_binding": false_bound(out, untaught, values),
                "general_ppl_change": math.exp(mean_loss(m, general, level) - frozen_loss) - 1,
                "seconds": seconds}
        rows.append(row)
        mean = _write(args, m, overrides, rows, answers)
        log(f"{e.user}: recall {row['recall']:.0%}, false binding {row['false_binding']:.0%}, general ppl "
            f"{row['general_ppl_change']:+.2%}, " + ("reused" if report is None else
            f"{report.reason}, {report.steps_trained} steps x{report.step_scale:g}, "
            f"rehearsed answers said {report.answers_said:.0%}") + f", {seconds:.0f}s")
    log(f"mean over {len(rows)} users: recall {mean['recall']:.0%}, false binding {mean['false_binding']:.0%}, "
        f"general ppl {mean['general_ppl_change']:+.2%} (frozen model: recall 0, ppl change 0)")


def _write(args, m: NsamModel, overrides: dict, rows: list[dict], answers: dict) -> dict:
    """The means so far, also written to --json after every user: a run cut short keeps its figures."""
    keys = ("recall", "false_binding", "general_ppl_change", "seconds")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": overrides, "anchor": [str(p) for p in args.anchor or []],
                                         "anchor_tokens": len(m.consolidation_anchor_ids), "users_done": len(rows),
                                         "mean": mean, "users": rows, "answers": answers}, indent=1))
    return mean


if __name__ == "__main__":
    main()
