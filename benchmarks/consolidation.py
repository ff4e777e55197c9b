"""Consolidation alone, for A/B runs of its settings on the tuning kinds.

Each user of `broad_episodes` (tuning kinds only: settings are chosen here, never on held-out
kinds) has their messages studied into notes once; for every variant, the notes are consolidated
into a fresh user level, and a fresh session is asked the kinds' own questions (phrased unlike the
statements), three never-taught questions and the general questions of `learning.py`.

    python benchmarks/consolidation.py --users 2 --json out/cons.json \\
        --variants '[{"name": "shipped"}, {"name": "anchor x3", "rehearsal": {"anchor_weight": 3.0}}]'

A variant overrides `ConsolidationConfig` fields ("config") and its `RehearsalConfig` fields
("rehearsal"). Reports per user and variant: recall, false binding, general questions still
right (of those the frozen model gets right), the share of notes said word for word, the probe's
loss change, the step scale the drift budget allowed, and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import broad_episodes
from learning import GENERAL, Harness, contains, log
from nsam.model.learning.study import study
from nsam.model.runtime import NsamModel
from nsam.model.state import MemoryState


def variant_config(base, variant: dict):
    rehearsal = dataclasses.replace(base.rehearsal, **variant.get("rehearsal", {}))
    return dataclasses.replace(base, rehearsal=rehearsal, **variant.get("config", {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--users", type=int, default=2)
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--variants", default='[{"name": "shipped"}]', help="JSON list of variants (see above)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = NsamModel.load("default")
    h = Harness(m, 256)
    shipped = m.consolidation
    users = [broad_episodes.make_user(100 + i, broad_episodes.TUNING_KINDS, args.facts, args.seed)
             for i in range(args.users)]
    frozen_general = h.ask(m.new_session_state(None), [q for q, _ in GENERAL])
    known_general = [contains(a, w) for a, (_, w) in zip(frozen_general, GENERAL)]
    fresh = m.new_user_state()
    sessions = {}
    for u in users:  # studied once: every variant consolidates the same notes
        notes = [n for i, msg in enumerate(u.messages) for n in study(m.model, m.tokenizer, msg, seed=i + 1)]
        blank = MemoryState.from_bytes(m.new_session_state(fresh), m.fingerprint, m.levels, "session")
        sessions[u.name] = replace(blank, notes=tuple(notes)).to_bytes(m.fingerprint, m.levels)
    out: dict = {"config": vars(args) | {"json": str(args.json)}, "variants": []}
    for variant in json.loads(args.variants):
        m.consolidation = variant_config(shipped, variant)
        rows = []
        for u in users:
            started = time.perf_counter()
            user_state, report = m.consolidate(fresh, sessions[u.name], [])
            seconds = time.perf_counter() - started
            questions = [q for f in u.facts for q in f.questions]
            values = [f.value for f in u.facts for _ in f.questions]
            answers = h.ask(m.new_session_state(user_state), questions + list(u.untaught) + [q for q, _ in GENERAL])
            n, k = len(questions), len(u.untaught)
            general = answers[n + k:]
            rows.append({
                "user": u.name, "kinds": [f.kind for f in u.facts],
                "recall": sum(contains(a, v) for a, v in zip(answers[:n], values)) / n,
                "false_binding": sum(any(contains(a, f.value) for f in u.facts) for a in answers[n:n + k]) / k,
                "general_kept": sum(contains(a, w) for a, (_, w), ok in zip(general, GENERAL, known_general) if ok)
                / max(sum(known_general), 1),
                "answers_said": report.answers_said, "accepted": report.accepted, "step_scale": report.step_scale,
                "probe_change": report.probe_loss / report.baseline_probe_loss - 1, "seconds": seconds,
                "answers": dict(zip(questions + list(u.untaught), answers[:n + k]))})
            r = rows[-1]
            log(f"{variant['name']} {u.name}: recall {r['recall']:.0%}, false binding {r['false_binding']:.0%}, "
                f"said {r['answers_said']:.0%}, probe {r['probe_change']:+.2%} x{r['step_scale']:g}, {seconds:.0f}s")
        summary = {key: sum(r[key] for r in rows) / len(rows)
                   for key in ("recall", "false_binding", "general_kept", "answers_said", "probe_change", "seconds")}
        log(f"== {variant['name']}: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
        out["variants"].append({"variant": variant, "summary": summary, "users": rows})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
